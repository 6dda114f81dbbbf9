"""The layers are folders, and imports only go down them: losses and rewards -> data -> models -> training
-> evaluation -> stages (the plumbing at the package's top: config, registry, paths, tracking, plots), with no
circle anywhere, function-level imports included (a lazy import may save start-up time; it may not hide a
circle)."""

import ast
from pathlib import Path

from tests.conftest import ROOT

FLOORS = ["losses", "rewards", "data", "models", "training", "evaluation", "stages"]
PACKAGES = ("alignment", "flows", "tasks")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the project that `path` imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return (
        FLOORS.index(parts[1]) if parts[0] == "alignment" and len(parts) > 2 and parts[1] in FLOORS else None
    )


def test_imports_go_down_the_floors():
    known = modules()
    upward = [
        f"{name} -> {target}"
        for name, path in known.items()
        if floor(name) is not None
        for target in imports(path, known)
        if floor(target) is not None and floor(target) > floor(name)
    ]
    assert upward == []


def test_no_import_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    circles = []

    def visit(node: str, trail: list[str], done: set[str]) -> None:
        for nxt in graph[node]:
            if nxt in trail:
                circles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, trail + [nxt], done)

    for name in graph:
        visit(name, [name], {name})
    assert circles == []


def test_the_library_knows_no_orchestrator():
    """alignment/ imports neither Prefect nor the flows (the one exception: the CLI's `dvc-yaml` command,
    which hands over to flows/dvc_yaml.py, the generator of DVC's file)."""
    known = modules()
    offenders = []
    for name, path in known.items():
        if not name.startswith("alignment"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            if module.split(".")[0] in ("prefect", "flows", "tasks") and name != "alignment.__main__":
                offenders.append(f"{name}: {module}")
    assert offenders == []
