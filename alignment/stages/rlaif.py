"""rlaif: reward-model training data labelled by an LLM judge instead of people (RLAIF, Bai et al.
2022; Lee et al. 2023).

1. Pairs: the first `train_pairs` / `eval_pairs` pairs of each source, their labels kept aside; each
   pair is shown in a seeded random order, so that the label is not tied to a position.
2. The pairwise judge compares them in both orders; a pair is kept only when both orders agree, the
   preferred response becoming `chosen`. Ties and disagreements are dropped, unparseable verdicts
   are dropped as invalid; both are counted.
3. Agreement with the labels kept aside (the gold scorer's for IMDb pairs, people's for HH): on kept
   pairs, and for single-order verdicts. `rm.data.sources: [rlaif]` trains the reward model on the
   result.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np

from alignment.config import RLAIFConfig
from alignment.data.chat import render_prompt
from alignment.data.io import read_jsonl, write_jsonl, write_metrics
from alignment.data.preference_data import FILES
from alignment.evaluation.judging import (
    LOSS,
    WIN,
    PairwiseJudge,
    build_backend,
    judge_template,
    position_stats,
)
from alignment.paths import Paths
from alignment.precision import resolve_dtype
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


def label(judge, pairs: list[dict], rng: np.random.Generator) -> tuple[list[dict], dict[str, float]]:
    """The judge's pairs and its agreement with the original labels (`chosen` is the labelled winner)."""
    swap = rng.random(len(pairs)) < 0.5
    first = [p["rejected"] if s else p["chosen"] for p, s in zip(pairs, swap)]
    second = [p["chosen"] if s else p["rejected"] for p, s in zip(pairs, swap)]
    # the judge reads conversations as plain text (the HH format)
    judgement = judge.compare([render_prompt(None, p["prompt"]) for p in pairs], first, second)
    kept, counts, agree = [], Counter(), []
    for pair, s, a, b, outcome in zip(pairs, swap, first, second, judgement.outcomes):
        if np.isnan(outcome):
            counts["invalid"] += 1
        elif outcome not in (WIN, LOSS):
            counts["tie_or_disagreement"] += 1
        else:
            chosen, rejected = (a, b) if outcome == WIN else (b, a)
            agrees = chosen == pair["chosen"]
            agree.append(agrees)
            # sampled pairs say which reply the model finished (EOS); the flags follow the replies
            flags = {k: pair[f"{k}_finished"] for k in ("chosen", "rejected") if f"{k}_finished" in pair}
            if flags and not agrees:
                flags = {"chosen": flags["rejected"], "rejected": flags["chosen"]}
            kept.append(
                {
                    "prompt": pair["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    **{f"{key}_finished": value for key, value in flags.items()},
                    "source": "rlaif",
                    "origin": pair["source"],
                    "agrees_with_label": agrees,
                }
            )
    # single-order agreement: each order's verdict on its own, as a judge without swapping would be used
    singles = []
    for s, detail in zip(swap, judgement.details):
        # in the first order `first` is shown as A, in the second `second` is;
        # `chosen` is `first` unless swapped
        for verdict, chosen_shown_as_a in ((detail["model_first"], not s), (detail["model_second"], s)):
            if verdict in ("A", "B"):
                singles.append((verdict == "A") == chosen_shown_as_a)
    metrics = {
        "pairs": len(pairs),
        "kept": len(kept),
        "kept_fraction": len(kept) / len(pairs),
        "agreement": float(np.mean(agree)) if agree else float("nan"),
        "single_order_agreement": float(np.mean(singles)) if singles else float("nan"),
        **{k: float(v) for k, v in counts.items()},
        **position_stats(judgement.details),
    }
    return kept, metrics


def run(cfg: RLAIFConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    rng = np.random.default_rng(cfg.seed)
    dtype = resolve_dtype(cfg.compute.dtype)
    backend = build_backend(cfg.judge, paths.checkpoints("rlaif") / "judge_cache", dtype)
    judges = {}
    metrics: dict[str, float] = {}
    paths.rlaif.mkdir(parents=True, exist_ok=True)
    paths.checkpoints("rlaif").mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is cached
    for split, count in (("train", cfg.train_pairs), ("eval", cfg.eval_pairs)):
        out = []
        for source in cfg.sources:
            pairs = list(read_jsonl(FILES[source](paths, split)))[:count]
            if not pairs:
                continue
            task = "imdb" if all(p["source"].startswith("imdb") for p in pairs) else "dialogue"
            if task not in judges:  # the template follows the task, the backend is shared
                judges[task] = PairwiseJudge(
                    "llm",
                    backend,
                    judge_template(cfg.judge, task, paths.root),
                    cfg.judge.parse_retries,
                    cfg.judge.min_valid_fraction,
                )
            kept, source_metrics = label(judges[task], pairs, rng)
            out += kept
            if not kept:
                logger.warning(
                    "%s %s: the judge kept no pair (consistency %.2f, first-position rate %.2f): "
                    "its labels cannot train a reward model",
                    split,
                    source,
                    source_metrics["consistency"],
                    source_metrics["first_position_rate"],
                )
            metrics |= {f"{split}/{source}/{k}": v for k, v in source_metrics.items()}
            logger.info(
                "%s %s: kept %d of %d pairs; agreement with the labels %.3f (single order %.3f), "
                "first-position rate %.2f",
                split,
                source,
                len(kept),
                len(pairs),
                source_metrics["agreement"],
                source_metrics["single_order_agreement"],
                source_metrics["first_position_rate"],
            )
        write_jsonl(paths.rlaif / f"{split}.jsonl", out)
    identity = {task: judge.identity() for task, judge in judges.items()}
    (paths.rlaif / "judge.json").write_text(json.dumps(identity, indent=2) + "\n")
    write_metrics(paths.metrics("rlaif"), metrics)
    if log is not None:
        log.tags({f"judge.{task}": json.dumps(i) for task, i in identity.items()})
        log.artifact(paths.rlaif / "judge.json")
    return metrics
