"""The attacks of issue 29, each refused with a clear error, without starting a server: parameters from the
UI are data, the registry fails closed, one flow per workspace, writes that a kill cannot tear, secrets out
of the record. (The same attacks against the live services: tests/integration/test_workers.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

from alignment import tracking
from alignment.config import ConfigError, LLMJudgeConfig
from alignment.evaluation.judging import JudgeFailed, build_llm_judge
from flows.overrides import check_allowed, for_logging, validated
from flows.retrain import CHAMPION_MARK, champion_folder
from flows.stage import check_parameters
from tasks.dvc import LOCK, WorkspaceBusy, workspace_lock
from tests.conftest import ROOT, write_params
from tests.integration import fake_openai as fake
from tests.integration.fake_openai import FakeOpenAI

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------- UI parameters are data
@pytest.mark.parametrize(
    "key, value",
    [
        # the judge-URL exfiltration: any host, and the AWS secret sent to it as the bearer token
        ("evaluate.llm_judge.openai.base_url", "http://attacker.example/v1"),
        ("evaluate.llm_judge.openai.api_key_env", "AWS_SECRET_ACCESS_KEY"),
        ("rlaif.judge.openai.base_url", "http://attacker.example/v1"),
        ("retrain.champion_dir", "../../home"),  # a folder fetch_champion would replace
        ("sft.model.trust_remote_code", True),  # runs a hub repository's Python
        ("sft.model.name_or_path", "someone/model-with-code"),
        ("prepare.sources.0.path", "/etc/passwd"),  # any local file into training data
        ("workers.default_pool", "cpu"),  # worker routing
        ("workers.pools", {"sft": "cpu"}),
        ("evaluate.models", {"x": "/srv/data"}),
        ("evaluate.llm_judge", {"backend": "openai"}),  # a whole section
        ("launch.stages", {"sft": {"launcher": "torchrun"}}),
        ("tracking.experiment", "other"),
    ],
)
def test_a_non_allow_listed_override_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"override {key}: not allowed from a flow run"):
        check_allowed({key: value})
    with pytest.raises(ConfigError, match="not allowed"):  # what the flows call first
        validated(ROOT / "params.yaml", {key: value})


def test_strengths_seeds_sizes_and_choices_may_be_overridden():
    overrides = {
        "dpo.beta": 0.3,
        "dpo.train.seed": 1,
        "sft.train.learning_rate": 3e-4,
        "prepare.sources.0.limit": 100,  # a list item's number
        "sweep.seeds": [0, 1],
        "brain.baseline": "none",  # a fixed choice
        "evaluate.llm_judge.backend": "transformers",  # which committed judge section to use
        "workers.stage_timeout_minutes": 5,
        "retrain.min_improvement": 0.5,
    }
    check_allowed(overrides)
    config = validated(ROOT / "params.yaml", overrides)
    assert config["dpo"].beta == 0.3 and config["sweep"].seeds == (0, 1)


@pytest.mark.parametrize(
    "key, message",
    [("nope.x", "unknown section"), ("sft.max_length.x", "no such key"), ("sft.train..x", "letters, digits")],
)
def test_an_unknown_override_key_is_named(key, message):
    with pytest.raises(ConfigError, match=message):
        check_allowed({key: 1})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"revision": "HEAD~1"}, "full commit id"),
        ({"revision": "--upload-pack=touch /tmp/pwned"}, "full commit id"),
        ({"revision": COMMIT[:12]}, "full commit id"),
        ({"stage": "sft; rm -rf /"}, "not a registered stage"),
        ({"stage": "nope"}, "not a registered stage"),
        ({"parent_run_id": "../../x"}, "parent_run_id"),
        ({"remote": "--config=x"}, "remote"),
        ({"lock": {"stages": {"rm": "not an entry"}}}, "lock"),
        ({"lock": {"stages": {}, "extra": 1}}, "lock"),
        ({"overrides": {"evaluate.llm_judge.openai.api_key_env": "AWS_SECRET_ACCESS_KEY"}}, "not allowed"),
    ],
)
def test_the_worker_refuses_malformed_stage_run_parameters(kwargs, message):
    """flows/stage.py checks what a flow run hands it (anyone who can start one could send these)."""
    parameters = {"stage": "rm", "revision": COMMIT, "lock": None, "overrides": None, "remote": None}
    parameters |= {"parent_run_id": None} | kwargs
    with pytest.raises(ConfigError, match=message):
        check_parameters(**parameters)


def test_well_formed_stage_run_parameters_pass():
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "python -m alignment prepare"}}}
    check_parameters("rest_iter@2", COMMIT, lock, {"dpo.beta": 0.2}, "a" * 32, "shared")
    check_parameters("rm", "b" * 64, None, None, None, None)  # a SHA-256 repository's commit


def test_champion_dir_stays_inside_the_workspace_and_only_a_made_folder_is_replaced(tmp_path):
    (tmp_path / "outputs" / "sft").mkdir(parents=True)
    (tmp_path / "outputs" / "sft" / "model.safetensors").write_text("weights")
    for bad in ("/srv/data", "../../home", "..", ".", "outputs/../.."):
        with pytest.raises(ConfigError, match="a folder inside"):
            champion_folder(tmp_path, bad)
    with pytest.raises(ConfigError, match="was not made by the retraining flow"):
        champion_folder(tmp_path, "outputs/sft")
    assert (tmp_path / "outputs" / "sft" / "model.safetensors").exists()
    assert champion_folder(tmp_path, "outputs/champion") == tmp_path / "outputs" / "champion"  # absent: fine
    (tmp_path / "outputs" / "champion").mkdir()
    (tmp_path / "outputs" / "champion" / CHAMPION_MARK).write_text("alignment-rest version 1\n")
    assert champion_folder(tmp_path, "outputs/champion").is_dir()  # made by the flow: replaceable


# ----------------------------------------------------------------------------- the registry
@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A real MLflow sqlite store (its own artifact folder) in the test's folder."""
    monkeypatch.chdir(tmp_path)  # the default store: mlflow.db and mlartifacts/ here
    return tmp_path


