"""Shared fixtures: offline environment, micro params, and a throw-away copy of the project."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from alignment import registry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's dvc, prefect and mlflow executables

# Small enough that prepare -> tokenizer -> sft runs in a few seconds on 2 cores.
MICRO_PARAMS = {
    "prepare": {
        "seed": 0,
        "eval_fraction": 0.1,
        "test_fraction": 0.1,
        "max_chars": 1500,
        "sources": [
            {
                "name": "imdb",
                "kind": "text",
                "path": "data/embedded/imdb_reviews.jsonl.gz",
                "prompt_words": 8,
                "limit": 120,
            },
            {"name": "hh", "kind": "hh", "path": "data/embedded/hh_pairs.jsonl.gz", "limit": 80},
        ],
    },
    "tokenizer": {"source": "train", "vocab_size": 320, "min_frequency": 2},
    "sft": {
        "model": {
            "init": "config",
            "arch": "gpt2",
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "max_position_embeddings": 64,
            "dropout": 0.0,
        },
        "max_length": 64,
        "eval_max_examples": 16,
        "train": {
            "seed": 0,
            "epochs": 1,
            "max_steps": 4,
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 1.0e-3,
            "warmup_steps": 1,
            "lr_schedule": "cosine",
            "log_every": 1,
            "eval_every": 2,
            "checkpoint_every": 2,
            "resume": True,
        },
        "samples": {"num_prompts": 2, "max_new_tokens": 8, "temperature": 0.7},
        "register_as": "alignment-sft",
    },
    "gold": {"c": 4.0, "seed": 0},
    "pairs": {
        "source": "imdb",
        "train_prompts": 8,
        "eval_prompts": 4,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "seed": 0,
    },
    "rm": {
        "max_length": 64,
        "data": {"sources": ["imdb_pairs", "prepared"], "max_eval_pairs": 8},
        "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
    },
    "dpo": {
        "max_length": 64,
        "eval_prompts": 4,
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
        "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 2},
    },
    "brain": {
        "train_prompts": 8,
        "eval_prompts": 3,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "max_length": 64,
        "proposal": {"refresh_every": 2, "policy_fraction": 0.34},
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
        "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
    },
    "brain_variance": {"proposal_means": [0.0, 0.5, 1.0], "estimates": 200},
    "ppo": {
        "train_prompts": 8,
        "eval_prompts": 3,
        "max_new_tokens": 8,
        "max_length": 64,
        "rollouts": 4,
        "rollout_batch_size": 4,
        "minibatch_size": 2,
        "ppo_epochs": 2,
        "train": {"checkpoint_every": 2},
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
    },
    "grpo": {
        "train_prompts": 8,
        "eval_prompts": 3,
        "max_new_tokens": 8,
        "max_length": 64,
        "samples_per_prompt": 3,
        "prompts_per_batch": 2,
        "batches": 4,
        "num_iterations": 2,
        "minibatch_size": 3,
        "beta": 0.04,
        "train": {"checkpoint_every": 2},
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
    },
    "rloo": {
        "train_prompts": 8,
        "eval_prompts": 3,
        "max_new_tokens": 8,
        "max_length": 64,
        "samples_per_prompt": 3,
        "prompts_per_batch": 2,
        "batches": 4,
        "num_iterations": 2,
        "minibatch_size": 3,
        "train": {"checkpoint_every": 2},
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
    },
    "rest": {
        "iterations": {"1": "outputs/sft", "2": "outputs/rest/1/policy"},
        "train_prompts": 8,
        "eval_prompts": 3,
        "max_length": 64,
        "grow": {"samples_per_prompt": 3, "max_new_tokens": 8},
        "improve": {
            "steps": 2,
            "threshold": {"kind": "percentile", "start": 50, "increment": 25},
            "train": {"batch_size": 2, "learning_rate": 1.0e-3, "log_every": 1},
        },
        # micro iterations move the held-out judges by noise alone: a guard that never stops them, so
        # both iterations always train (the guard has tests of its own in test_rest.py)
        "guard": {"tolerance": 10.0},
        "samples": {"num_prompts": 2, "max_new_tokens": 8},
    },
    "best_of_n": {
        "eval_prompts": 4,
        "max_length": 64,
        "n": [1, 2, 4],
        "samples": {"max_new_tokens": 8, "temperature": 1.0},
    },
    "evaluate": {
        "models": {
            "sft": "outputs/sft",
            "dpo": "outputs/dpo",
            "brain": "outputs/brain",
            "ppo": "outputs/ppo",
            "grpo": "outputs/grpo",
            "rloo": "outputs/rloo",
            "rest": "outputs/rest_best",
        },
        "prompts": 6,
        "reference_max_tokens": 8,
        "max_length": 64,
        "bootstrap_resamples": 200,
        "samples": {"num_prompts": 2, "max_new_tokens": 8, "temperature": 1.0},
        "best_of_n": {"policy": "sft", "n": [2]},
    },
    # a local transformers judge on the micro SFT model: the real code path, in seconds
    "rlaif": {
        "sources": ["imdb_pairs"],
        "train_pairs": 4,
        "eval_pairs": 2,
        "judge": {
            "backend": "transformers",
            "transformers": {"name_or_path": "outputs/sft", "batch_size": 4},
        },
    },
    # every registered stage but rlaif (an LLM judge), in the registry's (DAG) order
    "pipeline": {
        "stages": [name for name in registry.STAGES if name != "rlaif"],
        "experiment": "alignment",
        "deployment": "alignment-pipeline",
        "schedule": {"cron": None, "timezone": "UTC"},
    },
    "retrain": {"deployment": "rest-retraining", "schedule": {"cron": None, "timezone": "UTC"}},
}


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    """No hub, no telemetry; each test gets its own MLflow store unless it sets one."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_URI", "ALIGNMENT_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def micro_params() -> dict:
    return copy.deepcopy(MICRO_PARAMS)


