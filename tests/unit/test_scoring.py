"""Scoring without gradients (alignment/models/scoring.py): logits only at response positions, the same
log-probs as the full forward bit for bit, batch size invariance, and the batch-size knobs."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from alignment.data.batching import collate
from alignment.losses.logprobs import IGNORE_INDEX, token_logps
from alignment.models.scoring import response_positions, response_token_logps, sequence_logps


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=300,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def examples(n: int = 7):
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 300, (3 + 2 * i,), generator=generator).tolist()
        response = torch.randint(1, 300, (1 + (5 * i) % 9,), generator=generator).tolist()
        out.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return out


def test_response_positions_in_order_padded_with_position_zero():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    positions, slots = response_positions(labels)
    assert positions.tolist() == [[1, 2], [0, 0]] and slots.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("build", [gpt2, qwen2])
def test_response_logits_only_and_the_full_forwards_log_probs_bit_for_bit(build):
    model, batch = build(), collate(0)(examples())
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected, mask = token_logps(full, batch["labels"])
        got = response_token_logps(model, batch)
    assert torch.equal(got, expected)
    longest = int(mask.sum(-1).max())
    assert rows == [batch["input_ids"].numel(), len(examples()) * longest]  # the LM head: all, then kept


def test_summed_log_probs_do_not_depend_on_the_batch_size():
    """Bit for bit between padded batches; to float rounding against unpadded single rows (sdpa takes
    another kernel without a mask)."""
    model, rows = gpt2(), examples(9)
    every = sequence_logps(model, rows, batch_size=9)
    assert torch.equal(sequence_logps(model, rows, batch_size=3), every)
    torch.testing.assert_close(sequence_logps(model, rows, batch_size=1), every)
    hotter = sequence_logps(model, rows, batch_size=3, temperature=2.0)
    assert hotter.shape == every.shape and not torch.allclose(hotter, every)


def test_a_model_that_cannot_slice_its_logits_is_scored_from_the_whole_forward():
    """A causal LM without `logits_to_keep` (a remote-code model, an old transformers) gives the same."""
    model, batch = gpt2(), collate(0)(examples())

    class NoSlicing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    assert torch.equal(response_token_logps(NoSlicing(model), batch), response_token_logps(model, batch))
