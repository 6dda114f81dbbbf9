"""The end of every stage, written once: its metrics file (NaN-safe), its DVC plot files, and with a
tracker its MLflow curves, figures and tables and the registered model."""

from __future__ import annotations

import logging
from pathlib import Path

from alignment.data.io import write_metrics
from alignment.paths import Paths
from alignment.plots import plt, write_csv
from alignment.training import distributed

logger = logging.getLogger(__name__)


def finish(
    stage: str,
    paths: Paths,
    log,
    metrics: dict,
    *,
    csvs: dict[str, tuple[list[dict], list[str]]] | None = None,
    figures: dict | None = None,
    tables: dict[str, list[dict]] | None = None,
    curves: tuple[dict, int] | None = None,
    model: Path | None = None,
    register_as: str | None = None,
    kind: str = "causal_lm",
    scoring: dict | None = None,
) -> dict:
    """The end of a stage: `metrics/<stage>.json` (NaN-safe), `plots/<stage>/<file>` for each of `csvs`
    ({file: (rows, columns)}), and with a tracker: `curves` (metrics, step) as a last point of the curves,
    `figures` ({artifact name: figure}) and `tables` ({name: rows}) in MLflow, and the model registered
    as `register_as` (a reward model with `scoring`: the length and batch its pyfunc scores at).
    Returns `metrics`. Under several processes only the main one writes and logs."""
    if not distributed.is_main():
        for figure in (figures or {}).values():
            plt.close(figure)
        return metrics
    write_metrics(paths.metrics(stage), metrics)
    for file, (rows, columns) in (csvs or {}).items():
        write_csv(paths.plots(stage) / file, rows, columns)
    if log is not None:
        if curves is not None:
            log.metrics(*curves)
        for name, figure in (figures or {}).items():
            log.figure(figure, name)
            plt.close(figure)
        for name, rows in (tables or {}).items():
            log.table(rows, name)
        if register_as and model is not None:
            version = log.register_model(model, register_as, kind=kind, scoring=scoring)
            logger.info("registered %s version %s", register_as, version)
    else:
        for figure in (figures or {}).values():
            plt.close(figure)
    return metrics