def write_params(path: Path, params: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        YAML().dump(params, f)


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def copy_project(dest: Path, params: dict) -> Path:
    """A git-committed copy of the repository (what `git ls-files` would clone) with `params`."""
    files = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    write_params(dest / "params.yaml", params)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "copy")
    return dest


@pytest.fixture
def project(tmp_path, micro_params) -> Path:
    """A git-committed copy of the repository with micro params."""
    return copy_project(tmp_path / "project", micro_params)


@pytest.fixture(scope="session")
def repro_upstream(upstream, tmp_path_factory) -> Path:
    """A project copy holding what ReST starts from (data, SFT, gold, RM): `upstream`'s outputs, which
    `dvc commit` records in dvc.lock as if `dvc repro rm gold` had made them (same code, same params);
    committed, and copied by `upstream_project`."""
    root = copy_project(tmp_path_factory.mktemp("repro") / "project", copy.deepcopy(MICRO_PARAMS))
    (root / "dvc.lock").unlink()  # the repository's lock is of the default params: keep only what is here
    for name in ("outputs", "checkpoints", "metrics", "plots"):
        shutil.copytree(upstream / name, root / name, dirs_exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        ["dvc", "commit", "-f", "--with-deps", "rm", "gold"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "upstream")
    return root


@pytest.fixture
def upstream_project(repro_upstream, tmp_path) -> Path:
    return Path(shutil.copytree(repro_upstream, tmp_path / "project", symlinks=True))


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Path:
    """prepare -> tokenizer -> sft -> gold -> pairs -> rm on micro params, run in-process once: the
    inputs of the on-policy stages (BRAIn, PPO)."""
    import importlib

    from alignment.config import parse_section
    from alignment.paths import Paths

    root = tmp_path_factory.mktemp("upstream")
    (root / "data").symlink_to(ROOT / "data")
    cwd = os.getcwd()
    os.chdir(root)  # prepare and gold read `data/embedded/...` relative to the project root
    try:
        for stage in ("prepare", "tokenizer", "sft", "gold", "pairs", "rm"):
            importlib.import_module(f"alignment.stages.{stage}").run(
                parse_section(stage, MICRO_PARAMS[stage]), Paths(root), None
            )
    finally:
        os.chdir(cwd)
    return root
