"""The stage registry: one declaration per stage. The CLI (`python -m alignment <stage>`), the paths a
stage writes (`Paths.out`), the inputs hashed into its MLflow `data_hash` tag and its checkpoint
fingerprint, and dvc.yaml (`python -m alignment dvc-yaml`) are all derived from `STAGES`.

A stage's DVC deps are its data, the outputs of the stages it reads, and its code: every module of the
`alignment` package that its module imports, directly or through others (found by reading the
imports, so a new import is a new dep the next time dvc.yaml is generated; tests/test_registry.py
fails while the committed dvc.yaml is stale). Modules that cannot change what a stage writes are left
out (`NOT_OUTPUT_CODE`): MLflow plumbing and this registry, whose paths and deps DVC sees in dvc.yaml
itself.

Adding a method: a loss (if any), `alignment/stages/<name>.py` with `run(cfg, paths, log)`, a config
class in alignment/config.py, one `Stage(...)` below and its params.yaml section; then
`python -m alignment dvc-yaml` writes dvc.yaml.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
NOT_OUTPUT_CODE = (
    "alignment/tracking.py",
    "alignment/serving.py",
    "alignment/registry.py",
    "alignment/__init__.py",
    "alignment/stages/__init__.py",
)


@dataclass(frozen=True)
class Plot:
    """A DVC plot of one csv column against another, declared on the stage that writes the csv."""

    file: str
    x: str
    y: str
    title: str


@dataclass(frozen=True)
class Stage:
    name: str
    section: str = ""  # params section (default: the stage's name)
    reads: tuple[str, ...] = ()  # stages whose outputs this stage reads
    data: tuple[str, ...] = ()  # files or folders of the repository it reads
    out: str = ""  # its output folder (default: outputs/<name>)
    checkpoints: bool = False  # checkpoints/<name>: kept across runs (resume, caches), never cached by DVC
    metrics: bool = True  # metrics/<name>.json
    plots: tuple[Plot, ...] = ()  # curves with one y column
    plot_files: tuple[str, ...] = ()  # csvs drawn by the top-level `PLOTS`
    foreach: str | None = (
        None  # a params key: one stage per item, `<name>@<key>`, started with --iteration <key>
    )
    extra_deps: tuple[str, ...] = ()  # further deps (DVC templating allowed in foreach stages: ${item})
    desc: str = ""
    params_inputs: Any = None  # cfg -> further paths it reads, chosen by params (hashed, not DVC deps)

    @property
    def params_section(self) -> str:
        return self.section or self.name

    @property
    def output(self) -> str:
        return self.out or f"outputs/{self.name}"

    @property
    def module(self) -> str:
        return f"alignment.stages.{self.name}"


def _reward_model_input(cfg) -> list[str]:
    return [] if cfg.reward_model in (None, "rm") else [cfg.reward_model]


ON_POLICY_READS = ("prepare", "sft", "rm", "gold")
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare",
            data=("data/embedded",),
            out="outputs/data",
            desc="raw sources -> sft / preference / prompts splits",
        ),
        Stage("tokenizer", reads=("prepare",), metrics=False),
        Stage(
            "sft",
            reads=("prepare", "tokenizer"),
            checkpoints=True,
            plots=(
                Plot("plots/sft/train.csv", "step", "loss", "SFT training loss"),
                Plot("plots/sft/eval.csv", "step", "loss", "SFT eval loss"),
            ),
        ),
        Stage(
            "gold",
            data=("data/embedded/imdb_gold_train.jsonl.gz", "data/embedded/imdb_gold_test.jsonl.gz"),
            desc="the IMDb gold scorer: plays the human, never trained against",
        ),
        Stage(
            "pairs",
            reads=("prepare", "sft", "gold"),
            desc="k SFT samples per IMDb prompt, all pairs labelled by gold",
        ),
        Stage(
            "rm",
            reads=("prepare", "pairs", "sft"),
            checkpoints=True,
            plots=(
                Plot("plots/rm/train.csv", "step", "accuracy", "Reward model training"),
                Plot("plots/rm/eval.csv", "step", "accuracy", "Reward model eval"),
            ),
            params_inputs=lambda cfg: [] if cfg.init_from == "sft" else [cfg.init_from],
        ),
        Stage(
            "dpo",
            reads=("prepare", "pairs", "sft", "rm", "gold"),
            checkpoints=True,
            plots=(Plot("plots/dpo/train.csv", "step", "rewards/margins", "DPO training"),),
        ),
        Stage(
            "brain_variance",
            plot_files=("plots/brain_variance/variance.csv",),
            desc="BRAIn's gradient variance on the Gaussian toy",
        ),
        Stage(
            "brain",
            reads=ON_POLICY_READS,
            checkpoints=True,
            plot_files=("plots/brain/train.csv",),
            params_inputs=_reward_model_input,
        ),
        Stage(
            "ppo",
            reads=ON_POLICY_READS,
            checkpoints=True,
            plot_files=("plots/ppo/train.csv",),
            params_inputs=_reward_model_input,
        ),
        Stage(
            "grpo",
            reads=ON_POLICY_READS,
            checkpoints=True,
            plots=(Plot("plots/grpo/train.csv", "step", "reward", "GRPO: mean reward per generation batch"),),
            params_inputs=_reward_model_input,
            desc="GRPO: k samples per prompt, group-normalised advantages, no critic",
        ),
        Stage(
            "rloo",
            reads=ON_POLICY_READS,
            checkpoints=True,
            plots=(Plot("plots/rloo/train.csv", "step", "reward", "RLOO: mean reward per generation batch"),),
            params_inputs=_reward_model_input,
            desc="RLOO: k samples per prompt, leave-one-out baseline, no critic",
        ),
        Stage(
            "rest_iter",
            section="rest",
            reads=ON_POLICY_READS,
            foreach="rest.iterations",
            out="outputs/rest/${key}",
            extra_deps=("data/incoming", "${item}"),
            params_inputs=_reward_model_input,
            desc="ReST: one stage per iteration, rest_iter@1, rest_iter@2, ... (params rest.iterations)",
        ),
        Stage(
            "rest",
            extra_deps=("outputs/rest",),
            out="outputs/rest_best",
            plot_files=("plots/rest/iterations.csv",),
            desc="keeps the best ReST iteration by the held-out judge",
        ),
        Stage(
            "best_of_n",
            reads=ON_POLICY_READS,
            plots=(
                Plot("plots/best_of_n/curve.csv", "objective_kl", "gold_reward", "Best-of-n: gold vs KL"),
            ),
            params_inputs=_reward_model_input,
            desc="the RM picks the best of n SFT samples on the policy stages' held-out prompts",
        ),
        Stage(
            "evaluate",
            reads=("prepare", "rm", "gold", "sft", "dpo", "brain", "ppo", "grpo", "rloo", "rest"),
            data=("data/judge",),
            checkpoints=True,
            plot_files=("plots/evaluate/frontier.csv", "plots/evaluate/win_rates.csv"),
            params_inputs=lambda cfg: list(cfg.models.values()) + _reward_model_input(cfg),
            desc="every policy vs the held-out references: leaderboard, frontier (caches in checkpoints/)",
        ),
        Stage(
            "rlaif",
            reads=("prepare", "pairs"),
            data=("data/judge",),
            checkpoints=True,
            desc="an LLM judge labels pairs (not in the default pipeline.stages: minutes on 2 CPU cores)",
        ),
    ]
}

# Plots with several curves from one file (a stage's own `plots` take a single y column)
PLOTS: list[dict] = [
    {
        "brain_variance": {
            "x": "kl_proposal_target",
            "y": {
                "plots/brain_variance/variance.csv": [
                    "brain",
                    "no_self_normalization",
                    "no_baseline",
                    "dpg",
                    "gdcpp",
                ]
            },
            "title": "BRAIn toy: gradient variance against KL(proposal || target)",
            "x_label": "KL(proposal || target)",
            "y_label": "variance of the gradient estimate",
        }
    },
    {
        "brain_training": {
            "x": "step",
            "y": {"plots/brain/train.csv": ["objective/scores", "objective/kl", "brain/ess_fraction"]},
            "title": "BRAIn training: RM score of the samples, KL to SFT, ESS fraction",
        }
    },
    {
        "ppo_training": {
            "x": "step",
            "y": {"plots/ppo/train.csv": ["objective/scores", "objective/rlhf_reward", "objective/kl"]},
            "title": "PPO: RM score, RLHF reward and KL to SFT per rollout",
        }
    },
    {
        "reward_kl_frontier": {
            "template": "scatter",
            "x": "objective/kl",
            "y": {"plots/evaluate/frontier.csv": ["gold/reward", "rm/reward"]},
            "title": "Reward-KL frontier: mean reward against KL(policy || SFT) per model "
            "(best-of-n: analytic KL)",
            "x_label": "KL(policy || SFT), nats",
            "y_label": "mean reward",
        }
    },
    {
        "win_rates": {
            "template": "bar_horizontal",
            "x": "win_rate",
            "y": {"plots/evaluate/win_rates.csv": "model_judge"},
            "title": "Win rate against the reference response, per model and judge",
        }
    },
    {
        "sweep_frontier": {
            "template": "scatter",
            "x": "kl",
            "y": {"plots/sweep/frontier.csv": ["gold_reward", "rm_reward"]},
            "title": "Sweep (python -m flows.sweep): mean reward over seeds against KL to SFT, per method "
            "and strength",
            "x_label": "KL(policy || SFT), nats",
            "y_label": "mean reward",
        }
    },
    {
        "rest_iterations": {
            "x": "iteration",
            "y": {
                "plots/rest/iterations.csv": [
                    "grow/rm_reward",
                    "rm/reward",
                    "gold/reward",
                    "gold/win_rate_vs_sft",
                ]
            },
            "title": "ReST per iteration (0: start policy): RM reward (proxy) vs gold reward and win "
            "rate (held-out)",
            "x_label": "ReST iteration",
        }
    },
]


def get(name: str) -> Stage:
    """A stage by its name, or by a foreach member's (`rest_iter@2` -> rest_iter)."""
    base = name.split("@")[0]
    if base not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    return STAGES[base]


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
            found |= {
                f"{node.module}.{alias.name}" for alias in node.names
            }  # `from alignment import tracking`
    return {m for m in found if _module_file(m) is not None}


