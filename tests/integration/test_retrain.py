"""The scheduled-retraining flow under the Prefect test harness, on real `dvc exp run`s and a real MLflow
registry: the first run crowns a champion, a run that does not beat it leaves the alias alone, a failed
run leaves the registry untouched, and a second run cannot start while one holds the project."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from alignment import tracking
from flows.retrain import RetrainBusy, retrain, retraining_lock
from tasks.dvc import StageFailed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def harness():
    with (
        temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield


def registry(project) -> tuple[list[str], str | None]:
    """(every version of alignment-rest, the version @champion points at)."""
    mlflow.set_tracking_uri(tracking.tracking_uri(project))
    client = mlflow.MlflowClient()
    versions = sorted(str(v.version) for v in client.search_model_versions("name='alignment-rest'"))
    champion = tracking.alias_version("alignment-rest", "champion", project)
    return versions, champion and champion["version"]


def test_champion_moves_only_on_improvement_and_survives_failure(upstream_project, monkeypatch):
    project = upstream_project
    monkeypatch.chdir(project)
    (project / "data" / "incoming" / "week1.txt").write_text("My favourite film of\n")

    # 1. no champion yet: ReST starts from SFT and its best policy becomes the first champion
    first = retrain(root=str(project))
    assert first["promoted"] and first["previous_champion"] is None and "no champion yet" in first["why"]
    assert registry(project) == (["1"], "1")
    assert first["history"][0]["policy"] == "outputs/sft" and [r["iteration"] for r in first["history"]] == [
        0,
        1,
        2,
    ]
    grown = (project / "outputs/rest/1/grown.jsonl").read_text()
    assert "My favourite film of" in grown  # the incoming prompt was grown on
    exps = subprocess.run(
        ["dvc", "exp", "show", "--no-pager", "--csv"], cwd=project, capture_output=True, text=True
    ).stdout
    assert first["experiment"] in exps  # each run is a recorded DVC experiment

    # MLflow: one retrain run with the stages nested under it, tagged with the decision
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    [parent] = [r for r in runs if r.data.tags.get("kind") == "retrain"]
    nested = sorted(
        r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert nested == ["rest", "rest_iter@1", "rest_iter@2"]
    assert parent.data.tags["promoted"] == "True" and parent.data.tags["champion_version"] == "1"

    # 2. from the champion; a bar no policy clears (a mean gold log-odds up by 1000): the alias stays
    second = retrain(root=str(project), overrides={"retrain.min_improvement": 1000.0})
    assert second["history"][0]["policy"] == "outputs/champion" and second["previous_champion"] == "1"
    assert not second["promoted"] and "champion version 1 stays" in second["why"]
    assert registry(project) == (["1"], "1")
    assert first["experiment"] != second["experiment"]

    # 3. a failing run (a malformed prompt file): the flow fails, the registry is as it was
    (project / "data" / "incoming" / "week2.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(StageFailed, match="week2.jsonl, line 2"):
        retrain(root=str(project))
    assert registry(project) == (["1"], "1")

    # 4. later runs did not overwrite the first run's outputs: its DVC experiment brings back the policy
    #    that became version 1 (the workspace holds the second run's)
    (project / "data" / "incoming" / "week2.jsonl").unlink()

    def kept() -> tuple[str, bytes]:  # (where the kept run started, its best policy's weights)
        best = project / "outputs" / "rest_best"
        return (
            json.loads((best / "selection.json").read_text())["history"][0]["policy"],
            (best / "model.safetensors").read_bytes(),
        )

    champion = (
        tracking.load_registered_model("alignment-rest", version="1") / "model.safetensors"
    ).read_bytes()
    assert kept()[0] == "outputs/champion"
    applied = subprocess.run(
        ["dvc", "exp", "apply", first["experiment"]], cwd=project, capture_output=True, text=True
    )
    # this copy never ran dpo, ppo, ...: DVC reports those as missing and checks out everything else
    missing = applied.stderr.partition("Checkout failed for following targets:")[2]
    assert applied.returncode == 0 or ("outputs/rest" not in missing and "outputs/ppo" in missing), (
        applied.stderr
    )
    assert kept() == ("outputs/sft", champion)


def test_a_second_run_cannot_start_while_one_holds_the_project(upstream_project):
    # the lock is the server's (a global concurrency limit), not the folder's: held from anywhere, it
    # stops a run in this folder; released, the next run can take it
    with retraining_lock("alignment-retrain"), pytest.raises(RetrainBusy, match="another retraining run"):
        retrain(root=str(upstream_project))
    with retraining_lock("alignment-retrain"):
        pass
    assert registry(upstream_project) == ([], None)


def test_bad_overrides_fail_before_anything(upstream_project):
    from alignment.config import ConfigError

    with pytest.raises(ConfigError, match="rest.improve.steps"):
        retrain(root=str(upstream_project), overrides={"rest.improve.steps": 0})
    assert not (upstream_project / "outputs" / "rest").exists()
    listed = subprocess.run(
        ["dvc", "exp", "ls", "-A", "--name-only"], cwd=upstream_project, capture_output=True, text=True
    )
    assert listed.returncode == 0 and listed.stdout.strip() == ""  # no DVC experiment was started
