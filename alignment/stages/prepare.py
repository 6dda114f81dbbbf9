"""prepare: raw files -> SFT / preference / prompt splits and a drop report."""

from __future__ import annotations

import logging

from alignment.config import PrepareConfig
from alignment.data.io import write_jsonl, write_metrics
from alignment.data.sources import SCHEMAS, SPLITS, prepare
from alignment.paths import Paths
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: PrepareConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    splits, report = prepare(cfg)
    for schema in SCHEMAS:
        for split in SPLITS:
            write_jsonl(paths.data / f"{schema}_{split}.jsonl", splits[schema][split])
    report_path = paths.metrics("prepare")
    write_metrics(report_path, report)
    for name, counts in report["sources"].items():
        logger.info(
            "%s: read %d, kept %d, dropped %s",
            name,
            counts["read"],
            counts["kept"],
            counts["dropped"] or "none",
        )

    metrics = {
        f"rows/{schema}_{split}": n for schema, per in report["rows"].items() for split, n in per.items()
    }
    for name, counts in report["sources"].items():
        metrics |= {f"{name}/read": counts["read"], f"{name}/kept": counts["kept"]}
        metrics |= {f"{name}/dropped_{reason}": n for reason, n in counts["dropped"].items()}
    if log is not None:
        log.artifact(report_path)
    return metrics