def code_deps(module: str) -> list[str]:
    """Source files (relative to the project root) that `module` runs: the transitive closure of its
    imports within the package. `NOT_OUTPUT_CODE` and what only it imports are left out (the MLflow
    pyfuncs that `tracking` imports to register a model do not write any output)."""
    seen, todo = set(), [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen or _relative(path) in NOT_OUTPUT_CODE:
            continue
        seen.add(path)
        todo += sorted(_imports(path))
    return sorted(_relative(p) for p in seen)


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


# ------------------------------------------------------------------------------------- run inputs
def inputs(stage: Stage, cfg, root: Path, iteration: str | None = None) -> list[Path]:
    """What one run of the stage reads (data, upstream outputs, params-chosen paths), for its data hash
    and checkpoint fingerprint; paths that do not exist are left out."""
    item = getattr(cfg, "iterations", {}).get(str(iteration), "") if iteration is not None else ""
    names = [*stage.data, *(STAGES[s].output for s in stage.reads), *stage.extra_deps]
    names += [*(stage.params_inputs(cfg) if stage.params_inputs else [])]
    resolved = [n.replace("${item}", item).replace("${key}", str(iteration)) for n in names]
    paths = [Path(n) if Path(n).is_absolute() else root / n for n in resolved if n]
    return [p for p in dict.fromkeys(paths) if p.exists()]


def _without_resume(value):
    if isinstance(value, dict):
        return {k: _without_resume(v) for k, v in value.items() if k != "resume"}
    return value


def fingerprint(
    name: str, cfg, root: Path, iteration: str | None = None, world_size: int | None = None
) -> str:
    """Identifies the run a checkpoint belongs to: the stage's settings (less `resume`), the content of
    what it reads, the package's code and the number of processes. A checkpoint of anything else is
    never resumed (`world_size`: this launch's number of processes by default)."""
    from alignment.distributed import world
    from alignment.paths import hash_paths

    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(PACKAGE.rglob("*.py")))).hexdigest()
    parts = [
        name,
        str(iteration),
        _without_resume(cfg.model_dump()),
        hash_paths(inputs(get(name), cfg, root, iteration)),
        code,
        world() if world_size is None else world_size,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ dvc.yaml
@dataclass
class _Entry:
    cmd: str
    deps: list[str]
    params: list[str]
    outs: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    plots: list = field(default_factory=list)


def dvc_stage(stage: Stage, selected: Sequence[str] | None = None, root: str = "", launch=None) -> dict:
    """The dvc.yaml entry of one stage. For a profile's dvc.yaml (a folder of its own below the project,
    `root` the way back up, e.g. `../..`), the code and data deps are paths from the profile's folder,
    its outputs stay in that folder, and it reads only the `selected` stages' outputs. `launch` (a
    config.StageLaunch) starts the command: torchrun or accelerate for several processes."""
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
    outs += [{f: {"cache": False}} for f in stage.plot_files]
    entry["outs"] = outs
    if stage.metrics:
        entry["metrics"] = [{f"metrics/{stage.name}{'_' + key if key else ''}.json": {"cache": False}}]
    if stage.plots:
        entry["plots"] = [
            {p.file: {"cache": False, "x": p.x, "y": p.y, "title": p.title}} for p in stage.plots
        ]
    if stage.foreach:
        return {"foreach": "${" + stage.foreach + "}", "do": entry}
    return entry


HEADER = """\
# GENERATED from alignment/registry.py by `python -m alignment dvc-yaml`: edit the registry, not this file
# (tests/test_registry.py fails while this file is stale). Every stage is `python -m alignment <stage>`;
# each lists only its own params section, its data, the outputs it reads and every source file of the
# package it runs, so editing one re-runs exactly the stages that execute it.
"""


PROFILE_HEADER = """\
# GENERATED from alignment/registry.py by `python -m alignment dvc-yaml --params {params}`: the stages of
# this profile's `pipeline.stages`, run in this folder on the project's code. The folder is a DVC subrepo
# (`dvc init --subdir`): its outputs, metrics, dvc.lock and cache stay here, and the project's `dvc status`
# and `dvc repro` never see them. Run it with `cd {folder} && dvc repro`.
"""


def dvc_yaml(stages: Sequence[str] | None = None, root: str = "", launch=None) -> str:
    """dvc.yaml as text: every stage of the registry, then the multi-curve plots; or, for a profile,
    only `stages` (from its `pipeline.stages`), from a folder `root` below the project root. `launch`
    (a config.LaunchConfig, the params' `launch` section) says how each stage's command starts."""
    import io

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    out = io.StringIO()
    chosen = {name: stage for name, stage in STAGES.items() if stages is None or name in stages}
    launches = {} if launch is None else launch.stages
    entries = {name: dvc_stage(stage, stages, root, launches.get(name)) for name, stage in chosen.items()}
    plots = PLOTS if stages is None else [p for p in PLOTS if _plot_stages(p) <= set(chosen)]
    yaml.dump({"stages": entries, "plots": plots}, out)
    return out.getvalue() if stages is not None else HEADER + out.getvalue()


def _plot_stages(plot: dict) -> set[str]:
    """The stages whose csvs a top-level plot draws (`plots/<stage>/...`)."""
    (spec,) = plot.values()
    return {file.split("/")[1] for file in spec["y"]}
