"""Stages on Prefect work pools: the deployments, the workers, and the flow's dispatch of stage runs.

    python -m flows.workers deploy                 # once per params change: pools, one deployment per stage,
                                                   # the lost-worker automation, the retraining lock
    python -m flows.workers start --pool gpu       # in a worker's own checkout; runs that pool's stage runs

Every stage has a deployment `alignment-stage/<stage>` on the work pool params `workers` gives it. Its
pull step moves a flow run into the worker's checkout (`ALIGNMENT_WORKSPACE`, set by `start`), where
flows/stage.py reproduces the stage with data in and out through the DVC remote. The pipeline flow
(flows/pipeline.py) starts the stage runs in DAG order, at most `workers.max_parallel` at once, waits on
each, merges what each reports into its dvc.lock (only a report that matches dvc.yaml's command and outs
for that stage), and fails with a child's error. A run no worker takes, or one that runs too long, is set
Cancelling, so that a worker still holding it kills the process. The pools' job template is locked
(`locked_job_template`): a flow run cannot hand a worker a command, an environment or a folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from alignment import registry
from alignment.config import ConfigError
from alignment.data.io import write_metrics
from alignment.paths import Paths
from flows.config import RetrainConfig, WorkersConfig, load_section
from flows.stage import RESULT_KEY, WORKSPACE_ENV, parse_result, read_lock, stage_run, write_lock
from tasks.dvc import BIN, StageFailed

FLOW_NAME = "alignment-stage"
ENTRYPOINT = "flows/stage.py:stage_run"
# resolved by each worker when a run starts, from its own environment: its checkout
PULL_STEPS = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $" + WORKSPACE_ENV + " }}"}}
]


def stage_graph(root: Path, chosen: list[str]) -> tuple[dict[str, set[str]], dict[str, tuple[str, set]]]:
    """Each chosen stage's direct upstream stages among the chosen, from DVC's own graph of dvc.yaml, and
    each stage's command and outs there (what a worker's report must match)."""
    from dvc.repo import Repo  # heavy: only the dispatching flow needs it

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        upstream = {s.addressing: {d.addressing for d in graph.successors(s)} for s in graph.nodes}
        declared = {s.addressing: (s.cmd, {str(o.def_path) for o in s.outs}) for s in graph.nodes}
    return {stage: upstream.get(stage, set()) & set(chosen) for stage in chosen}, declared


def check_result(stage: str, result: Any, declared: tuple[str, set]) -> dict[str, Any]:
    """A worker's report (a Prefect artifact: anyone holding the server's credentials can write one) is
    merged into dvc.lock only when it is the report of `stage` with dvc.yaml's own command and outs."""
    cmd, outs = declared
    entry = result.get("lock") if isinstance(result, dict) else None
    problems = []
    if not isinstance(entry, dict) or result.get("stage") != stage:
        problems.append("not a report of this stage")
    else:
        if entry.get("cmd") != cmd:
            problems.append(f"command {entry.get('cmd')!r} is not dvc.yaml's {cmd!r}")
        reported = {o.get("path") for o in entry.get("outs") or [] if isinstance(o, dict)}
        if reported != outs:
            problems.append(f"outs {sorted(map(str, reported))} are not dvc.yaml's {sorted(outs)}")
        if not isinstance(result.get("metrics"), dict):
            problems.append("metrics are not a mapping")
    if problems:
        raise StageFailed(f"{stage}: the stage run's {RESULT_KEY} artifact is refused: {'; '.join(problems)}")
    return result


def revision(root: Path) -> str:
    """The commit the workers check out. The flow's folder may differ from it only in what the pipeline
    writes (dvc.lock, metrics/, plots/) and in params.yaml (the overrides travel with each stage run)."""
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
    ).stdout.split("\n")
    written = ("dvc.lock", "params.yaml", "metrics/", "plots/")
    dirty = [line[3:] for line in changed if line and not line[3:].startswith(written)]
    if dirty:
        raise ConfigError(f"{root}: commit and push {dirty} first: the workers check out the flow's commit")
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def check_deployments(stages: list[str], cfg: WorkersConfig) -> None:
    """Every stage has a deployment on the pool params give it: otherwise fail before anything runs."""
    wrong = []
    with get_client(sync_client=True) as client:
        for stage in stages:
            name = stage.split("@")[0]
            try:
                deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
            except Exception:  # ObjectNotFound, or no server: both mean "deploy first"
                wrong.append(f"{name} (no deployment)")
                continue
            if deployment.work_pool_name != cfg.pool(stage):
                wrong.append(f"{name} (on pool {deployment.work_pool_name}, params say {cfg.pool(stage)})")
    if wrong:
        raise ConfigError(f"stage deployments out of date: {wrong}; run `python -m flows.workers deploy`")


