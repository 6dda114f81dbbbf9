"""gold: fit the IMDb gold scorer on held-out labelled reviews and report its test accuracy."""

from __future__ import annotations

import logging
import time

from alignment.config import GoldConfig
from alignment.data.sources import REQUIRED_FIELDS, read_rows
from alignment.evaluation.gold_scorer import GoldScorer
from alignment.paths import Paths
from alignment.stages.results import finish
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: GoldConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    fields = (*REQUIRED_FIELDS["text"], "label")
    train = read_rows(cfg.train_path, REQUIRED_FIELDS["text"])
    test = read_rows(cfg.test_path, REQUIRED_FIELDS["text"])
    for path, rows in ((cfg.train_path, train), (cfg.test_path, test)):
        bad = next((i for i, r in enumerate(rows) if r.get("label") not in (0, 1)), None)
        if bad is not None:
            raise ValueError(
                f"{path}: line {bad + 1}: field 'label' must be 0 or 1 (fields needed: {fields})"
            )
    started = time.perf_counter()
    scorer = GoldScorer.fit([r["text"] for r in train], [r["label"] for r in train], c=cfg.c, seed=cfg.seed)
    seconds = time.perf_counter() - started
    labels = [r["label"] for r in test]
    # the scorer judges short continuations, so report accuracy on 40-word review openings too
    openings = [" ".join(r["text"].split()[:40]) for r in test]
    metrics = {
        "test_accuracy": scorer.accuracy([r["text"] for r in test], labels),
        "test_accuracy_first_40_words": scorer.accuracy(openings, labels),
        "train_reviews": len(train),
        "test_reviews": len(test),
        "fit_seconds": seconds,
    }
    scorer.save(paths.gold)
    logger.info(
        "gold scorer: test accuracy %.3f (%.3f on 40-word openings)",
        metrics["test_accuracy"],
        metrics["test_accuracy_first_40_words"],
    )
    return finish("gold", paths, log, metrics)
