"""A trained policy against the SFT model on held-out prompts: both continue the same prompts under
the same seed; judges (the gold scorer, the reward model) score both; the policy's KL to SFT is
estimated on its own samples, scored token for token as they were drawn."""

from __future__ import annotations

import numpy as np
import torch

from alignment import precision
from alignment.config import ComputeConfig, SampleConfig
from alignment.data.batching import as_example
from alignment.evaluation.judging import bootstrap_ci
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.scoring import sequence_logps
from alignment.training import distributed
from alignment.training.trainer import evaluating

Sample = tuple[list[int], list[int]]  # (prompt ids, response ids), as `generate_ids` returns them


@torch.no_grad()
def kl_to_reference(policy, reference, samples: list[Sample], batch_size: int = 64) -> np.ndarray:
    """Per-sample k1 = log pi(y|x) - log pi_ref(y|x) on the policy's own samples; its mean estimates
    KL(pi || pi_ref) when the samples were drawn from pi itself (temperature 1, top_p 1). `batch_size`
    samples per forward pass, logits only at their response positions (models.scoring).

    The sampled ids are scored exactly, as TRL scores its rollouts: re-tokenizing the decoded text
    would score other tokens and drop the closing EOS, whose log-ratio is part of the sample's.
    Worked example, one step over the vocabulary {EOS, a} with pi(EOS) = 0.9, pi_ref(EOS) = 0.5:
      y = (EOS) with probability 0.9, k1 = ln(0.9 / 0.5); y = (a) with probability 0.1, k1 = ln(0.1 / 0.5);
      E[k1] = 0.9 ln 1.8 + 0.1 ln 0.2 ~ 0.368064, the KL. Without the EOS the first k1 is 0 and the
      expectation 0.1 ln 0.2 ~ -0.161, a negative "KL".

    Args:
        samples: (prompt ids, response ids) per sample, the response ending in EOS iff pi emitted it.
    Returns:
        (N,) float array of k1 per sample.
    """
    examples = [as_example(p, r) for p, r in samples]
    with evaluating(policy, reference):
        logps = [sequence_logps(model, examples, batch_size) for model in (policy, reference)]
    return (logps[0] - logps[1]).numpy()


def kl_summary(kl: np.ndarray) -> dict[str, float]:
    """`objective/kl`, the mean of the per-sample k1, and `objective/kl_se`, its standard error
    (sample standard deviation / sqrt(n); nan for a single sample)."""
    se = kl.std(ddof=1) / np.sqrt(len(kl)) if len(kl) > 1 else float("nan")
    return {"objective/kl": float(kl.mean()), "objective/kl_se": float(se)}


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where a beats b, a tie counting half."""
    return float(np.mean(a > b) + 0.5 * np.mean(a == b))


def judge_summary(name: str, scores: np.ndarray, sft_scores: np.ndarray, seed: int) -> dict[str, float]:
    """One judge's `<name>/reward`, `<name>/sft_reward` and `<name>/win_rate_vs_sft` (ties half) from
    per-prompt scores, the first and last with 95% percentile-bootstrap intervals over the prompts
    (`..._ci_low`, `..._ci_high`): the evaluation's own sampling error. A prompt that either side scores
    NaN (a reward function's None: it does not apply there) is left out; with none left, NaN."""
    valid = ~(np.isnan(scores) | np.isnan(sft_scores))
    scores, sft_scores = scores[valid], sft_scores[valid]
    wins = (scores > sft_scores) + 0.5 * (scores == sft_scores)
    empty = not valid.any()
    metrics = {
        f"{name}/reward": float("nan") if empty else float(scores.mean()),
        f"{name}/sft_reward": float("nan") if empty else float(sft_scores.mean()),
        f"{name}/win_rate_vs_sft": float("nan") if empty else win_rate(scores, sft_scores),
    }
    for key, values in (("reward", scores), ("win_rate_vs_sft", wins)):
        low, high = bootstrap_ci(values, np.mean, resamples=1000, seed=seed)
        metrics |= {f"{name}/{key}_ci_low": low, f"{name}/{key}_ci_high": high}
    return metrics


def judge_sharded(judge, prompts: list[str], responses: list[str], finished: list[bool]) -> np.ndarray:
    """judge(prompts, responses, finished) as floats, each process scoring its block of the rows."""

    def score(rows: list[int]) -> list[float]:
        picked = [prompts[i] for i in rows], [responses[i] for i in rows], [finished[i] for i in rows]
        return [float(x) for x in judge(*picked)]

    return np.asarray(distributed.map_sharded(score, list(range(len(prompts)))), dtype=float)


def compare_to_sft(
    policy,
    reference,
    tokenizer,
    prompts: list[str],
    samples: SampleConfig,
    seed: int,
    judges: dict,
    compute: ComputeConfig = ComputeConfig(),
) -> tuple[dict[str, float], list[dict]]:
    """Policy vs SFT on the same prompts, sampled and scored as `compute` says (dtype, batch sizes).
    `judges` maps a name ("gold", "rm") to a function
    (prompts, responses, finished) -> scores; each gives `<name>/reward`, `<name>/sft_reward` and
    `<name>/win_rate_vs_sft`, the policy's two with 95% bootstrap intervals over the prompts
    (`..._ci_low`, `..._ci_high`). `objective/kl` is the mean k1 estimate of KL(policy || SFT) on the
    policy's sampled ids, `objective/kl_se` its standard error; `length/mean_tokens` and
    `length/sft_mean_tokens` are the mean response lengths in tokens (EOS included when emitted)."""
    # the same per-prompt seeds for both: common random numbers; and the same samples whichever process
    # of several draws a prompt (each draws its block of the prompts, scores it, and all gather)
    seeds = [prompt_seed(seed, p) for p in prompts]
    rows_of = list(range(len(prompts)))

    def draw(model, rows: list[int]) -> list:
        return generate_ids(
            model,
            tokenizer,
            [prompts[i] for i in rows],
            samples.max_new_tokens,
            samples.temperature,
            samples.top_p,
            compute.generation_batch_size,
            seeds=[seeds[i] for i in rows],
        )

    def kl_of(part) -> list:
        return list(kl_to_reference(policy, reference, list(part), compute.scoring_batch_size))

    with precision.autocast(precision.resolve_dtype(compute.dtype)):
        drawn = [
            distributed.map_sharded(lambda rows: draw(model, rows), rows_of) for model in (policy, reference)
        ]
        kl = np.asarray(distributed.map_sharded(kl_of, drawn[0]))
    policy_responses, sft_responses = (decode_responses(tokenizer, ids) for ids in drawn)
    policy_finished, sft_finished = (
        ended(tokenizer, ids, model) for ids, model in zip(drawn, (policy, reference))
    )
    metrics: dict[str, float] = kl_summary(kl) | {"eval/prompts": len(prompts)}
    for name, ids in (("length/mean_tokens", drawn[0]), ("length/sft_mean_tokens", drawn[1])):
        metrics[name] = float(np.mean([len(response) for _, response in ids]))
    rows = [
        {"prompt": p, "policy": r, "sft": q, "kl": float(k)}
        for p, r, q, k in zip(prompts, policy_responses, sft_responses, kl)
    ]
    for name, judge in judges.items():
        policy_scores = judge_sharded(judge, prompts, policy_responses, policy_finished)
        sft_scores = judge_sharded(judge, prompts, sft_responses, sft_finished)
        metrics |= judge_summary(name, policy_scores, sft_scores, seed)
        for row, s, t in zip(rows, policy_scores, sft_scores):
            row |= {f"policy_{name}": float(s), f"sft_{name}": float(t)}
    return metrics, rows
