"""The alignment pipeline as one Prefect flow: a versioned `dvc repro` of the chosen stages.

Run it on Prefect's local engine (no server to start): `python -m flows.pipeline`, optionally with
`--stages prepare,tokenizer` and `--set sft.train.learning_rate=3e-4` (repeatable). Overrides are
written into params.yaml (comments kept), as `dvc exp run -S` does, so that DVC sees the change,
re-runs exactly the stages that read it and records it in dvc.lock; commit or revert it afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from alignment import registry, tracking
from alignment.config import ConfigError, flatten
from flows.config import WorkersConfig
from flows.overrides import for_logging, parse_overrides, project_paths, validated, write_overrides
from flows.workers import check_deployments, collect, dispatch, revision
from tasks.dvc import WorkspaceBusy, repro_stage, workspace_lock


def dag_order(config: dict[str, Any]) -> dict[str, list[str]]:
    """The stages in the registry's order (dvc.yaml's, generated from it), which lists each stage after
    the stages it depends on; a `foreach` stage (`rest_iter`) lists its members (`rest_iter@1`,
    `rest_iter@2`, ...) from the params it iterates over, a plain stage itself."""
    order = {}
    for name, stage in registry.STAGES.items():
        if stage.foreach:
            section, *keys = stage.foreach.split(".")
            items = config[section].model_dump()
            for key in keys:
                items = items[key]
            order[name] = [f"{name}@{key}" for key in items]
        else:
            order[name] = [name]
    return order


def check_pools(stages: list[str], config: dict[str, Any], project: Path) -> None:
    """Stages on work pools need a pool each, a deployment on it, a shared MLflow server and a commit
    the workers can check out; and no stage on a worker may register the model whose alias only the
    retraining account moves (README "Several machines": the workers' MLflow account can read it only)."""
    workers: WorkersConfig = config["workers"]
    homeless = [stage for stage in stages if workers.pool(stage) is None]
    if homeless:
        raise ConfigError(
            f"workers: no pool for {homeless}; set workers.pools.<stage> or workers.default_pool"
        )
    champion = config["retrain"].model_name
    # a foreach member (rest_iter@k) reads its section's register_as but leaves registering to `rest`
    sections = {s: registry.get(s).params_section for s in stages if "@" not in s}
    writers = [
        s for s, section in sections.items() if getattr(config[section], "register_as", None) == champion
    ]
    if writers:
        raise ConfigError(
            f"workers: {writers} would register {champion!r}, retrain.model_name: only the retraining "
            "flow's account may write that model (it moves its alias); set their register_as to another "
            "name (or null) in the committed params"
        )
    uri = tracking.tracking_uri(project)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"workers: stages on work pools log to one MLflow server; MLFLOW_TRACKING_URI is {uri!r} "
            "(start `mlflow server` and export MLFLOW_TRACKING_URI=http://<host>:<port>)"
        )
    revision(project)
    check_deployments(stages, workers)


@flow(name="alignment-pipeline")
def pipeline(
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    root: str | None = None,
    retries: int = 0,
) -> dict[str, dict[str, Any]]:
    """Reproduce the chosen DVC stages (default: params `pipeline.stages`) with optional param overrides.

    Args:
        stages: stage names from dvc.yaml; run in DAG order whatever order they are given in.
        overrides: dotted params keys to values, e.g. `{"sft.train.learning_rate": 3e-4}`; written into
            the params file before the stages run (as `dvc exp run -S` does).
        params_file: the params file, relative to `root`.
        root: the project folder (default: the working directory).
        retries: how often a failed stage is retried (a failed training run is expensive to repeat).
    Returns: per stage, whether DVC ran it (False: up to date) and its metrics file.
    """
    # step 1. validate everything before any compute: a typo in an override or a stage name fails here
    project, params_path = project_paths(root, params_file)
    overrides = overrides or {}
    config = validated(params_path, overrides)
    chosen = list(stages or config["pipeline"].stages)
    groups = dag_order(config)
    order = [member for members in groups.values() for member in members]
    unknown = sorted(set(chosen) - set(order) - set(groups))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; dvc.yaml has {list(groups)}")
    chosen = {member for stage in chosen for member in groups.get(stage, [stage])}
    chosen = [stage for stage in order if stage in chosen]
    workers = config["workers"]
    if workers.enabled:  # each stage a flow run on its work pool: pools, deployments, services, commit
        check_pools(chosen, config, project)
    # one flow at a time in a workspace: another's params edit would land in this one's stages
    with workspace_lock(project, "pipeline"):
        return _run(chosen, overrides, params_path, project, config, retries)


def _run(chosen, overrides, params_path, project, config, retries) -> dict[str, dict[str, Any]]:
    workers = config["workers"]
    # step 2. make the overrides visible to DVC, which re-runs exactly the stages whose params changed
    if overrides:
        write_overrides(params_path, overrides)

    # step 3. one MLflow parent run; every stage process logs a nested run under it
    record = {"stages": ",".join(chosen), **for_logging(overrides)}
    with tracking.pipeline_run(config["tracking"].experiment, flow_run.name, record, project) as parent:
        if workers.enabled:
            results = dispatch(chosen, project, workers, overrides, parent)
            collect(project, results, workers.pull_outputs)
            return results
        stage_task = repro_stage.with_options(retries=retries)
        results = {}
        for stage in chosen:
            results[stage] = stage_task(stage, str(project), parent)
            if results[stage]["metrics"].get("guard/stopped"):
                get_run_logger().warning(
                    "%s: the ReST guard stopped the iterations; the later ones do not train "
                    "and `rest` keeps the best by the held-out judge",
                    stage,
                )
        return results


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for stage, result in results.items():
        numbers = {k: v for k, v in flatten(result["metrics"]).items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(numbers.items())[:4])
        lines.append(f"  {stage:<12} {'ran' if result['ran'] else 'up to date':<11} {shown}")
    return "\n".join(
        [
            "pipeline finished:",
            *lines,
            "look at: mlflow ui --backend-store-uri sqlite:///mlflow.db | dvc dag | dvc metrics show",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", help="comma-separated stages (default: params pipeline.stages)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param (value parsed as YAML); repeatable",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.set)
    stages = args.stages.split(",") if args.stages else None
    try:
        results = pipeline(stages=stages, overrides=overrides, params_file=args.params)
    except (ConfigError, WorkspaceBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