def read_result(client, flow_run_id) -> dict[str, Any]:
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[RESULT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        )
    )
    if not artifacts:
        raise StageFailed(f"flow run {flow_run_id} completed without its {RESULT_KEY} artifact")
    return parse_result(artifacts[0].data)


def dispatch(
    stages: list[str],
    root: Path,
    cfg: WorkersConfig,
    overrides: dict[str, Any],
    parent_run_id: str | None,
) -> dict[str, dict[str, Any]]:
    """Run `stages` (DAG order) as flow runs of their deployments; their results, in that order.

    A stage starts once its upstream stages have completed; a failed or timed-out stage stops new
    starts, the running ones are waited for (their results are kept in dvc.lock), and StageFailed
    names every failure."""
    logger = get_run_logger()
    commit = revision(root)
    upstream, declared = stage_graph(root, stages)
    lock = read_lock(root)
    lock.setdefault("stages", {})
    pending, running, results, failures = list(stages), {}, {}, []
    with get_client(sync_client=True) as client:
        while running or (pending and not failures):
            # start every stage whose upstream is done, up to max_parallel at once
            for stage in [s for s in pending if upstream[s] <= results.keys()]:
                if len(running) >= cfg.max_parallel or failures:
                    break
                parameters = {
                    "stage": stage,
                    "revision": commit,
                    "lock": lock,
                    "overrides": overrides,
                    "parent_run_id": parent_run_id,
                }
                child = run_deployment(
                    f"{FLOW_NAME}/{stage.split('@')[0]}", parameters=parameters, timeout=0, as_subflow=True
                )
                logger.info("%s -> pool %s: flow run %s", stage, cfg.pool(stage), child.name)
                running[stage] = (child.id, time.monotonic())
                pending.remove(stage)
            if not running:
                break  # nothing can start: an upstream stage failed
            time.sleep(cfg.poll_seconds)
            for stage, (run_id, started) in list(running.items()):
                state = client.read_flow_run(run_id).state
                # Cancelling: a lost worker's run (the heartbeat automation) or one we timed out
                if state.is_final() or state.is_cancelling():
                    del running[stage]
                    if not state.is_completed():
                        failures.append(f"{stage} ({state.name}): {state.message}")
                        continue
                    results[stage] = check_result(stage, read_result(client, run_id), declared[stage])
                    lock["stages"][stage] = results[stage]["lock"]
                    write_lock(root, lock)  # every finished stage counts, even if a later one fails
                    logger.info(
                        "%s %s on %s",
                        stage,
                        "ran" if results[stage]["ran"] else "was up to date",
                        results[stage]["workspace"],
                    )
                elif message := overdue(state, time.monotonic() - started, cfg, stage):
                    # Cancelling, not Crashed: the worker sees it and kills the stage's process, which
                    # would otherwise keep the worker's slot (and its GPU) after the flow gave up on it
                    del running[stage]
                    client.set_flow_run_state(run_id, Cancelling(message=message), force=True)
                    failures.append(f"{stage}: {message}")
    if failures:
        not_started = f"; not started: {pending}" if pending else ""
        raise StageFailed("stage run(s) failed: " + "; ".join(failures) + not_started)
    return {stage: results[stage] for stage in stages}


def overdue(state, seconds: float, cfg: WorkersConfig, stage: str) -> str | None:
    """Why a stage run that is not final yet is given up on, or None: never picked up by a worker within
    `workers.start_timeout_minutes` (no worker on its pool), or still going after
    `workers.stage_timeout_minutes` (a stuck worker)."""
    if state.is_scheduled() or state.is_pending():
        if seconds > 60 * cfg.start_timeout_minutes:
            return (
                f"still {state.name} after workers.start_timeout_minutes={cfg.start_timeout_minutes}: "
                f"no worker of pool {cfg.pool(stage)} took it (start one: python -m flows.workers start "
                f"--pool {cfg.pool(stage)})"
            )
        return None
    if cfg.stage_timeout_minutes is not None and seconds > 60 * cfg.stage_timeout_minutes:
        return (
            f"still {state.name} after workers.stage_timeout_minutes={cfg.stage_timeout_minutes}: its "
            f"worker on pool {cfg.pool(stage)} was lost or is stuck; cancelled"
        )
    return None


