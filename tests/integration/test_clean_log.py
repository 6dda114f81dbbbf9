"""A stage's log is for its reader: its own lines, one progress bar, library warnings only. Run as DVC
runs it (`python -m alignment sft`, MLflow on): training with checkpoints, samples, registration."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys

import pytest
from conftest import MICRO_PARAMS, ROOT, write_params

from alignment.paths import Paths
from flows.config import parse

pytestmark = pytest.mark.slow  # a subprocess


def test_a_stage_log_has_no_library_chatter_and_one_progress_bar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")
    params = copy.deepcopy(MICRO_PARAMS)
    params["sft"]["train"]["checkpoint_every"] = 2  # accelerate's chatter is per checkpoint file
    write_params(tmp_path / "params.yaml", params)
    for stage in ("prepare", "tokenizer"):
        importlib.import_module(f"alignment.stages.{stage}").run(
            parse(stage, params[stage]), Paths(tmp_path), None
        )

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "alignment", "sft"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "registered alignment-sft version 1" in log and (tmp_path / "checkpoints/sft/latest.json").exists()
    # no warning may come from the project's calls (the sampler passes transformers 5's `cache`)
    warnings = [line for line in log.splitlines() if "Warning" in line]
    assert not warnings, warnings
    for chatter in (
        "INFO accelerate",
        "Removed shared tensor",
        "INFO mlflow",
        "Loading weights",
        "Writing model",
    ):
        assert chatter not in log, chatter
    assert "Downloading artifacts" not in log and "train: 100%" in log
