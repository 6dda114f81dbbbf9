"""dvc.yaml, generated from the stage registry (alignment/registry.py): `python -m alignment dvc-yaml`
(or `python -m flows.dvc_yaml`) writes it, `--check` fails while the committed one is stale.

Each stage is `python -m alignment <stage>` (or its `launch` command: torchrun, accelerate launch), with
its own params section, its data, the outputs of the stages it reads and its code: every module of the
`alignment` package that its module imports, directly or through others (found by reading the imports,
so a new import is a new dep the next time dvc.yaml is generated). Modules that cannot change what a
stage writes are left out (`NOT_OUTPUT_CODE`): MLflow plumbing and the registry itself, whose paths and
deps DVC sees in dvc.yaml, and the packages' empty `__init__.py` files.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from alignment.registry import STAGES, Plot, Stage
from flows.config import LaunchConfig, StageLaunch, load_section

PACKAGE = Path(__file__).resolve().parents[1] / "alignment"
NOT_OUTPUT_CODE = ("alignment/tracking.py", "alignment/serving.py", "alignment/registry.py")

# flows/sweep.py writes this one: a top-level plot no stage declares
SWEEP_PLOT = Plot(
    "plots/sweep/frontier.csv",
    "kl",
    ("gold_reward", "rm_reward"),
    "Sweep (python -m flows.sweep): mean reward over seeds against KL to SFT, per method and strength",
    name="sweep_frontier",
    template="scatter",
    x_label="KL(policy || SFT), nats",
    y_label="mean reward",
)


# --------------------------------------------------------------------------------------- code deps
def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "alignment":
        return None
    base = PACKAGE.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from alignment.x import y`
    return {m for m in found if _module_file(m) is not None}


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def code_deps(module: str) -> list[str]:
    """Source files (relative to the project root) that `module` runs: the transitive closure of its
    imports within the package, less `NOT_OUTPUT_CODE` and what only it imports (the MLflow pyfuncs
    that `tracking` imports to register a model write no output)."""
    seen, todo = set(), [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen or _relative(path) in NOT_OUTPUT_CODE:
            continue
        seen.add(path)
        todo += sorted(_imports(path))
    return sorted(_relative(p) for p in seen if p.name != "__init__.py")


# ------------------------------------------------------------------------------------------ dvc.yaml
def dvc_stage(
    stage: Stage, selected: Sequence[str] | None = None, root: str = "", launch: StageLaunch | None = None
) -> dict:
    """The dvc.yaml entry of one stage. For a profile's dvc.yaml (a folder of its own below the project,
    `root` the way back up, e.g. `../..`), the code and data deps are paths from the profile's folder,
    its outputs stay in that folder, and it reads only the `selected` stages' outputs."""
    key = "${key}" if stage.foreach else ""
    up = (lambda path: f"{root}/{path}") if root else (lambda path: path)
    reads = [s for s in stage.reads if selected is None or s in selected]
    entry: dict[str, Any] = {}
    if stage.desc:
        entry["desc"] = stage.desc
    python = "python" if launch is None else launch.command(root)
    entry["cmd"] = f"{python} -m alignment {stage.name}" + (f" --iteration {key}" if stage.foreach else "")
    deps = (
        [up(path) for path in code_deps(stage.module) + list(stage.data)]
        + [STAGES[s].output for s in reads]
        + [up(path) if path.startswith("data/") else path for path in stage.extra_deps]
    )
    entry["deps"] = list(dict.fromkeys(deps))
    entry["params"] = [stage.params_section]
    outs: list = [stage.output]
    if stage.checkpoints:
        outs.append({f"checkpoints/{stage.name}": {"cache": False, "persist": True}})
    outs += [{p.file: {"cache": False}} for p in stage.plots if not p.single]
    entry["outs"] = outs
    if stage.metrics:
        entry["metrics"] = [{f"metrics/{stage.name}{'_' + key if key else ''}.json": {"cache": False}}]
    single = [p for p in stage.plots if p.single]
    if single:
        entry["plots"] = [{p.file: {"cache": False, "x": p.x, "y": p.y, "title": p.title}} for p in single]
    if stage.foreach:
        return {"foreach": "${" + stage.foreach + "}", "do": entry}
    return entry