def register(store: Path, name: str, alias: str | None = None) -> str:
    """A version of `name` made as the pipeline makes one (a tiny saved policy, registered as an MLflow
    transformers chat model)."""
    model = store / "hf"
    if not model.is_dir():
        from alignment.config import ModelConfig
        from alignment.models.loading import build_model, save_pretrained, train_tokenizer

        tokenizer = train_tokenizer(["a tiny model for the registry"] * 20, vocab_size=300, min_frequency=1)
        tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(0)
        config = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32)
        save_pretrained(build_model(config, tokenizer), tokenizer, model)
    with tracking.mlflow_stage_run("test", "security", store) as log:
        version = log.register_model(model, name)
    if alias:
        import mlflow

        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version


@pytest.mark.slow
def test_a_forged_artifact_path_is_refused_and_nothing_outside_is_touched(store):
    version = register(store, "alignment-rest", alias="champion")
    victim = store / "victim"
    victim.mkdir()
    (victim / "data").write_text("precious")
    # the attacker rewrites the version's MLmodel (anyone who could create versions could write one)
    (mlmodel,) = list(store.rglob("MLmodel"))  # in the store's artifact folder
    for forged in ("../../../../victim", str(victim)):
        text = YAML(typ="safe").load(mlmodel.read_text())
        text["flavors"]["transformers"]["model_binary"] = forged
        with open(mlmodel, "w") as handle:
            YAML(typ="safe").dump(text, handle)
        download = store / f"download-{len(forged)}"
        download.mkdir()
        with pytest.raises(tracking.RegistryError, match="artifact path"):
            tracking.load_registered_model("alignment-rest", version=version, dst=download)
    assert (victim / "data").read_text() == "precious"


@pytest.mark.slow
def test_the_champion_lookup_fails_closed_and_the_alias_moves_only_from_where_it_was(store):
    assert tracking.alias_version("alignment-rest", "champion", store) is None  # no model: no champion
    first = register(store, "alignment-rest")
    assert tracking.alias_version("alignment-rest", "champion", store) is None  # no alias: no champion
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias("alignment-rest", "champion", first)
    assert tracking.alias_version("alignment-rest", "champion", store)["version"] == first

    # the run compared against "no champion", but the alias moved meanwhile: nothing is promoted
    with tracking.mlflow_stage_run("retrain", "security", store) as log:
        with pytest.raises(tracking.RegistryError, match="moved during the run"):
            tracking.promote(log.run_id, store / "hf", "alignment-rest", "champion", {}, store, expected=None)
    assert tracking.alias_version("alignment-rest", "champion", store)["version"] == first
    versions = mlflow.MlflowClient().search_model_versions("name='alignment-rest'")
    assert [v.version for v in versions] == [int(first)]  # the new version was deleted again


def test_a_registry_that_cannot_answer_is_not_no_champion(tmp_path, monkeypatch):
    """A store that errors (here a database file that is not one) fails the lookup: before, every error
    read as "no champion" and the retraining promoted whatever it made."""
    broken = tmp_path / "mlflow.db"
    broken.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{broken}")
    with pytest.raises(tracking.RegistryError, match="alignment-rest@champion"):
        tracking.alias_version("alignment-rest", "champion", tmp_path)


# ----------------------------------------------------------------- one flow per workspace, atomic writes
HOLD = """
import sys, time
from pathlib import Path
from tasks.dvc import workspace_lock
with workspace_lock(Path(sys.argv[1]), "sweep"):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says so
    time.sleep(1)
"""


