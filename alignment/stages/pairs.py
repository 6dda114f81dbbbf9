"""pairs: preference pairs the DPO paper's way (controlled sentiment). For each prompt, sample k
continuations from the SFT policy, score each with the gold scorer, and make all k(k-1)/2 pairs,
the higher gold reward winning (or a Bradley-Terry draw, to simulate noisy annotators)."""

from __future__ import annotations

import logging
from collections import Counter
from itertools import combinations

import numpy as np

from alignment import precision
from alignment.config import PairsConfig
from alignment.data.chat import render_prompt
from alignment.data.io import read_jsonl, write_jsonl
from alignment.evaluation.gold_scorer import GoldScorer
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.loading import load_causal_lm, load_tokenizer
from alignment.paths import Paths
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training import distributed

logger = logging.getLogger(__name__)


def label_pairs(
    prompt: str,
    responses: list[str],
    rewards: list[float],
    temperature: float | None,
    rng: np.random.Generator,
    finished: list[bool] | None = None,
) -> tuple[list[dict], Counter]:
    """All pairs of one prompt's samples, labelled by reward; ties and empty responses skipped, counted.
    `finished[i]`: sample i ended with EOS (kept as `chosen_finished` / `rejected_finished`, so the RM
    and DPO close only those with EOS); None: all finished."""
    finished = [True] * len(responses) if finished is None else finished
    pairs, skipped = [], Counter()
    for i, j in combinations(range(len(responses)), 2):
        if not responses[i].strip() or not responses[j].strip():
            skipped["empty_response"] += 1
            continue
        if rewards[i] == rewards[j] or responses[i] == responses[j]:
            skipped["tie"] += 1
            continue
        if temperature is None:
            first_wins = rewards[i] > rewards[j]
        else:
            first_wins = rng.random() < 1.0 / (1.0 + np.exp(-(rewards[i] - rewards[j]) / temperature))
        w, lose = (i, j) if first_wins else (j, i)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": responses[w],
                "rejected": responses[lose],
                "chosen_finished": finished[w],
                "rejected_finished": finished[lose],
                "source": "imdb_pairs",
                "chosen_gold": rewards[w],
                "rejected_gold": rewards[lose],
            }
        )
    return pairs, skipped


def run(cfg: PairsConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    dtype = precision.resolve_dtype(cfg.compute.dtype)
    tokenizer = load_tokenizer(paths.sft)
    model = load_causal_lm(paths.sft, dtype=dtype).eval().to(distributed.device())
    gold = GoldScorer.load(paths.gold)
    rng = np.random.default_rng(cfg.seed)
    metrics: dict[str, float] = {}
    for split, n in (("train", cfg.train_prompts), ("eval", cfg.eval_prompts)):
        prompts = [
            render_prompt(tokenizer, r["prompt"])
            for r in read_jsonl(paths.data / f"prompts_{split}.jsonl")
            if r["source"] == cfg.source
        ][:n]
        if not prompts:
            raise ValueError(
                f"{paths.data / f'prompts_{split}.jsonl'}: no prompts with source {cfg.source!r}"
            )
        k = cfg.samples_per_prompt
        expanded = [p for p in prompts for _ in range(k)]  # sample j of prompt i sits at i*k + j
        # one seed per (prompt, sample): the same samples whichever process of several draws them
        seeds = [prompt_seed(cfg.seed, p, j) for p in prompts for j in range(k)]

        def draw_and_score(rows: list[int]) -> list:
            with precision.autocast(dtype):
                drawn = generate_ids(
                    model,
                    tokenizer,
                    [expanded[i] for i in rows],
                    cfg.max_new_tokens,
                    cfg.temperature,
                    batch_size=cfg.compute.generation_batch_size,
                    seeds=[seeds[i] for i in rows],
                )
            texts = decode_responses(tokenizer, drawn)
            rewards = gold.reward([expanded[i] + r for i, r in zip(rows, texts)]).tolist()
            return list(zip(texts, ended(tokenizer, drawn, model), rewards))

        responses, finished, rewards = map(
            list, zip(*distributed.map_sharded(draw_and_score, list(range(len(expanded)))))
        )
        pairs, skipped = [], Counter()
        for i, prompt in enumerate(prompts):
            got, why = label_pairs(
                prompt,
                responses[i * k : (i + 1) * k],
                rewards[i * k : (i + 1) * k],
                cfg.label_temperature,
                rng,
                finished[i * k : (i + 1) * k],
            )
            pairs += got
            skipped += why
        samples = [{"prompt": p, "response": r, "gold": g} for p, r, g in zip(expanded, responses, rewards)]
        if distributed.is_main():
            write_jsonl(paths.pairs / f"{split}.jsonl", pairs)
            write_jsonl(paths.pairs / f"samples_{split}.jsonl", samples)
        agree = np.mean([p["chosen_gold"] > p["rejected_gold"] for p in pairs]) if pairs else float("nan")
        metrics |= {
            f"{split}/prompts": len(prompts),
            f"{split}/pairs": len(pairs),
            f"{split}/sft_gold_reward": float(np.mean(rewards)),
            f"{split}/label_agreement_with_gold": float(agree),
            **{f"{split}/skipped_{reason}": n for reason, n in sorted(skipped.items())},
        }
        logger.info(
            "%s: %d prompts -> %d pairs (skipped %s), SFT gold reward %.3f",
            split,
            len(prompts),
            len(pairs),
            dict(skipped),
            np.mean(rewards),
        )
    return finish("pairs", paths, log, metrics)
