"""A stage process killed with SIGKILL leaves no MLflow run RUNNING forever: the re-run continues the run
when it resumes from that run's checkpoint, and marks it KILLED otherwise."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import MICRO_PARAMS, write_params


def start(project: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.Popen(
        [sys.executable, "-m", "alignment", stage],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, (
            f"the stage ended before it could be killed: {process.stderr.read()[-2000:]}"
        )
        assert time.monotonic() < deadline, "the stage never got there"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def finish(project: Path, stage: str) -> None:
    process = start(project, stage)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def runs(project: Path, stage: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("stage") == stage
    ]


@pytest.fixture
def workspace(upstream, tmp_path) -> Path:
    """The micro upstream outputs (data, SFT, gold, pairs, RM) with a params file whose DPO runs long
    enough to be killed between its checkpoints."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "data").symlink_to(upstream / "data")
    shutil.copytree(upstream / "outputs", root / "outputs")
    params = copy.deepcopy(MICRO_PARAMS)
    params["dpo"]["train"] |= {"epochs": 10, "max_steps": 24, "checkpoint_every": 2, "log_every": 1}
    write_params(root / "params.yaml", params)
    return root


@pytest.mark.slow
def test_killed_stage_continues_its_run_from_the_checkpoint(workspace):
    kill_when(start(workspace, "dpo"), lambda: (workspace / "checkpoints/dpo/latest.json").exists())
    [killed] = runs(workspace, "dpo")
    assert killed.info.status == "RUNNING"  # what the UI showed before: forever

    finish(workspace, "dpo")
    [run] = runs(workspace, "dpo")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1"
    steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 25))  # the curve goes on from the resumed step, every step present


@pytest.mark.slow
def test_killed_stage_without_checkpoint_is_marked_killed(workspace):
    ledger = workspace / "checkpoints/.runs/pairs.json"
    kill_when(start(workspace, "pairs"), ledger.exists)
    finish(workspace, "pairs")
    statuses = sorted(r.info.status for r in runs(workspace, "pairs"))
    assert statuses == ["FINISHED", "KILLED"]
    assert not ledger.exists()
    assert json.loads((workspace / "metrics/pairs.json").read_text())["train/pairs"] > 0