@pytest.mark.slow
def test_a_second_flow_on_one_workspace_refuses_or_waits(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkspaceBusy, match=r"pipeline: another flow is running .*\"flow\": \"sweep\""):
        with workspace_lock(tmp_path, "pipeline"):
            pass
    holder.stdin.write("release\n")
    holder.stdin.flush()
    with workspace_lock(tmp_path, "pipeline", wait_seconds=60):  # waits for the holder to let go
        assert '"flow": "pipeline"' in (tmp_path / LOCK).read_text()
    assert holder.wait() == 0


WRITE_FOREVER = """
import sys, time
from pathlib import Path
from flows.overrides import write_overrides
from flows.stage import write_lock
path, kind = Path(sys.argv[1]), sys.argv[2]
big = [f"item-{i:06d}" for i in range(12000)]  # long enough a write to kill in the middle
for i in range(10**9):
    started = time.perf_counter()
    value = big if i % 2 else big[::-1]
    if kind == "params":
        write_overrides(path / "params.yaml", {"sweep.seeds": value})
    else:
        write_lock(path, {"schema": "2.0", "stages": {"rm": {"cmd": "x", "outs": value}}})
    if i == 0:
        print(time.perf_counter() - started, flush=True)  # how long one write takes
"""


def read_back(folder: Path, kind: str) -> list:
    if kind == "params":
        return YAML(typ="safe").load((folder / "params.yaml").read_text())["sweep"]["seeds"]
    entry = YAML(typ="safe").load((folder / "dvc.lock").read_text())["stages"].get("rm") or {}
    return entry.get("outs", [])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["params", "lock"])
def test_sigkill_during_a_params_or_lock_write_leaves_a_whole_file(tmp_path, kind):
    big = [f"item-{i:06d}" for i in range(12000)]
    if kind == "params":
        write_params(tmp_path / "params.yaml", {"sweep": {"seeds": big}})
    else:
        (tmp_path / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {}}))
    whole = [big, big[::-1]] + ([] if kind == "params" else [[]])
    for fraction in (0.3, 0.7):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITE_FOREVER, str(tmp_path), kind], cwd=ROOT, stdout=subprocess.PIPE
        )
        one_write = float(writer.stdout.readline())
        time.sleep(fraction * one_write)  # into the second write
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert read_back(tmp_path, kind) in whole  # the old file or the new one, never a part nor empty


# ----------------------------------------------------------------------------------- the record
def test_secrets_are_dropped_and_url_credentials_masked_before_logging():
    params = {
        "judge.api_key_env": "OPENAI_API_KEY",
        "judge.token": "t",
        "remote": "https://user:s3cret@dvc.example/store",
        "samples.max_new_tokens": 48,
    }
    assert tracking.loggable(params) == {
        "remote": "https://***@dvc.example/store",
        "samples.max_new_tokens": 48,
    }
    assert (
        tracking.redact("git fetch https://x-token:ghp_abc@host/r failed")
        == "git fetch https://***@host/r failed"
    )
    # overrides are logged one param each, through the same filter (not one JSON string past it)
    logged = tracking.loggable(for_logging({"dpo.beta": 0.1, "evaluate.llm_judge.openai.api_key_env": "X"}))
    assert logged == {"override.dpo.beta": "0.1"}


def test_a_judge_that_is_down_fails_the_stage_instead_of_nan_win_rates():
    cfg = LLMJudgeConfig(
        backend="openai",
        openai={"base_url": "http://127.0.0.1:1/v1", "model": "judge", "api_key_env": None},
        min_valid_fraction=0.5,
    )
    with FakeOpenAI(fake.failing(500)) as server:
        cfg = cfg.model_copy(
            update={"openai": cfg.openai.model_copy(update={"base_url": server.base_url, "max_retries": 0})}
        )
        judge = build_llm_judge(cfg, "imdb", root=ROOT)
        with pytest.raises(JudgeFailed, match="0 of 2 comparisons got a valid verdict"):
            judge.compare(["Opening:", "Another:"], ["great", "fine"], ["bad", "dull"])


def test_a_run_no_worker_takes_or_that_runs_too_long_is_given_up_with_its_pool_named():
    from prefect.states import Pending, Running, Scheduled

    from flows.config import WorkersConfig
    from flows.workers import overdue

    cfg = WorkersConfig(default_pool="gpu", start_timeout_minutes=1, stage_timeout_minutes=10)
    assert overdue(Scheduled(), 59, cfg, "sft") is None
    assert "no worker of pool gpu took it" in overdue(Scheduled(), 61, cfg, "sft")
    assert "no worker of pool gpu took it" in overdue(Pending(), 61, cfg, "sft")
    assert overdue(Running(), 599, cfg, "sft") is None  # started: the stage timeout counts
    assert "stage_timeout_minutes=10" in overdue(Running(), 601, cfg, "sft")
    assert WorkersConfig().stage_timeout_minutes is not None  # finite by default