def top_level_plot(plot: Plot) -> dict:
    """A plot of several curves (or with a template), at dvc.yaml's top level."""
    spec: dict[str, Any] = {}
    if plot.template:
        spec["template"] = plot.template
    spec["x"] = plot.x
    spec["y"] = {plot.file: list(plot.y) if isinstance(plot.y, tuple) else plot.y}
    spec["title"] = plot.title
    for key in ("x_label", "y_label"):
        if getattr(plot, key):
            spec[key] = getattr(plot, key)
    return {plot.name or Path(plot.file).stem: spec}


HEADER = """\
# GENERATED from alignment/registry.py by `python -m alignment dvc-yaml`: edit the registry, not this file
# (`python -m alignment dvc-yaml --check` fails while this file is stale). Every stage is
# `python -m alignment <stage>`; each lists only its own params section, its data, the outputs it reads
# and every source file of the package it runs, so editing one re-runs exactly the stages that execute it.
"""


PROFILE_HEADER = """\
# GENERATED from alignment/registry.py by `python -m alignment dvc-yaml --params {params}`: the stages of
# this profile's `pipeline.stages`, run in this folder on the project's code. The folder is a DVC subrepo
# (`dvc init --subdir`): its outputs, metrics, dvc.lock and cache stay here, and the project's `dvc status`
# and `dvc repro` never see them. Run it with `cd {folder} && dvc repro`.
"""


def dvc_yaml(stages: Sequence[str] | None = None, root: str = "", launch: LaunchConfig | None = None) -> str:
    """dvc.yaml as text: every stage of the registry, then the plots of several curves; or, for a profile,
    only `stages` (from its `pipeline.stages`), from a folder `root` below the project root. `launch`
    (the params' `launch` section) says how each stage's command starts."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    out = io.StringIO()
    chosen = {name: stage for name, stage in STAGES.items() if stages is None or name in stages}
    launches = {} if launch is None else launch.stages
    entries = {name: dvc_stage(stage, stages, root, launches.get(name)) for name, stage in chosen.items()}
    plots = [p for stage in chosen.values() for p in stage.plots if not p.single]
    plots += [SWEEP_PLOT] if stages is None else []
    yaml.dump({"stages": entries, "plots": [top_level_plot(p) for p in plots]}, out)
    return out.getvalue() if stages is not None else HEADER + out.getvalue()


def write(params: Path, check: bool) -> int:
    """dvc.yaml beside `params`: the project's (every stage) for ./params.yaml, a profile's (its
    `pipeline.stages`, run in its folder, a DVC subrepo) for a params file in a folder of its own
    (configs/<profile>/)."""
    folder = params.resolve().parent
    path = folder / "dvc.yaml"
    launch = load_section("launch", params)
    if folder == Path.cwd().resolve():
        text = dvc_yaml(launch=launch)
    else:
        stages = [s.split("@")[0] for s in load_section("pipeline", params).stages]
        root = os.path.relpath(Path.cwd(), folder)
        relative = folder.relative_to(Path.cwd().resolve()).as_posix()
        text = PROFILE_HEADER.format(params=params, folder=relative) + dvc_yaml(stages, root, launch)
        if not check and not (folder / ".dvc").is_dir():  # a DVC subrepo: apart from the project's DAG
            subprocess.run(["dvc", "init", "--subdir", "-q"], cwd=folder, check=True)
    if check:
        if path.exists() and path.read_text() == text:
            print(f"{path}: up to date")
            return 0
        print(f"{path}: differs from the registry; run `python -m alignment dvc-yaml`", file=sys.stderr)
        return 1
    path.write_text(text)
    print(f"{path}: written from alignment/registry.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment dvc-yaml", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="fail if dvc.yaml differs instead of writing it")
    args = parser.parse_args(argv)
    return write(Path(args.params), args.check)


if __name__ == "__main__":
    sys.exit(main())
