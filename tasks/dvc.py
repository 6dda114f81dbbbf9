"""One Prefect task per DVC stage: `dvc repro <stage>` in a subprocess, its output in the run log.

The task does not cache or re-implement anything: DVC's lock file decides whether the stage runs, and
the stage's own process logs to MLflow (nested under the pipeline run through ALIGNMENT_PARENT_RUN_ID).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.paths import Paths
from alignment.tracking import PARENT_RUN_ENV, redact

BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    """`dvc repro` exited non-zero; the message ends with the tail of its output."""


class WorkspaceBusy(RuntimeError):
    """Another flow holds the workspace's lock."""


LOCK = ".dvc/tmp/alignment-workspace.lock"


@contextmanager
def workspace_lock(root: Path, what: str, wait_seconds: float = 0.0) -> Iterator[None]:
    """The workspace's one lock, which every flow that edits or runs in a DVC workspace (pipeline, stage
    run, sweep, retraining; `serve` runs those) holds for its whole run: they all write params.yaml and
    dvc.lock and run `dvc repro` there, so two at once mix params (one's edit lands in the other's stage)
    and locks. An exclusive `flock` on `.dvc/tmp/alignment-workspace.lock`, released when the block (or
    the process) ends; a second flow waits up to `wait_seconds`, then raises WorkspaceBusy naming the
    holder. One workspace, one machine: across machines the Prefect concurrency limits hold."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: the holder is written in it
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text().strip() or "unknown"
                    raise WorkspaceBusy(
                        f"{what}: another flow is running in {root} ({holder}); one flow at a time per "
                        f"workspace (lock {path})"
                    ) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        os.ftruncate(descriptor, 0)
        holder = {"flow": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def stream(
    command: list[str], cwd: Path, env: dict[str, str], logger, what: str, hide: tuple[str, ...] = ()
) -> list[str]:
    """Run `command`, each line of its output into `logger` as it comes (but lines starting with one of
    `hide`: progress bars stay in the stage's own log); its lines, or StageFailed("<what> exited with
    <code>") and the last 40 of them."""
    lines: list[str] = []
    with subprocess.Popen(
        command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        for line in process.stdout:
            if line := redact(line.rstrip()):  # a URL's credentials never reach a log
                lines.append(line)
                if not (hide and line.startswith(hide)):
                    logger.info(line)
    if process.returncode:
        tail = "\n".join(lines[-40:])
        raise StageFailed(f"{what} exited with {process.returncode}:\n{tail}")
    return lines


# retries=0: a failed training stage is expensive to repeat and usually fails the same way again;
# the flow's `retries` parameter raises it for flaky environments. NO_CACHE: DVC is the only cache.
@task(task_run_name="dvc repro {stage}", retries=0, cache_policy=NO_CACHE)
def repro_stage(stage: str, root: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Reproduce one DVC stage (and any out-of-date stage upstream of it) in the project at `root`."""
    logger = get_run_logger()
    # this venv's bin first: both `dvc` and the stage command `python -m alignment ...` resolve there
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    lines = stream(["dvc", "repro", "--", stage], Path(root), env, logger, f"dvc repro {stage}")
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    metrics = Paths(Path(root)).metrics(stage)
    return {
        "stage": stage,
        "ran": ran,
        "metrics": json.loads(metrics.read_text()) if metrics.exists() else {},
    }
