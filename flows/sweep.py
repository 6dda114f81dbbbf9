"""Seeded sweeps: every method x strength x seed of params `sweep` a DVC experiment, one Prefect task
and one MLflow child run each; then the reward-KL frontier with intervals over seeds, comparisons at
matched KL and the papers' claims.

    python -m flows.sweep [--methods dpo,ppo] [--set sweep.seeds=[0,1]]     # on the local engine
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve          # as the `sweep` deployment

Each run, in numbered steps:
  1. Validates params, and every point's settings applied to them: a bad knob fails before compute.
  2. Takes the workspace lock that every flow takes (tasks/dvc.py: a second sweep, or a pipeline or
     retraining started meanwhile in this folder, fails at once), and marks the MLflow runs of a killed
     earlier sweep KILLED.
  3. Per point, in order: a child run under this sweep's MLflow run, then
     `dvc exp run --temp -n <name> -S <settings> -s <stage>...`: DVC copies the workspace at HEAD into a
     temporary folder, checks out the stage's inputs from its cache and runs only the point's stage(s)
     (`-s`: SFT, pairs and the RM are shared, never re-run); the stage's own MLflow run nests under the
     point's. The experiment's name holds a digest of the stage's params, the settings and dvc.lock, so
     a point already run at this commit (`dvc exp show`) is not run again: re-running a killed sweep
     runs only what is missing, and a second sweep runs nothing.
  4. Reads every point's metrics from its experiment, writes `<sweep.out>/` (points.csv, frontier.csv,
     matched_kl.csv, frontier.md, claims.md, frontier.png), `plots/sweep/frontier.csv` (a DVC plot)
     and logs them to the sweep's run.

Points run one at a time: an experiment holds the DVC workspace's lock for its whole run (DVC's queue
workers run the same temporary-folder executor, but detached: a killed flow would leave them running).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from alignment import registry, tracking
from alignment.config import ConfigError, read_params
from alignment.data.io import atomic_write, write_text_atomic
from alignment.evaluation import sweep_stats as analysis
from alignment.tracking import PARENT_RUN_ENV
from flows.config import FLOW_SECTIONS, SweepConfig
from flows.overrides import for_logging, parse_overrides, project_paths, validated
from tasks.dvc import BIN, StageFailed, WorkspaceBusy, stream, workspace_lock


def experiment_name(point: dict[str, Any], params: dict[str, Any], lock_text: str) -> str:
    """`<method>-<value>-s<seed>-<digest>`: readable, and unique to what the point's run depends on
    besides the code (the commit): its stages' params sections, the settings, and dvc.lock (the
    upstream outputs it starts from). The flow's own sections (`sweep`: seeds, matched KL, ...) are
    not in it, so re-reporting with other settings reuses every point."""
    sections = sorted({registry.STAGES[stage.split("@")[0]].params_section for stage in point["stages"]})
    digest = hashlib.sha256(
        json.dumps(
            [{name: params.get(name) for name in sections}, point["stages"], point["settings"], lock_text],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:8]
    value = "" if point["value"] is None else "-" + re.sub(r"[^A-Za-z0-9]+", "_", str(point["value"]))
    return f"{point['method']}{value}-s{point['seed']}-{digest}".replace("_", "-")


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def finished_experiments(root: Path) -> dict[str, dict[str, dict]]:
    """The experiments of the workspace's HEAD that finished: name -> {metrics file: metrics}."""
    done = subprocess.run(
        ["dvc", "exp", "show", "--json", "--no-fetch"],
        cwd=root,
        env=dvc_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        raise StageFailed(f"dvc exp show failed:\n{done.stdout}{done.stderr}")
    found: dict[str, dict[str, dict]] = {}
    for baseline in json.loads(done.stdout or "[]"):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data, name = rev.get("data") or {}, rev.get("name")
                if not name or rev.get("error") or (data.get("status") or "Success") != "Success":
                    continue
                metrics = {
                    path: entry.get("data") or {} for path, entry in (data.get("metrics") or {}).items()
                }
                found[name] = metrics
    return found


@task(task_run_name="{name}", cache_policy=NO_CACHE)
def run_point(
    point: dict[str, Any], name: str, root: str, parent_run_id: str, recorded: dict[str, dict] | None
) -> dict:
    """One point: its MLflow child run, and its DVC experiment unless it is already `recorded` (its
    metrics files, from `finished_experiments`)."""
    logger = get_run_logger()
    project = Path(root)
    tags = {"kind": "sweep_point", "method": point["method"], "dvc_experiment": name}
    params = {"method": point["method"], "value": point["value"], "seed": point["seed"]}
    params |= {f"set.{k}": v for k, v in point["settings"].items()}
    with tracking.child_run(parent_run_id, name, tags, params, project) as run_id:
        if recorded is not None:
            logger.info("%s: already run at this commit (dvc exp show): reused", name)
            tracking.set_run_tags(run_id, {"reused": "true"}, project)
        else:
            command = ["dvc", "exp", "run", "--temp", "-n", name]
            for key, value in point["settings"].items():
                command += ["-S", f"++{key}={json.dumps(value)}"]
            command += ["-s", "--", *point["stages"]]
            logger.info("%s", " ".join(command))
            env = dvc_env({PARENT_RUN_ENV: run_id, "MLFLOW_TRACKING_URI": tracking.tracking_uri(project)})
            started = time.perf_counter()
            stream(command, Path(root), env, logger, name, hide=("train:", "\r"))
            logger.info("%s: %.0f s", name, time.perf_counter() - started)
            recorded = finished_experiments(project).get(name)
            if recorded is None:
                raise StageFailed(f"{name}: DVC reports no finished experiment of that name")
        metrics = recorded
        points = analysis.points_of(point | {"experiment": name}, metrics)
        flat = {
            f"{Path(path).stem}/{key}": value
            for path, values in metrics.items()
            for key, value in values.items()
            if any(path == f"metrics/{s.replace('@', '_')}.json" for s in point["stages"])
            and isinstance(value, int | float)
            and math.isfinite(value)
        }
        tracking.log_metrics(run_id, flat, project)
    return {"name": name, "points": points}


@flow(name="alignment-sweep")
def sweep(
    methods: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    root: str | None = None,
) -> dict[str, Any]:
    """Run the sweep of params `sweep` (or of `methods` of it) and report the frontier and claims.

    Args:
        methods: names in `sweep.methods` (default: all).
        overrides: dotted params keys to values: `sweep.*` change the grid; any other key is set in
            every point's experiment (e.g. `{"sweep.seeds": [0, 1], "dpo.data.max_train_pairs": 800}`).
        params_file: the params file, relative to `root`.
        root: the project folder (default: the working directory).
    Returns: the points, the aggregated frontier rows and the claims.
    """
    # step 1. validate the grid and every point's params before any compute
    project, params_path = project_paths(root, params_file)
    overrides = dict(overrides or {})
    config = validated(params_path, overrides)
    cfg: SweepConfig = config["sweep"]
    chosen = {name: m for name, m in cfg.methods.items() if methods is None or name in methods}
    unknown = sorted(set(methods or []) - set(cfg.methods))
    if unknown or not chosen:
        raise ConfigError(f"sweep methods {unknown or methods}: params sweep.methods has {list(cfg.methods)}")
    common = {k: v for k, v in overrides.items() if k.split(".")[0] not in FLOW_SECTIONS}
    grid = analysis.grid(chosen, cfg.seeds)
    raw_params = read_params(params_path)
    lock = project / "dvc.lock"
    lock_text = lock.read_text() if lock.exists() else ""
    for point in grid:
        point["settings"] = common | point["settings"]
        try:
            validated(params_path, point["settings"], from_run=False)  # `common` passed the allow-list
        except ConfigError as error:
            raise ConfigError(f"sweep point {point['method']}={point['value']}: {error}") from None
    logger = get_run_logger()
    logger.info("sweep: %d experiments (%s x seeds %s)", len(grid), ", ".join(chosen), list(cfg.seeds))

    # step 2. one flow at a time per workspace (a pipeline's params edit would land in the points)
    with workspace_lock(project, "sweep"):
        tracking.end_stale_runs(config["tracking"].experiment, ("sweep", "sweep_point"), project)
        record = {
            "methods": ",".join(chosen),
            "seeds": json.dumps(list(cfg.seeds)),
            **for_logging(overrides),
        }
        name = f"sweep-{flow_run.name or time.strftime('%Y%m%d-%H%M%S')}"
        with tracking.pipeline_run(
            config["tracking"].experiment, name, record, project, kind="sweep"
        ) as parent:
            # step 3. the points, one DVC experiment each
            points, failed = [], []
            baseline = tracking.git_commit(project)
            recorded = finished_experiments(project)  # one `dvc exp show` for every point run before
            for i, point in enumerate(grid, 1):
                exp = experiment_name(point, raw_params, lock_text)
                logger.info("point %d/%d: %s", i, len(grid), exp)
                if (head := tracking.git_commit(project)) != baseline:  # experiments belong to HEAD
                    raise StageFailed(
                        f"HEAD moved from {baseline[:8]} to {head[:8]} during the sweep: its points would "
                        "belong to two baselines. Re-run it: the points of the new HEAD are kept."
                    )
                try:
                    done = run_point(point, exp, str(project), parent, recorded.get(exp))
                    points += done["points"]
                except StageFailed as error:
                    logger.error("%s failed: %s", exp, error)
                    failed.append(exp)

            # step 4. the report
            # BRAIn's ablations run at params `brain.reward_beta`: they are compared with BRAIn there
            report = write_report(points, cfg, project, parent, config["brain"].reward_beta)
            if failed:
                raise StageFailed(f"{len(failed)} of {len(grid)} sweep points failed: {failed}")
            return {"points": points} | report


def write_report(points: list[dict], cfg: SweepConfig, root: Path, run_id: str, brain_at: Any) -> dict:
    out = root / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    rows = analysis.aggregate(points, cfg.level)
    matched = analysis.matched_kl_table(
        points, cfg.matched_kl, ("gold/win_rate_vs_sft", "gold/reward", "rm/reward"), cfg.level
    )
    claims = analysis.claims(points, cfg.matched_kl, brain_at, cfg.level)
    write_csv(out / "points.csv", points)
    write_csv(out / "frontier.csv", rows)
    write_csv(out / "matched_kl.csv", matched)
    plot_rows = [
        {
            "method": r["method"],
            "value": r["value"],
            "kl": r.get("objective/kl"),
            "gold_reward": r.get("gold/reward"),
        }
        | {"rm_reward": r.get("rm/reward"), "length": r.get("length/mean_tokens")}
        for r in rows
        if "objective/kl" in r
    ]
    write_csv(root / "plots" / "sweep" / "frontier.csv", plot_rows)
    write_text_atomic(out / "frontier.md", analysis.frontier_markdown(rows))
    write_text_atomic(out / "claims.md", analysis.claims_markdown(claims))
    rm = [p["eval/accuracy"] for p in points if p["method"] == "rm" and "eval/accuracy" in p]
    summary: dict[str, float] = {"points": len(points)}
    if rm:
        mean, low, high = analysis.t_interval(rm, cfg.level)
        summary |= {"rm/accuracy_mean": mean, "rm/accuracy_min": min(rm), "rm/accuracy_max": max(rm)}
        summary |= {"rm/accuracy_ci_low": low, "rm/accuracy_ci_high": high}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    figure = analysis.frontier_figure(rows)
    figure.savefig(out / "frontier.png", dpi=120)
    tracking.log_report(
        run_id,
        summary,
        figures={"sweep/frontier.png": figure},
        artifacts=[
            out / f for f in ("points.csv", "frontier.csv", "matched_kl.csv", "frontier.md", "claims.md")
        ],
        root=root,
    )
    return {"frontier": rows, "matched_kl": matched, "claims": claims, "summary": summary, "out": str(out)}


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated names of params sweep.methods (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.set)
    try:
        result = sweep(
            methods=args.methods.split(",") if args.methods else None,
            overrides=overrides,
            params_file=args.params,
        )
    except (ConfigError, WorkspaceBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(result.get("out", "outputs/sweep"))
    print(analysis.claims_markdown(result["claims"]))
    print(json.dumps(result["summary"], indent=2), f"\nreport in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