def collect(root: Path, results: dict[str, dict[str, Any]], pull: bool) -> None:
    """The flow's folder after the stage runs: each stage's metrics file (not in the remote: DVC does
    not cache metrics) and, with `pull`, every out from the remote."""
    paths = Paths(root)
    for stage, result in results.items():
        if not result["metrics"]:  # not run by its worker: this folder's metrics file stays as it is
            continue
        write_metrics(paths.metrics(stage), result["metrics"])
    if pull:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run(
            ["dvc", "pull", "--allow-missing", "--", *results],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise StageFailed(
                f"dvc pull in {root} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )


LOST_RUNS = "alignment: stage runs whose worker was lost"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MISSED_HEARTBEATS = 3  # a stage run silent this many heartbeats long is taken for lost


def lost_runs_automation(heartbeat_seconds: int):
    """The Prefect automation that sets a stage run Cancelling when its heartbeats stop (its worker's
    machine went away, the process was killed without a word, or the worker lost the server): after a
    heartbeat, the server expects the next one, or a final state, within MISSED_HEARTBEATS heartbeats.
    Prefect's recipe for zombie flow runs, restricted to the flow `alignment-stage`, with Cancelling
    instead of Crashed: a worker that is still there kills the stage's process instead of letting it keep
    its slot and GPU. The pipeline flow sees the Cancelling child and fails at once, without waiting for
    `workers.stage_timeout_minutes`."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = MISSED_HEARTBEATS * heartbeat_seconds
    finals = ("Completed", "Failed", "Cancelled", "Crashed", "Cancelling")
    return AutomationCore(
        name=LOST_RUNS,
        description=f"a stage run with no heartbeat for {within} s: its worker was lost",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in finals)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CANCELLING,
                message=f"no heartbeat for {within} s: its worker was lost (machine down or process killed)",
            )
        ],
    )


def locked_job_template(env: dict[str, str]) -> dict[str, Any]:
    """A process pool's base job template with nothing a flow run may change but its name and labels: the
    worker's own command (`python -m prefect.engine`), no working directory but the deployment's pull
    step, and `env` fixed here. Prefect's default lets every flow run pass `command`, `env` and
    `working_dir` as job variables: a shell command, or GIT_SSH_COMMAND / LD_PRELOAD, on the worker."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    fixed = {"command": None, "env": dict(env), "working_dir": None, "stream_output": True}
    template["job_configuration"] |= fixed
    properties = template["variables"]["properties"]
    template["variables"]["properties"] = {key: properties[key] for key in ("name", "labels")}
    template["variables"].pop("required", None)
    return template


def deploy(params: str = "params.yaml") -> list[str]:
    """The work pools (process type, created when missing; their job template locked), one deployment per
    stage on its pool (its runs send a heartbeat every `workers.heartbeat_seconds`), the automation that
    cancels a run whose heartbeats stop, and the retraining lock; returns the deployment names."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.utilities.callables import parameter_schema

    cfg: WorkersConfig = load_section("workers", params)
    retraining: RetrainConfig = load_section("retrain", params)
    if not cfg.enabled:
        raise ConfigError(f"{params}: workers.pools and workers.default_pool are empty: nothing to deploy")
    names = []
    # Prefect's own default (180 s) when off: the heartbeats then drive nothing of ours
    heartbeat_env = {} if cfg.heartbeat_seconds is None else {HEARTBEAT_ENV: str(cfg.heartbeat_seconds)}
    with get_client(sync_client=True) as client:
        template = locked_job_template(heartbeat_env)
        for pool in sorted({p for p in [*cfg.pools.values(), cfg.default_pool] if p}):
            try:
                client.read_work_pool(pool)
            except Exception:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            else:  # made before, perhaps with Prefect's open template: locked again
                client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
        flow_id = client.create_flow_from_name(FLOW_NAME)
        schema = parameter_schema(stage_run).model_dump()
        for stage in registry.STAGES:
            pool = cfg.pool(stage)
            if pool is None:
                continue
            client.create_deployment(  # an upsert: the same name replaces the old one
                flow_id=flow_id,
                name=stage,
                work_pool_name=pool,
                entrypoint=ENTRYPOINT,
                pull_steps=PULL_STEPS,
                parameter_openapi_schema=schema,
                parameters={"stage": stage},
                description=f"dvc repro --single-item {stage} on a worker of pool {pool}",
                tags=["alignment", "dvc", "stage"],
            )
            names.append(f"{FLOW_NAME}/{stage}")
        for old in client.read_automations_by_name(LOST_RUNS):  # re-created: params may have changed
            client.delete_automation(old.id)
        if cfg.heartbeat_seconds is not None:
            client.create_automation(lost_runs_automation(cfg.heartbeat_seconds))
        client.upsert_global_concurrency_limit_by_name(retraining.lock, 1)
    return names


def start(pool: str, name: str | None) -> int:
    """A process worker on `pool` whose stage runs work in this checkout (the working directory)."""
    env = {**os.environ, WORKSPACE_ENV: str(Path.cwd().resolve())}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # --limit 1: one checkout, one DVC workspace, one stage at a time (more at once: more workers)
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    if name:
        command += ["--name", name]
    return subprocess.call(command, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.workers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    deploying = sub.add_parser("deploy", help="work pools, one deployment per stage, the retraining lock")
    deploying.add_argument("--params", default="params.yaml")
    starting = sub.add_parser("start", help="a process worker for this checkout")
    starting.add_argument("--pool", required=True)
    starting.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args.pool, args.name)
    try:
        for name in deploy(args.params):
            print(name)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
