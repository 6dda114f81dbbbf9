"""Registered models travel: each version loads with plain MLflow in a process that cannot import this
project (another working directory, the project off sys.path), as a chat model (policies, a LoRA adapter on
the registered SFT version) or a scoring pyfunc (the reward model) whose scores are the project's own;
identical weights are registered again without a copy; requirements carry no local build tags."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from alignment import tracking
from alignment.config import LoraConfig, ModelConfig
from alignment.models.loading import (
    build_model,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
    train_tokenizer,
)
from alignment.models.lora import add_adapter, save_adapter
from alignment.models.reward_model import RewardScorer

pytestmark = pytest.mark.slow  # a subprocess
ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The film was wonderful.", "A dull, lifeless plot.", "\n\nHuman: hi\n\nAssistant: hello"] * 20
PROMPTS = ["The film was", "\n\nHuman: Any good?\n\nAssistant:"]
RESPONSES = [" wonderful, I loved it.", " No."]

# Run by the venv's python where `import alignment` fails: the editable install's finder and every
# sys.path entry inside the project (but its .venv, where CI keeps the packages) are gone, and the working
# directory is elsewhere.
CLEAN = """
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "alignment_pipeline" not in repr(f)]
sys.path[:] = [p for p in sys.path if p and (not p.startswith({root!r}) or p.startswith({venv!r}))]
assert importlib.util.find_spec("alignment") is None, "the project is importable"
import mlflow, pandas as pd
chat = {{"messages": [{{"role": "user", "content": "The film was"}}], "max_tokens": 4}}
out = {{}}
for uri in {policies!r}:
    answer = mlflow.pyfunc.load_model(uri).predict(chat)
    pipeline = mlflow.transformers.load_model(uri)
    out[uri] = {{"object": answer[0]["object"], "pipeline": type(pipeline.model).__name__}}
