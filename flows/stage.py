"""One DVC stage on a worker: the flow behind the deployments `alignment-stage/<stage>`.

A worker (`python -m flows.workers start --pool gpu`, in its own checkout) picks up a flow run of this
flow, and its pull step moves into that checkout (`ALIGNMENT_WORKSPACE`). The run, in numbered steps:

  1. Checks out the pipeline flow's git revision (`git fetch`, then a detached checkout: the worker's
     own edits to tracked files are dropped; outputs and checkpoints, which git ignores, stay) and
     writes the flow's param overrides into params.yaml, as the flow did in its own folder.
  2. Writes the flow's dvc.lock: the upstream stages' entries, as the workers that ran them reported.
  3. When the lock already has the stage: pulls its inputs and outs at the lock's hashes and asks DVC
     whether anything but its uncached outs (metrics, plots, checkpoints: never in the remote)
     differs; if not, the stage is done and does not run again, here or anywhere. Otherwise
     `dvc repro --single-item --pull <stage>`: pulls exactly the inputs it needs and runs it; never
     an upstream stage.
  4. `dvc push <stage>` (and the run cache): the outs reach the remote, the only shared file store.
  5. Reports the stage's dvc.lock entry and metrics as a Prefect artifact (`stage-result`), which the
     pipeline flow merges into its own dvc.lock: the pipeline stays one versioned `dvc repro`.
The stage process logs its MLflow run under the pipeline's (ALIGNMENT_PARENT_RUN_ID) to the server of
`MLFLOW_TRACKING_URI` in the worker's environment.

Every parameter of a flow run is checked here again before it is used, whoever started the run: the
stage is a registered stage of this deployment, the revision a full commit id, the overrides pass the
allow-list (flows/overrides.py) and validate against the checked-out params, the lock holds only stage
entries, and the run holds the checkout's workspace lock (tasks/dvc.py) from the checkout to the report.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment
from ruamel.yaml import YAML

from alignment import registry
from alignment.config import ConfigError
from alignment.data.io import atomic_write
from alignment.paths import Paths
from alignment.tracking import PARENT_RUN_ENV, redact
from flows.overrides import check_allowed, validated, write_overrides
from tasks.dvc import BIN, StageFailed, stream, workspace_lock

WORKSPACE_ENV = "ALIGNMENT_WORKSPACE"  # the worker's checkout; the deployments' pull step moves there
RESULT_KEY = "stage-result"  # the artifact the pipeline flow reads back
COMMIT = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")  # a full SHA-1 or SHA-256 commit id, nothing else
STAGE = re.compile(r"^[a-z][a-z0-9_]*(@[A-Za-z0-9_.-]+)?$")  # `rm`, `rest_iter@2`
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id
REMOTE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a DVC remote's name


def workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or ".").resolve()


def check_parameters(
    stage: str,
    revision: str | None,
    lock: dict[str, Any] | None,
    overrides: dict[str, Any] | None,
    parent_run_id: str | None,
    remote: str | None,
) -> None:
    """A flow run's parameters are data from whoever could start it: ConfigError before anything is done
    with them unless each is what it claims to be."""
    if not STAGE.match(stage) or stage.split("@")[0] not in registry.STAGES:
        raise ConfigError(f"stage {stage!r}: not a registered stage ({list(registry.STAGES)})")
    # a deployment runs its own stage on its own pool: the pool mapping is committed params, not a parameter
    name = deployment.name
    if name and name != stage.split("@")[0]:
        raise ConfigError(f"stage {stage!r}: the deployment alignment-stage/{name} runs only {name}")
    if revision is not None and not COMMIT.match(revision):
        raise ConfigError(f"revision {revision!r}: a full commit id (40 or 64 hex digits) expected")
    if parent_run_id is not None and not RUN_ID.match(parent_run_id):
        raise ConfigError(f"parent_run_id {parent_run_id!r}: an MLflow run id (32 hex digits) expected")
    if remote is not None and not REMOTE.match(remote):
        raise ConfigError(f"remote {remote!r}: a DVC remote's name expected")
    check_allowed(overrides or {})
    if lock is not None:
        stages = lock.get("stages", {}) if isinstance(lock, dict) else None
        bad = (
            ["the lock is not a mapping with `stages`"]
            if not isinstance(stages, dict) or set(lock) - {"schema", "stages"}
            else [s for s, e in stages.items() if not STAGE.match(str(s)) or not isinstance(e, dict)]
        )
        if bad:
            raise ConfigError(f"lock: not dvc.lock stage entries: {bad}")


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise StageFailed(f"git {' '.join(args)} in {root}: {redact(done.stderr.strip())}")
    return done.stdout.strip()


def check_out(root: Path, revision: str) -> None:
    """Step 1: the flow's revision (a full commit id), fetched from `origin` when this checkout does not
    have it yet."""
    if subprocess.run(["git", "cat-file", "-e", f"{revision}^{{commit}}"], cwd=root).returncode:
        git(root, "fetch", "--quiet", "origin")
    git(root, "checkout", "--quiet", "--force", "--detach", revision, "--")


def write_lock(root: Path, lock: dict[str, Any]) -> None:
    """Step 2: dvc.lock as the flow holds it (schema and every stage entry reported so far), written to a
    temporary file and renamed: a kill mid-write leaves the old lock whole."""
    yaml = YAML()
    yaml.default_flow_style = False
    with atomic_write(root / "dvc.lock") as handle:
        yaml.dump(lock, handle)


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    return YAML(typ="safe").load(path.read_text()) if path.exists() else {"schema": "2.0", "stages": {}}


def uncached_outs(root: Path, stage: str) -> set[str]:
    from dvc.repo import Repo  # heavy: imported by the worker's run only

    with Repo(str(root)) as repo:
        (found,) = repo.stage.collect(stage)
        return {str(out.def_path) for out in found.outs if not out.use_cache}


def done_before(root: Path, env: dict[str, str], stage: str, lock: dict[str, Any], remote: list[str]) -> bool:
    """Step 3: whether the lock's entry for `stage` still holds (same code, params, command and inputs)
    and the remote has its outs: then they are checked out here and the stage need not run."""
    entry = lock.get("stages", {}).get(stage)
    if entry is None:
        return False
    produced = {out["path"] for other in lock["stages"].values() for out in other.get("outs", [])}
    inputs = [dep["path"] for dep in entry.get("deps", []) if dep["path"] in produced]
    pulled = subprocess.run(
        ["dvc", "pull", "--quiet", *remote, "--", *inputs, stage], cwd=root, env=env, capture_output=True
    )
    if pulled.returncode:  # not all of it in the remote: run the stage
        return False
    status = subprocess.run(
        ["dvc", "status", "--json", "--", stage],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    uncached = uncached_outs(root, stage)
    changes = json.loads(status.stdout or "{}").get(stage, [])
    return all(
        set(change) == {"changed outs"} and set(change["changed outs"]) <= uncached for change in changes
    )


def dvc(root: Path, env: dict[str, str], *args: str) -> list[str]:
    """A dvc command, its output in the run log; StageFailed with the tail of it when it fails."""
    return stream(
        ["dvc", *args], root, env, get_run_logger(), f"dvc {' '.join(a for a in args if a != '--')}"
    )


@flow(name="alignment-stage", flow_run_name="{stage}")
def stage_run(
    stage: str,
    revision: str | None = None,
    lock: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    remote: str | None = None,
) -> dict[str, Any]:
    """Reproduce one DVC stage in this worker's checkout, data in and out through the DVC remote.

    Args:
        stage: a dvc.yaml stage (`rm`, `rest_iter@2`).
        revision: the git commit the pipeline flow runs (default: this checkout as it is).
        lock: the flow's dvc.lock (at least the entries of the stage's upstream stages).
        overrides: the flow's dotted params overrides, written into params.yaml here too.
        parent_run_id: the pipeline's MLflow run; this stage's run nests under it.
        remote: a DVC remote name (default: the checkout's default remote).
    Returns: the stage, whether it ran, its dvc.lock entry, its metrics and where it ran.
    """

    logger = get_run_logger()
    check_parameters(stage, revision, lock, overrides, parent_run_id, remote)
    root = workspace()
    with workspace_lock(root, f"stage run {stage}", wait_seconds=60):
        return _reproduce(root, stage, revision, lock, overrides, parent_run_id, remote, logger)


def _reproduce(root, stage, revision, lock, overrides, parent_run_id, remote, logger) -> dict[str, Any]:
    # step 1. the flow's code and params (the overrides validated again, against the checked-out params)
    if revision:
        check_out(root, revision)
    if overrides:
        validated(root / "params.yaml", overrides)
        write_overrides(root / "params.yaml", overrides)
    # step 2. the upstream stages' lock entries
    if lock:
        write_lock(root, lock)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    remote_args = ["--remote", remote] if remote else []
    logger.info(
        "%s in %s on %s (MLflow: %s)",
        stage,
        root,
        socket.gethostname(),
        redact(env.get("MLFLOW_TRACKING_URI") or "unset"),
    )

    # step 3. done before (its outs in the remote at this lock)? Else pull its inputs and run it
    ran = False
    if done_before(root, env, stage, lock or {}, remote_args):
        logger.info("%s: up to date at the flow's lock; its outs are in the remote", stage)
    else:
        lines = dvc(root, env, "repro", "--single-item", "--pull", "--", stage)
        ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    # step 4. its outs (and the run cache) to the remote
    dvc(root, env, "push", *remote_args, "--", stage)
    dvc(root, env, "push", *remote_args, "--run-cache")

    # step 5. report
    entry = read_lock(root)["stages"].get(stage)
    if entry is None:
        raise StageFailed(f"{stage}: no entry in {root / 'dvc.lock'} after dvc repro")
    metrics_path = Paths(root).metrics(stage)
    result = {
        "stage": stage,
        "ran": ran,
        "lock": entry,
        # a stage not run here has no metrics here (they are not in the remote): the flow keeps its own
        "metrics": json.loads(metrics_path.read_text()) if ran and metrics_path.exists() else {},
        "host": socket.gethostname(),
        "workspace": str(root),
    }
    create_markdown_artifact(
        key=RESULT_KEY,
        markdown=f"## {stage}: {'ran' if ran else 'up to date'} in `{root}`\n\n```json\n"
        + json.dumps(result, indent=1, sort_keys=True)
        + "\n```\n",
        description=f"dvc.lock entry and metrics of {stage}",
    )
    return result


def parse_result(markdown: str) -> dict[str, Any]:
    """The result a `stage_run` reported, from its artifact's markdown."""
    body = markdown.split("```json\n", 1)[1].rsplit("\n```", 1)[0]
    return json.loads(body)
