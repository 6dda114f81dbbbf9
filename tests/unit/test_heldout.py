"""KL to the reference on held-out samples: the sampled ids scored exactly (EOS included), checked
against the exact KL of a one-step example and, by Monte Carlo, of a tiny GPT-2 enumerated in full;
the evaluation cache keeps the ids."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from alignment.config import SampleConfig
from alignment.evaluation.heldout import compare_to_sft, kl_summary, kl_to_reference
from alignment.evaluation.leaderboard import GenerationCache, sample
from alignment.models.generation import generate, generate_ids, prompt_seed

EOS, A = 0, 1


class FixedLM(torch.nn.Module):
    """A causal LM whose next-token distribution is `probs` at every position, whatever precedes it."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Five tokens, EOS first (as in the pipeline's tokenizer): a vocabulary small enough to enumerate."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": EOS, "a": A, "b": 2, "<|pad|>": 3, "<unk>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>"
    )


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """Random weights, scaled up (initializer_range 0.5) so that next-token distributions are far from
    uniform and two seeds give policies some KL apart; EOS gets real mass in a 5-token vocabulary."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=5,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        initializer_range=0.5,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=3,
    )
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def exact_kl(policy, reference, prompt_ids: list[int], steps: int) -> float:
    """KL(pi || ref) over responses that end at EOS or after `steps` tokens, by the chain rule: the
    next token's KL plus, for each token other than EOS, its probability times the KL of the rest."""
    if steps == 0:
        return 0.0
    ids = torch.tensor([prompt_ids])
    p, q = (
        m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].log_softmax(-1)
        for m in (policy, reference)
    )
    kl = float((p.exp() * (p - q)).sum())
    for token in range(len(p)):
        if token != EOS:
            kl += float(p[token].exp()) * exact_kl(policy, reference, prompt_ids + [token], steps - 1)
    return kl


def test_one_step_kl_counts_the_sampled_eos():
    """The docstring's example: pi(EOS) = 0.9, ref(EOS) = 0.5 over {EOS, a}, one step. Outcomes (EOS)
    and (a) weighted by pi give 0.9 ln 1.8 + 0.1 ln 0.2 ~ 0.368064 (text without EOS gave -0.161)."""
    policy, reference = FixedLM([0.9, 0.1]), FixedLM([0.5, 0.5])
    k1 = kl_to_reference(policy, reference, [([A], [EOS]), ([A], [A])])
    np.testing.assert_allclose(k1, [math.log(0.9 / 0.5), math.log(0.1 / 0.5)], rtol=1e-6)
    assert 0.9 * k1[0] + 0.1 * k1[1] == pytest.approx(0.368064, abs=1e-6)


def test_monte_carlo_kl_through_generate_ids_matches_the_exact_kl():
    """2000 samples: within 1 standard error of the exact KL (2.03); scoring them without their EOS
    would land 16 standard errors below it."""
    policy, reference, tokenizer = tiny_gpt2(3), tiny_gpt2(4), word_tokenizer()
    prompt, steps, n = "a b", 3, 2000
    exact = exact_kl(policy, reference, tokenizer(prompt).input_ids, steps)
    torch.manual_seed(0)
    samples = generate_ids(policy, tokenizer, [prompt] * n, steps, temperature=1.0)
    assert 0.2 < np.mean([r[-1] == EOS for _, r in samples]) < 0.8  # EOS's log-ratio carries real weight
    k1 = kl_to_reference(policy, reference, samples, batch_size=500)
    summary = kl_summary(k1)
    assert summary["objective/kl_se"] == pytest.approx(k1.std(ddof=1) / math.sqrt(n))
    assert exact > 1 and abs(summary["objective/kl"] - exact) < 4 * summary["objective/kl_se"]
    # right padding never leaks into a row's score: the same k1 scored one sample at a time
    alone = kl_to_reference(policy, reference, samples[:20], batch_size=1)
    np.testing.assert_allclose(alone, k1[:20], atol=1e-5)


def test_kl_scores_in_eval_mode_and_restores_training_mode():
    policy, reference = tiny_gpt2(0).train(), tiny_gpt2(1)  # GPT-2's default dropout is 0.1
    samples = [([A, 2], [2, A, EOS]), ([2], [A, A, 2])]
    first, second = (kl_to_reference(policy, reference, samples) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert policy.training and not reference.training


def test_compare_to_sft_texts_are_those_generate_draws_under_the_seed():
    policy, reference, tokenizer = tiny_gpt2(0), tiny_gpt2(1), word_tokenizer()
    prompts, decoding, seed = ["a", "a b", "b b a", "b"], SampleConfig(max_new_tokens=4, temperature=1.0), 7
    judges = {"length": lambda p, r, f: [len(t) for t in r]}
    metrics, rows = compare_to_sft(policy, reference, tokenizer, prompts, decoding, seed, judges)
    seeds = [prompt_seed(seed, p) for p in prompts]  # per prompt, the same for both models
    for model, column in ((policy, "policy"), (reference, "sft")):
        assert [r[column] for r in rows] == generate(model, tokenizer, prompts, 4, 1.0, seeds=seeds)
    assert metrics["objective/kl"] == pytest.approx(np.mean([r["kl"] for r in rows]))
    assert {"objective/kl_se", "length/reward", "length/win_rate_vs_sft"} <= set(metrics)


def test_evaluation_cache_redraws_rows_without_ids(tmp_path):
    """A row cached before the ids were kept counts as missing; its per-prompt seed redraws the same text."""
    policy, tokenizer, cache = tiny_gpt2(0), word_tokenizer(), GenerationCache(tmp_path)
    settings = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    (fresh,), drawn = sample(policy, "h", tokenizer, ["a", "b a"], settings, cache)
    assert drawn == 2 and [p for p, _ in fresh.ids] == [[A], [2, A]]
    assert fresh.responses == tokenizer.batch_decode([r for _, r in fresh.ids], skip_special_tokens=True)
    path = next(tmp_path.glob("*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    legacy = [{k: v for k, v in row.items() if k not in ("prompt_ids", "response_ids")} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in legacy))
    (again,), drawn = sample(policy, "h", tokenizer, ["a", "b a"], settings, cache)
    assert drawn == 2 and (again.responses, again.ids) == (fresh.responses, fresh.ids)
    assert sample(policy, "h", tokenizer, ["a", "b a"], settings, cache)[1] == 0
