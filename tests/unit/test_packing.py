"""Padding-free DPO batches: the worked layout of alignment/data/packing.py, and the invariant that a packed
batch gives the padded batch's log-probs, DPO loss and gradients on tiny models built from a config."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignment.config import DPOConfig
from alignment.data import packing
from alignment.stages import dpo

X = -100  # IGNORE_INDEX


def row(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + response, "labels": [X] * len(prompt) + response}


def test_worked_example_of_the_module_docstring():
    rows = [row([1, 2], [3, 4]), row([1, 2], [5]), row([7], [8])]
    batch = packing.pack(rows, capacity=16, pairs=[(0, 1)])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert batch["group"].tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    assert batch["branch"].tolist() == [[0, 0, 1, 1, 2, 1, 1]]
    assert batch["logit_positions"].tolist() == [[1, 2, 1, 5]]
    assert batch["targets"].tolist() == [[3, 4, 5, 8]]
    assert batch["target_sequence"].tolist() == [[0, 0, 1, 2]]
    assert batch["sequence_lengths"].tolist() == [4, 3, 2]
    mask = packing.attention_mask(batch["group"], batch["branch"])
    assert mask.int()[0, 0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # the rejected token sees the shared prompt, not the chosen reply
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]


def test_rows_fill_first_fit_and_padding_sees_only_padding():
    """Lengths 3, 2, 2 in rows of 4: [3] then [2, 2]; the first row ends in one padding slot."""
    rows = [row([1], [2, 3]), row([4], [5]), row([6], [7])]
    batch = packing.pack(rows, capacity=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["target_sequence"].tolist() == [[0, 0], [1, 2]]
    assert batch["target_mask"].tolist() == [[1, 1], [1, 1]]
    mask = packing.attention_mask(batch["group"], batch["branch"])
    assert mask[0, 0, 3].tolist() == [False, False, False, True]


def test_sharing_stops_at_the_first_response_token_or_difference():
    assert packing.shared_prompt(row([1, 2, 3], [4]), row([1, 2, 3], [5])) == 3
    assert packing.shared_prompt(row([1, 2], [3, 4]), row([1, 2, 3], [4])) == 2  # 3 is chosen's response
    assert packing.shared_prompt(row([9, 2], [3]), row([1, 2], [3])) == 0  # prompts cut differently


def pairs(seed: int = 0) -> list[dict]:
    """Ragged pairs over a 40-token vocabulary: shared prompts, one pair whose prompts differ (a prompt
    cut for length), one rejected reply of a single token."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 40, (n,), generator=g).tolist()

    out = []
    for prompt_len, chosen_len, rejected_len in [(5, 3, 6), (2, 7, 1), (9, 4, 4), (3, 2, 8), (6, 5, 2)]:
        prompt = tokens(prompt_len)
        out.append({"chosen": row(prompt, tokens(chosen_len)), "rejected": row(prompt, tokens(rejected_len))})
    out[2]["rejected"] = row(tokens(7), tokens(3))
    return out


def gpt2(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config._attn_implementation = attention
    return GPT2LMHeadModel(config)


def llama(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("build, attention", [(gpt2, "sdpa"), (gpt2, "eager"), (llama, "sdpa")])
def test_packed_and_padded_give_the_same_sequence_logps(build, attention):
    model = build(attention).eval()
    examples = pairs()
    padded = dpo.collate_with_reference(0)(examples)
    packed = dpo.collate_with_reference(0, padding_free=True, capacity=24)(examples)
    assert packed["input_ids"].shape[0] > 1  # several packed rows
    torch.testing.assert_close(
        dpo.summed_logps(model, packed), dpo.summed_logps(model, padded), rtol=1e-5, atol=1e-5
    )
    assert dpo.pairs_in(packed).item() == dpo.pairs_in(padded).item() == len(examples)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "unlikelihood"])
def test_packed_and_padded_give_the_same_dpo_loss_and_gradients(loss_type):
    model = gpt2("sdpa")
    examples = pairs(1)
    with torch.no_grad():  # a reference a little off the policy, so the log-ratios are not all 0
        reference = dpo.summed_logps(model, dpo.collate_with_reference(0)(examples)) - 0.3
    for i, example in enumerate(examples):
        example["reference_logps"] = (reference[i].item(), reference[len(examples) + i].item())
    step = dpo.make_step(None, DPOConfig(beta=0.5, loss_type=loss_type))
    results = []
    for padding_free in (False, True):
        policy = copy.deepcopy(model)
        loss, metrics = step(policy, dpo.collate_with_reference(0, padding_free, capacity=24)(examples))
        loss.backward()
        results.append((loss, metrics, [p.grad for p in policy.parameters()]))
    (padded_loss, padded_metrics, padded_grads), (packed_loss, packed_metrics, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert packed_metrics == pytest.approx(padded_metrics, abs=1e-5)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-5)
