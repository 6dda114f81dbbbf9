"""The micro pipeline for real, once: every stage of the default pipeline through the Prefect flow (each a
`dvc repro` of the stage), then DVC finds it up to date, shows its metrics and plots, re-runs exactly what a
changed param reaches, and MLflow holds every stage run, the leaderboard's child runs and the registered
models, which load back."""

import json
import re
import subprocess

import pytest
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from ruamel.yaml import YAML

from alignment import registry, tracking
from alignment.models.loading import load_causal_lm
from alignment.paths import Paths
from flows.config import PipelineConfig
from flows.pipeline import pipeline
from tests.conftest import MICRO_PARAMS, ROOT, copy_project


def dvc(project, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@-]+)'", output)


def expand(stages) -> list[str]:
    """Stage names as DVC runs them: the foreach stage as its micro items."""
    items = [f"rest_iter@{k}" for k in MICRO_PARAMS["rest"]["iterations"]]
    return [member for s in stages for member in (items if s == "rest_iter" else [s])]


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that reads its outputs, directly or through others (the registry's reads;
    `rest` reads the iterations' folder)."""
    found = {stage}
    while True:
        more = {
            name
            for name, s in registry.STAGES.items()
            if name not in found and (set(s.reads) & found or ("rest_iter" in found and name == "rest"))
        }
        if not more:
            return sorted(found)
        found |= more


def test_dvc_yaml_names_the_paths_the_stages_write():
    stages = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = Paths()
    declared = {
        name: {
            next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots")
            for o in stage.get(key, [])
        }
        for name, stage in stages.items()
    }
    assert str(paths.data) in declared["prepare"] and str(paths.metrics("prepare")) in declared["prepare"]
    assert str(paths.tokenizer) in declared["tokenizer"]
    assert {
        str(paths.sft),
        str(paths.metrics("sft")),
        str(paths.checkpoints("sft")),
        str(paths.plots("sft") / "train.csv"),
        str(paths.plots("sft") / "eval.csv"),
    } <= declared["sft"]
    iteration = stages["rest_iter"]["do"]
    assert iteration["cmd"] == "python -m alignment rest_iter --iteration ${key}"
    assert iteration["outs"] == ["outputs/rest/${key}"] and "${item}" in iteration["deps"]
    assert (
        str(paths.rest(2)) == "outputs/rest/2"
        and str(paths.metrics("rest_iter@2")) == "metrics/rest_iter_2.json"
    )
    assert str(paths.rest_best) in declared["rest"] and "outputs/rest_best" in stages["evaluate"]["deps"]
    for name, stage in stages.items():
        if name == "rest_iter":
            assert stage["do"]["params"] == ["rest"]
            continue
        assert stage["cmd"] == f"python -m alignment {name}" and stage["params"] == [name]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The flow over every stage of the default pipeline in a fresh copy of the project (a temporary Prefect
    server for the module; its telemetry off): (project, the flow's results)."""
    import copy

    project = copy_project(tmp_path_factory.mktemp("pipeline") / "project", copy.deepcopy(MICRO_PARAMS))
    with (
        temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        results = pipeline(root=str(project))
        again = pipeline(stages=["sft", "prepare"], root=str(project))  # out of order; nothing to do
    return project, results, again


@pytest.mark.slow
def test_the_flow_runs_every_stage_once_in_dag_order(pipeline_run):
    project, first, again = pipeline_run
    members = expand(PipelineConfig().stages)
    assert list(first) == members
    assert all(result["ran"] for result in first.values())
    assert first["sft"]["metrics"] and (project / "outputs" / "sft").is_dir()
    assert list(again) == ["prepare", "sft"] and not any(r["ran"] for r in again.values())

    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(project))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "stage" in r.data.tags]
    assert len(parents) == 2 and parents[0].data.params["stages"] in (",".join(members), "prepare,sft")
    assert sorted(r.data.tags["stage"] for r in children) == sorted(members)
    first_parent = next(p for p in parents if p.data.params["stages"] == ",".join(members))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {first_parent.info.run_id}


@pytest.mark.slow
def test_dvc_finds_it_up_to_date_and_reruns_what_a_param_reaches(pipeline_run):
    project, _, _ = pipeline_run
    assert ran(dvc(project, "repro", "evaluate")) == []  # evaluate and everything it reads: nothing to do
    assert "up to date" in dvc(project, "status", "evaluate")
    # one DPO param changed as an experiment: DPO and what reads it re-run, nothing upstream or beside
    exp = dvc(project, "exp", "run", "-S", "dpo.beta=0.2", "evaluate")
    assert sorted(ran(exp)) == sorted(expand(downstream("dpo")))
    assert "0.2" in dvc(project, "exp", "show", "--no-pager", "--csv")


@pytest.mark.slow
def test_outputs_metrics_plots_and_the_registry(pipeline_run, monkeypatch):
    project, _, _ = pipeline_run
    monkeypatch.chdir(project)  # the project's own MLflow store
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(project))
    runs = mlflow.search_runs(experiment_names=[MICRO_PARAMS["tracking"]["experiment"]])
    # outputs: safetensors model that loads back, metrics and plots DVC can show
    assert (project / "outputs/sft/model.safetensors").exists()
    assert load_causal_lm(project / "outputs/sft").config.n_embd == 32
    metrics = json.loads(dvc(project, "metrics", "show", "--json"))
    assert any("eval/loss" in json.dumps(v) for v in metrics.values())
    plots = dvc(project, "plots", "show", "--json")
    assert "plots/sft/train.csv" in plots

    # MLflow holds every stage run, nested under the pipeline run, and every model
    assert set(expand(PipelineConfig().stages)) <= set(runs["tags.stage"].dropna())
    evaluated = runs[runs["tags.kind"] == "evaluation"]
    models = ["sft", *registry.POLICY_STAGES, "best_of_2"]
    assert sorted(evaluated["tags.model"]) == sorted(models) or sorted(evaluated["tags.model"]) == sorted(
        models * 2
    )  # twice once the DPO experiment of the test beside re-ran evaluate
    board = json.loads((project / "outputs/evaluate/leaderboard.json").read_text())
    assert [m["model"] for m in board["models"]] == models
    selection = json.loads((project / "outputs/rest_best/selection.json").read_text())
    assert [r["iteration"] for r in selection["history"]] == [0, 1, 2] and selection["why"]
    assert '"rest_iterations"' in dvc(project, "plots", "show", "--json")
    shown = dvc(project, "metrics", "show", "--json")
    assert "metrics/evaluate.json" in shown and "gold/win_rate_ci_low" in shown
    plots = dvc(project, "plots", "show", "--json")
    assert '"reward_kl_frontier"' in plots and '"win_rates"' in plots
    sft_run = runs[runs["tags.stage"] == "sft"].iloc[-1]  # the first
    assert sft_run["params.train.batch_size"] == "4" and sft_run["tags.data_hash"]
    history = mlflow.MlflowClient().get_metric_history(sft_run["run_id"], "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(sft_run["run_id"], "plots")}
    assert artifacts == {"plots/sft_loss.png"}
    local = tracking.load_registered_model("alignment-sft", version="1")
    assert (local / "model.safetensors").exists()
    assert load_causal_lm(local).num_parameters() == load_causal_lm(project / "outputs/sft").num_parameters()
    # the registered MLflow model itself serves: a chat model (docs/models.md)
    pyfunc = mlflow.pyfunc.load_model("models:/alignment-sft/1")
    answer = pyfunc.predict({"messages": [{"role": "user", "content": "The film was"}], "max_tokens": 3})
    assert answer[0]["choices"][0]["message"]["role"] == "assistant"
    import pandas as pd

    rm_pyfunc = mlflow.pyfunc.load_model("models:/alignment-rm/1")
    scores = rm_pyfunc.predict(
        pd.DataFrame({"prompt": ["The film was"] * 2, "response": [" great.", " awful."]})
    )
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    dpo_metrics = json.loads((project / "metrics/dpo.json").read_text())
    assert {"gold/reward", "gold/sft_reward", "objective/kl", "rewards/margins"} <= {
        k.removeprefix("eval/") for k in dpo_metrics
    }
    brain_metrics = json.loads((project / "metrics/brain.json").read_text())
    assert {"gold/reward", "rm/win_rate_vs_sft", "objective/kl", "eval/brain/ess"} <= set(brain_metrics)
    assert (tracking.load_registered_model("alignment-brain", version="1") / "model.safetensors").exists()
    assert {"brain_variance", "ppo_training"} <= set(json.loads(plots)["data"])  # top-level plots of dvc.yaml
    ppo_metrics = json.loads((project / "metrics/ppo.json").read_text())
    assert {
        "gold/reward",
        "rm/win_rate_vs_sft",
        "objective/kl",
        "generation_seconds",
        "training_seconds",
    } <= set(ppo_metrics)
    for name in ("grpo", "rloo"):  # the group-baseline stages: TRL's metric names, held-out comparison
        group_metrics = json.loads((project / f"metrics/{name}.json").read_text())
        assert {
            "gold/reward",
            "gold/win_rate_vs_sft",
            "rm/win_rate_vs_sft",
            "objective/kl",
            "train/reward",
            "train/reward_std",
            "train/frac_reward_zero_std",
            "train/kl",
            "train/clip_ratio/region_mean",
            "train/completions/mean_length",
            "train/entropy",
            "generation_seconds",
        } <= set(group_metrics), name
        assert group_metrics["batches"] == 4
        assert (
            tracking.load_registered_model(f"alignment-{name}", version="1") / "model.safetensors"
        ).exists()
    assert "plots/grpo/train.csv" in plots and "plots/rloo/train.csv" in plots
