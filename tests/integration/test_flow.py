"""The Prefect flow under the test harness: what it refuses before any stage, a failed stage failing the flow,
and the overrides' edits (the whole micro pipeline through the flow: test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from alignment.config import ConfigError
from flows.config import PipelineConfig
from flows.overrides import set_dotted, write_overrides
from flows.pipeline import pipeline
from tasks.dvc import StageFailed, WorkspaceBusy, workspace_lock
from tests.conftest import MICRO_PARAMS

# the micro pipeline's stages in DAG order, the foreach stage expanded to its items
STAGES = [
    member
    for s in PipelineConfig().stages
    for member in (
        [f"rest_iter@{k}" for k in MICRO_PARAMS["rest"]["iterations"]] if s == "rest_iter" else [s]
    )
]


@pytest.fixture(scope="module", autouse=True)
def harness():
    """One temporary Prefect server and database for the module (starting one costs seconds).

    Its telemetry is off: offline it only logs errors (DO_NOT_TRACK covers the client alone)."""
    # a generous start-up timeout: on 2 busy cores the temporary server can take more than the default 30 s
    with (
        temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield


def stage_runs(project: Path) -> tuple[list, list]:
    """(pipeline runs, stage runs) in the copy's own MLflow store."""
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags and "stage" in r.data.tags]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overrides": {"sft.train.learning_rate": -1.0}}, "sft.train.learning_rate"),
        ({"overrides": {"sft.train.lr": 0.1}}, "sft.train.lr"),
        ({"overrides": {"nope.x": 1}}, "nope.x"),
        ({"overrides": {"sft.max_length.x": 1}}, "sft.max_length.x"),
        ({"stages": ["prepare", "rlhf"]}, "rlhf"),
        # worker routing comes from the committed params only (flows/overrides.py)
        ({"overrides": {"workers.default_pool": "gpu"}}, "workers.default_pool: not allowed"),
        ({"overrides": {"workers.pools": {"sft": "gpu"}}}, "workers.pools: not allowed"),
        ({"overrides": {"workers.heartbeat_seconds": 10}}, "heartbeat_seconds"),  # Prefect's minimum: 30
        ({"params_file": "../params.yaml"}, "params_file"),  # a file of the caller's choosing
    ],
)
def test_invalid_input_fails_before_any_stage(project, kwargs, message):
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        pipeline(root=str(project), **kwargs)
    assert not (project / "outputs" / "data").exists() and not (project / "mlflow.db").exists()
    assert (project / "params.yaml").read_text() == before


def test_a_second_flow_in_one_workspace_refuses_and_nothing_mixes(project):
    """A sweep (or any flow) holds the workspace: a pipeline started meanwhile refuses before it writes
    its override into params.yaml, where the running flow's stages would read it."""
    before = (project / "params.yaml").read_text()
    with workspace_lock(project, "sweep"):
        with pytest.raises(WorkspaceBusy, match=r"pipeline: another flow is running .*sweep"):
            pipeline(root=str(project), overrides={"sft.train.learning_rate": 3e-4})
    assert (project / "params.yaml").read_text() == before
    assert not (project / "outputs" / "data").exists() and not (project / "mlflow.db").exists()


def test_failed_stage_fails_the_flow_with_its_output(project):
    dvc_yaml = project / "dvc.yaml"
    broken = "python -c \"raise SystemExit('disk full')\""
    dvc_yaml.write_text(dvc_yaml.read_text().replace("python -m alignment prepare", broken))
    with pytest.raises(StageFailed, match="disk full"):
        pipeline(stages=["prepare"], root=str(project))
    [parent], _ = stage_runs(project)
    assert parent.info.status == "FAILED"


def test_set_dotted_indexes_lists():
    params = {"prepare": {"sources": [{"limit": 1}]}}
    set_dotted(params, "prepare.sources.0.limit", 5)
    assert params == {"prepare": {"sources": [{"limit": 5}]}}


def test_write_overrides_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# top\nsft:\n  train:\n    learning_rate: 1.0e-3   # why this rate\n")
    write_overrides(params, {"sft.train.learning_rate": 3e-4, "sft.train.epochs": 2})
    assert params.read_text() == (
        "# top\nsft:\n  train:\n    learning_rate: 0.0003   # why this rate\n    epochs: 2\n"
    )
