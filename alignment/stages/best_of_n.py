"""Best-of-n on the policy stages' held-out prompts: the reward model (or, `reward: code`, a reward
computed by code: with a verifier, the share of prompts some of the n samples solve) picks the best of n
SFT samples.

The inference-time baseline of every reward-KL frontier (Stiennon et al. 2020; Gao et al. 2023): no
training, its KL to SFT analytic, log n - (n - 1) / n (an upper bound, Beirami et al. 2024). Each of the
`eval_prompts` held-out prompts (the same split, source and count as DPO's, BRAIn's, PPO's) gets
max(n) + 1 SFT samples, sample j from the seed (seed, prompt, j) alone; the best of the first n by the RM
is the best-of-n response, and the last sample is the independent SFT response it is compared with (the
policy stages' `gold/win_rate_vs_sft`). The n values share their samples (nested, as in Gao et al.), so
one run draws the whole curve.

Writes `metrics/best_of_n.json` with `best_of_<n>/<metric>` for each n (`objective/kl`, `gold/reward`,
`rm/reward`, their `win_rate_vs_sft` with bootstrap intervals over prompts, `length/mean_tokens`), the
curve `plots/best_of_n/curve.csv` and the per-prompt picks `outputs/best_of_n/picks.jsonl`.
"""

from __future__ import annotations

import logging

import numpy as np

from alignment import precision
from alignment.config import BestOfNStageConfig
from alignment.data.io import write_jsonl
from alignment.data.prompts import load_prompts
from alignment.evaluation.heldout import judge_summary
from alignment.evaluation.leaderboard import best_of, best_of_n_kl
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.loading import load_causal_lm, load_tokenizer
from alignment.paths import Paths
from alignment.rewards.source import RewardSource
from alignment.stages.common import held_out_judges, reward_scorer, score_samples, stage_reward
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training import distributed

logger = logging.getLogger(__name__)

CURVE = ("objective/kl", "gold/reward", "rm/reward", "gold/win_rate_vs_sft", "length/mean_tokens")


def best_of_n_metrics(
    picker: np.ndarray, scores: dict[str, np.ndarray], lengths: np.ndarray, n: int, seed: int
) -> dict:
    """The metrics of best-of-n from per-prompt scores (P, N + 1) of N + 1 samples: the best of the first
    n columns by `picker` (the RM's scores, or a reward computed by code's), judged against the last
    column (an independent SFT sample) by every judge. Pure: numbers in, numbers out."""
    pick = best_of(picker, n)
    rows = np.arange(len(pick))
    metrics = {"objective/kl": best_of_n_kl(n), "length/mean_tokens": float(lengths[rows, pick].mean())}
    for name, table in scores.items():
        metrics |= judge_summary(name, table[rows, pick], table[:, -1], seed)
    return metrics


def run(cfg: BestOfNStageConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    dtype = precision.resolve_dtype(cfg.compute.dtype)
    tokenizer = load_tokenizer(paths.sft)
    sft = load_causal_lm(paths.sft, dtype=dtype).eval().to(distributed.device())
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    reward = stage_reward(cfg, paths, rm)  # what picks: the RM, or a reward computed by code
    code = reward if isinstance(reward, RewardSource) else None
    judges = held_out_judges(paths, rm, cfg.source, code, tokenizer)
    prompts = load_prompts(paths, "test", cfg.source, cfg.eval_prompts, tokenizer)
    width = max(cfg.n) + 1  # the last sample of each prompt is the SFT comparison
    repeated = [p for p in prompts for _ in range(width)]
    seeds = [prompt_seed(cfg.seed, p, j) for p in prompts for j in range(width)]
    s = cfg.samples
    logger.info("best-of-n: %d SFT samples on %d held-out prompts", len(repeated), len(prompts))

    with precision.autocast(dtype):
        drawn = generate_ids(
            sft,
            tokenizer,
            repeated,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            cfg.compute.generation_batch_size,
            seeds=seeds,
        )
    responses, finished = decode_responses(tokenizer, drawn), ended(tokenizer, drawn, sft)
    scores = {
        name: np.asarray(judge(repeated, responses, finished), dtype=float).reshape(len(prompts), width)
        for name, judge in judges.items()
    }
    lengths = np.array([len(r) for _, r in drawn], dtype=float).reshape(len(prompts), width)
    # the RM as a judge has scored these already; a reward computed by code picks by the sampled ids
    # themselves (its judges see the text)
    picker = (
        scores["rm"] if code is None else np.asarray(score_samples(reward, repeated, drawn, tokenizer, sft))
    )
    picker = picker.reshape(len(prompts), width)

    metrics: dict[str, float] = {"eval/prompts": len(prompts)}
    curve, columns = [], [key for key in CURVE if key.split("/")[0] in {"objective", "length", *scores}]
    columns += [f"{name}/reward" for name in scores if f"{name}/reward" not in columns]
    for n in sorted(cfg.n):
        point = best_of_n_metrics(picker, scores, lengths, n, cfg.seed)
        metrics |= {f"best_of_{n}/{key}": value for key, value in point.items()}
        curve.append({"n": n, **{key.replace("/", "_"): point[key] for key in columns}})
        logger.info(
            "best-of-%d: KL %.2f, %s",
            n,
            point["objective/kl"],
            ", ".join(f"{name} reward {point[f'{name}/reward']:.3f}" for name in scores),
        )

    out = paths.out("best_of_n")
    out.mkdir(parents=True, exist_ok=True)
    picks = []
    best = best_of(picker, max(cfg.n))
    for i, prompt in enumerate(prompts):
        picks.append(
            {
                "prompt": prompt,
                "best": responses[i * width + best[i]],
                "sft": responses[i * width + width - 1],
                **{f"best_{name}": float(table[i, best[i]]) for name, table in scores.items()},
            }
        )
    write_jsonl(out / "picks.jsonl", picks)
    columns = ["n", *(key.replace("/", "_") for key in columns)]
    return finish(
        "best_of_n", paths, log, metrics, csvs={"curve.csv": (curve, columns)}, tables={"picks.json": picks}
    )
