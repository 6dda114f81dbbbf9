"""Serve the pipeline flow as a deployment on a Prefect server: trigger it from the UI, or on a cron.

    prefect server start                                   # or: make prefect-server
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve

The deployment's name, schedule and default stages come from params `pipeline` (read once, at start:
restart to pick up a change). The process runs each flow run in this folder until it is stopped; with
`pipeline.schedule.cron` set it is also the scheduled-retraining hook.
"""
from __future__ import annotations

import argparse

from prefect.schedules import Cron

from alignment.config import PipelineConfig, load_section
from flows.pipeline import pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg: PipelineConfig = load_section("pipeline", args.params)
    cron = cfg.schedule.cron
    pipeline.serve(
        name=cfg.deployment,
        schedules=[Cron(cron, timezone=cfg.schedule.timezone)] if cron else None,
        parameters={"stages": list(cfg.stages), "overrides": {}, "params_file": args.params},
        description="DVC stages of the alignment pipeline, recorded in MLflow; `overrides` takes dotted "
        "params keys, e.g. {\"sft.train.learning_rate\": 0.0003}, and writes them into the params file.",
        tags=["alignment", "dvc"],
        # one run at a time: two `dvc repro` in the same workspace would fight over DVC's lock
        limit=1,
    )


if __name__ == "__main__":
    main()