scores = mlflow.pyfunc.load_model("models:/alignment-rm/1").predict(pd.DataFrame({rows!r}))
out["rm"] = [float(s) for s in scores]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A project folder holding outputs/sft (a tiny GPT-2), outputs/dpo (a LoRA adapter on it) and
    outputs/rm (a mean-pooled reward model), each registered from its stage's run, the SFT weights
    also as `alignment-rest`, version 1 of which is `@champion`. Returns the folder."""
    project = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(project)  # the stages' working directory: the project root
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, max_position_embeddings=64)
        save_pretrained(build_model(cfg, tokenizer), tokenizer, project / "outputs/sft")
        policy = add_adapter(load_causal_lm("outputs/sft"), LoraConfig(r=2, alpha=4))
        torch.nn.init.normal_(policy.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight)
        save_adapter(policy, tokenizer, project / "outputs/dpo")
        rm = load_sequence_classifier(project / "outputs/sft")
        rm.config.reward_pooling = "mean"
        save_pretrained(rm, tokenizer, project / "outputs/rm")
        for stage, name, kind in [
            ("sft", "alignment-sft", "causal_lm"),
            ("dpo", "alignment-dpo", "causal_lm"),
            ("rm", "alignment-rm", "reward"),
            ("sft", "alignment-rest", "causal_lm"),  # the same weights under another name
        ]:
            with tracking.mlflow_stage_run(stage, root=project) as log:
                scoring = {"max_length": 48} if kind == "reward" else None  # the RM stage passes its own
                assert (
                    log.register_model(project / "outputs" / stage, name, kind=kind, scoring=scoring) == "1"
                )
        tracking._mlflow(project).MlflowClient().set_registered_model_alias("alignment-rest", "champion", "1")
    return project


@pytest.fixture
def in_project(registry, monkeypatch) -> Path:
    monkeypatch.chdir(registry)  # the MLflow store the functions under test find
    return registry


def test_identical_weights_are_registered_once_and_adapters_as_adapters(in_project):
    project = in_project
    mlflow = tracking._mlflow(project)
    client = mlflow.MlflowClient()
    [sft], [rest] = (client.search_model_versions(f"name='{n}'") for n in ("alignment-sft", "alignment-rest"))
    assert rest.source == sft.source
    # whole weights stored twice: the SFT model (registered as sft and rest) and the reward model
    assert len(list((project / "mlartifacts").rglob("model.safetensors"))) == 2
    # the adapter is logged as an adapter, naming its base by the registered SFT version
    dpo = Path(mlflow.artifacts.download_artifacts("models:/alignment-dpo/1"))
    adapter = json.loads((dpo / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "models:/alignment-sft/1"
    assert not (dpo / "model").exists() and (dpo / "peft" / "adapter_model.safetensors").is_file()
    # the reward pyfunc scores at the length its stage trained at, not at a default
    rm = mlflow.models.Model.load("models:/alignment-rm/1").flavors["python_function"]
    assert rm["config"]["max_length"] == 48
    for name in ("alignment-sft", "alignment-dpo", "alignment-rm"):
        requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1/requirements.txt"))
        pins = requirements.read_text().split()
        assert "torch" in " ".join(pins) and not any("+" in pin for pin in pins), pins


def test_registered_models_load_without_the_project(in_project):
    project = in_project
    policies = ["models:/alignment-sft/1", "models:/alignment-dpo/1", "models:/alignment-rest@champion"]
    rows = {"prompt": PROMPTS, "response": RESPONSES}
    elsewhere = project / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(project)
    script = CLEAN.format(root=str(ROOT), venv=str(ROOT / ".venv"), policies=policies, rows=rows)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    for uri in policies:
        assert loaded[uri]["object"] == "chat.completion", loaded
    assert loaded["models:/alignment-dpo/1"]["pipeline"].startswith("Peft")
    # the pyfunc scores as the project's scorer does
    expected = RewardScorer(project / "outputs/rm", max_length=48)(PROMPTS, RESPONSES, [True, True])
    torch.testing.assert_close(torch.tensor(loaded["rm"]), expected, atol=1e-5, rtol=1e-5)


def test_registered_versions_come_back_as_the_folders_that_were_saved(in_project):
    """What the retraining flow starts from: the registered champion, as a folder the stages load."""
    project = in_project
    ids = torch.tensor([load_tokenizer(project / "outputs/sft")("The film was wonderful").input_ids])
    for name in ("sft", "dpo"):
        local = tracking.load_registered_model(f"alignment-{name}", version="1")
        assert not load_tokenizer(local).chat_template  # the HH template was the logged copy's only
        torch.testing.assert_close(
            load_causal_lm(local)(ids).logits, load_causal_lm(project / f"outputs/{name}")(ids).logits
        )
    champion = tracking.load_registered_model("alignment-rest", alias="champion")
    assert (champion / "model.safetensors").read_bytes() == (
        project / "outputs/sft/model.safetensors"
    ).read_bytes()
    rm = tracking.load_registered_model("alignment-rm")
    flags = [True, False]
    torch.testing.assert_close(
        RewardScorer(rm)(PROMPTS, RESPONSES, flags),
        RewardScorer(project / "outputs/rm")(PROMPTS, RESPONSES, flags),
    )


def test_mlflow_models_serve_serves_the_champion_as_a_chat_model(in_project, tmp_path):
    """`mlflow models serve` on loopback, as docs/models.md shows it, answers an OpenAI-style chat request."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(in_project), "HF_HUB_OFFLINE": "1"}
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/alignment-rest@champion",
    ]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
        request = {"messages": [{"role": "user", "content": "The film was"}], "max_tokens": 8}
        reply = urllib.request.urlopen(
            urllib.request.Request(
                f"{url}/invocations", json.dumps(request).encode(), {"Content-Type": "application/json"}
            ),
            timeout=30,
        )
        answer = json.loads(reply.read())
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer["object"] == "chat.completion", answer
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
