"""Real model families on CPU twins (alignment/models/families.py): Qwen2.5's and Llama-3.1's special
tokens, vocabulary sizes, chat templates and end tokens; the SFT mask and the judges under their
templates; a sampler that stops on every end id, never draws an id past the tokenizer, and forms the
prompt's logits only at its last position."""

import re
import warnings

import pytest
import torch

from alignment.config import ModelConfig
from alignment.data.batching import encode, prompt_ids
from alignment.data.chat import end_of_turn_id, render_prompt, render_response
from alignment.evaluation.judging import Template
from alignment.evaluation.local_judge import TransformersJudgeBackend
from alignment.losses.logprobs import IGNORE_INDEX
from alignment.models.families import FAMILIES, twin_tokenizer
from alignment.models.generation import ended, generate_ids, stop_token_ids
from alignment.models.loading import build_model, load_causal_lm, save_pretrained

TEXTS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead it.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
] * 5
CHAT = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def twins():
    out = {family: twin_tokenizer(TEXTS, family, min_frequency=1) for family in FAMILIES}
    out["llama3"].pad_token = out["llama3"].eos_token  # Llama-3 ships none: load_tokenizer's stand-in
    return out


def twin_model(tokenizer, family: str, **kwargs):
    """A tiny model of the family over its twin tokenizer, as a twin profile builds it."""
    torch.manual_seed(0)
    spec = FAMILIES[family]
    arch = "qwen2" if family == "qwen2" else "llama"
    cfg = ModelConfig(
        arch=arch,
        n_layer=1,
        n_embd=16,
        n_head=2,
        max_position_embeddings=128,
        vocab_size=spec.embedding,
        eos_tokens=spec.end_tokens,
        **kwargs,
    )
    return build_model(cfg, tokenizer).eval()


def test_twins_have_the_released_sizes_ids_and_end_tokens(twins):
    qwen, llama = twins["qwen2"], twins["llama3"]
    assert len(qwen) == 151_665 and len(llama) == 128_256
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643 and qwen.bos_token_id is None
    assert llama.convert_tokens_to_ids(["<|begin_of_text|>", "<|eom_id|>", "<|eot_id|>"]) == [
        128000,
        128008,
        128009,
    ]
    assert (
        llama.eos_token_id == 128009
        and llama.convert_ids_to_tokens(128255) == "<|reserved_special_token_247|>"
    )
    assert end_of_turn_id(qwen) == 151645 and end_of_turn_id(llama) == 128009


def test_an_end_of_turn_that_is_not_the_eos_closes_answers_and_ends_samples(twins):
    """A base model's tokenizer (Qwen2.5 base: EOS <|endoftext|>) with the chat template: the answer the
    SFT trains on ends with the template's <|im_end|>, the token the sampler stops on."""
    base = twin_tokenizer(TEXTS, "qwen2", min_frequency=1)
    base.eos_token = "<|endoftext|>"
    assert base.eos_token_id == 151643 and end_of_turn_id(base) == 151645
    prompt = render_prompt(base, CHAT)
    assert encode(base, prompt, "Knead it.", 64, finished=True)["input_ids"][-1] == 151645
    assert stop_token_ids(base) == [151645, 151643]


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_the_sft_mask_under_the_family_template(twins, family):
    """The loss is on the answer and its end of turn only; the prompt (system header, user turn, the
    assistant header) is masked; a template that opens with BOS keeps one BOS."""
    tokenizer = twins[family]
    prompt = render_prompt(tokenizer, CHAT)
    answer = render_response(tokenizer, CHAT, " Mix flour and water.")
    example = encode(tokenizer, prompt, answer, 256, finished=True)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = len(prompt_ids(tokenizer, prompt))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == "Mix flour and water." + tokenizer.convert_ids_to_tokens(
        end_of_turn_id(tokenizer)
    )
    chat = [*CHAT, {"role": "assistant", "content": "Mix flour and water."}]
    whole = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    assert ids == whole[: len(ids)]  # token for token what the template gives the finished chat
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_samples_stop_on_every_end_id_and_never_draw_past_the_tokenizer(twins, family):
    tokenizer, spec = twins[family], FAMILIES[family]
    model = twin_model(tokenizer, family, attn_implementation="eager")
    ends = tokenizer.convert_tokens_to_ids(list(spec.end_tokens))
    assert stop_token_ids(tokenizer, model) == list(dict.fromkeys([end_of_turn_id(tokenizer), *ends]))
    # the end token that is neither the EOS nor the end of turn is drawn at the third step; the padding
    # rows past the tokenizer get most of the mass everywhere
    other = next(i for i in ends if i not in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)))
    calls, heads = [], []

    def steer(module, args, logits):
        heads.append(args[0].shape[:-1].numel())
        bias = torch.zeros(logits.shape[-1])
        bias[len(tokenizer) :] = 30.0
        if len(calls) == 2:
            bias[other] = 60.0
        calls.append(1)
        return logits + bias

    model.lm_head.register_forward_hook(steer)
    prompts = [render_prompt(tokenizer, CHAT), render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated `past_key_values`
        drawn = generate_ids(model, tokenizer, prompts, 8, temperature=1.0, seeds=[1, 2])
    assert heads[0] == len(prompts)  # the prefill's LM head ran on each row's last position alone
    for _, response in drawn:
        assert len(response) == 3 and response[-1] == other
        assert all(i < len(tokenizer) for i in response)
    assert ended(tokenizer, drawn, model) == [True, True]
    assert ended(tokenizer, drawn) == [False, False]  # that end id comes from the model's generation config


def test_eos_tokens_are_saved_with_the_model_and_sizes_are_checked(twins, tmp_path):
    tokenizer = twins["qwen2"]
    model = twin_model(tokenizer, "qwen2")
    assert model.config.vocab_size == 151_936 and model.generation_config.eos_token_id == [151645, 151643]
    save_pretrained(model, tokenizer, tmp_path)
    assert load_causal_lm(tmp_path).generation_config.eos_token_id == [151645, 151643]
    with pytest.raises(ValueError, match="below the tokenizer's 151665 tokens"):
        build_model(ModelConfig(arch="qwen2", n_embd=16, n_head=2, vocab_size=1000), tokenizer)
    with pytest.raises(ValueError, match=re.escape("'<|nope|>' is not a token")):
        build_model(ModelConfig(arch="qwen2", n_embd=16, n_head=2, eos_tokens=("<|nope|>",)), tokenizer)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_local_judge_on_the_family_template(twins, family):
    """The verdict letters are single tokens after `[[` under the family's template; the logits come at each
    row's last token alone, and batched verdicts equal one-by-one ones."""
    tokenizer = twins[family]
    backend = TransformersJudgeBackend(
        "twin", model=twin_model(tokenizer, family), tokenizer=tokenizer, batch_size=3
    )
    template = Template("short", "Judge.", "Q: {question} A: {answer_a} B: {answer_b} Verdict:")
    requests = [template.messages("A film", "good" * k, "bad") for k in (1, 5, 9, 2)]
    answers = backend.complete(requests)
    batched = torch.tensor(backend.last_probabilities)
    alone = torch.cat([backend.probabilities([r]) for r in requests])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert all(a in ("[[A]]", "[[B]]", "[[C]]") for a in answers)
