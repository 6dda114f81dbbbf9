"""Serve the flows as deployments on a Prefect server: trigger them from the UI, or on their crons.

    prefect server start                                   # or: make prefect-server
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve

Three deployments, named and scheduled from params (read once, at start: restart to pick up a change):
- `alignment-pipeline/<pipeline.deployment>`: the DVC stages of the pipeline (cron `pipeline.schedule`);
- `rest-retraining/<retrain.deployment>`: the scheduled iterative retraining (cron `retrain.schedule`):
  ReST rounds from the champion as a DVC experiment, the champion moving only on improvement;
- `alignment-sweep/sweep`: the seeded sweep of params `sweep` (on demand): every point a DVC experiment,
  the frontier, matched-KL comparisons and the papers' claims in MLflow and `sweep.out`.
The process runs each flow run in this folder until it is stopped, one at a time: every run works in
the same DVC workspace, and each also takes the workspace lock (tasks/dvc.py), so a flow started in this
folder by other means (the CLI, a second `serve`) refuses instead of mixing its params with a served run's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from flows.config import PipelineConfig, RetrainConfig, ScheduleConfig, load_section
from flows.overrides import SERVED_ROOT_ENV
from flows.pipeline import pipeline
from flows.retrain import retrain
from flows.sweep import sweep


def schedules(schedule: ScheduleConfig) -> list[Cron] | None:
    return [Cron(schedule.cron, timezone=schedule.timezone)] if schedule.cron else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg: PipelineConfig = load_section("pipeline", args.params)
    retraining: RetrainConfig = load_section("retrain", args.params)
    # the runs inherit it: a run's `root` parameter cannot send a served flow to another folder
    os.environ[SERVED_ROOT_ENV] = str(Path.cwd().resolve())
    serve(
        pipeline.to_deployment(
            name=cfg.deployment,
            schedules=schedules(cfg.schedule),
            parameters={"stages": list(cfg.stages), "overrides": {}, "params_file": args.params},
            description="DVC stages of the alignment pipeline, recorded in MLflow; `overrides` takes dotted "
            'params keys, e.g. {"sft.train.learning_rate": 0.0003}, and writes them into the params file.',
            tags=["alignment", "dvc"],
        ),
        retrain.to_deployment(
            name=retraining.deployment,
            schedules=schedules(retraining.schedule),
            parameters={"overrides": {}, "retrain_rm": retraining.retrain_rm, "params_file": args.params},
            description="ReST rounds from the registry's champion as one DVC experiment; picks up new prompt "
            "files in `rest.incoming`; registers the new policy and moves the champion alias only when it "
            "beats the champion on the held-out judge. `overrides`: dotted params keys for this run only.",
            tags=["alignment", "dvc", "rest"],
        ),
        sweep.to_deployment(
            name="sweep",
            parameters={"methods": None, "overrides": {}, "params_file": args.params},
            description="Every method x strength x seed of params `sweep` as a DVC experiment (points "
            "already run at this commit are reused); reports the reward-KL frontier with 95% intervals "
            "over seeds, win rates at matched KL and the papers' claims. `methods`: some of sweep.methods.",
            tags=["alignment", "dvc", "sweep"],
        ),
        # one run at a time: two `dvc repro` in the same workspace would fight over DVC's lock
        limit=1,
    )


if __name__ == "__main__":
    main()
