"""pyproject.toml says what the code needs: every third-party module that alignment/, flows/ and tasks/
import (read with ast, function-level imports too) belongs to a declared dependency or extra; the loader
names the `gguf` extra when a GGUF file is asked for without it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("alignment", "flows", "tasks")


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level module -> the first `file:line` (from the folder's parent) importing it, for every
    absolute import under `folder`."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(folder.parent)}:{node.lineno}")
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return {normalize(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in requirements}


def undeclared(root: Path, packages: tuple[str, ...], declared: set[str]) -> list[str]:
    """`module (file:line; distribution)` for each third-party import under `root/<package>` that no
    declared distribution provides."""
    distributions = packages_distributions()
    missing = []
    for package in packages:
        for module, where in imported_modules(root / package).items():
            if module in sys.stdlib_module_names or module in packages:
                continue
            # an import no installed distribution provides (deepspeed on a CPU machine) is named as itself
            providers = {normalize(d) for d in distributions.get(module, [module])}
            if not providers & declared:
                missing.append(f"{module} ({where}; distribution {sorted(providers)})")
    return missing


def test_every_third_party_import_is_declared():
    missing = undeclared(ROOT, PACKAGES, declared())
    assert not missing, "imported but not declared in pyproject.toml:\n  " + "\n  ".join(missing)


def test_the_check_finds_an_undeclared_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import json\nfrom pkg import mod\n\ndef f():\n    import yaml\n    from numpy import linalg\n"
    )
    assert undeclared(tmp_path, ("pkg",), {"numpy"}) == ["yaml (pkg/mod.py:5; distribution ['pyyaml'])"]


def test_a_gguf_file_without_the_gguf_package_names_the_extra(monkeypatch):
    from alignment.models.loading import load_tokenizer

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: find_spec finds nothing
    with pytest.raises(ImportError, match=r"model\.gguf needs the gguf package.*alignment-pipeline\[gguf\]"):
        load_tokenizer("some/folder", gguf_file="model.gguf")
