"""The stage registry: the one declaration of every stage.

A `Stage` says everything the rest of the project needs to know about a stage: its params section and
config class, what it reads and writes, whether it may run as several processes, whether the default
pipeline runs it, whether its model goes on the leaderboard, and its plots. Derived from `STAGES`:
- the CLI (`python -m alignment <stage>`) and each section's validation (`SECTIONS`, `load_section`);
- the paths a stage writes (`Paths.out`) and what one run of it reads (`inputs`: its MLflow `data_hash`
  and its checkpoint fingerprint);
- the default `pipeline.stages`, the stages `launch` may start as several processes, evaluate's models
  and inputs, and every test's stage list;
- dvc.yaml (flows/dvc_yaml.py, `python -m alignment dvc-yaml`).

Adding a method: its loss (alignment/losses/) with a hand-worked test, `alignment/stages/<name>.py` with
`run(cfg, paths, log)`, its config class (alignment/config.py), one `Stage(...)` below, its params.yaml
section and its micro params (configs/micro/params.yaml); then `python -m alignment dvc-yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment import config as c
from alignment.config import ConfigError, Section, parse_section, read_params


@dataclass(frozen=True)
class Plot:
    """A DVC plot drawn from one csv a stage writes: one y column (kept in the stage's own dvc.yaml
    entry), or several (`y` a tuple; `template` e.g. scatter: a top-level plot)."""

    file: str
    x: str
    y: str | tuple[str, ...]
    title: str
    name: str = ""  # a top-level plot's id (default: the file's stem)
    template: str | None = None
    x_label: str | None = None
    y_label: str | None = None

    @property
    def single(self) -> bool:
        """One y column and no template: DVC draws it from the stage's own `plots` entry."""
        return isinstance(self.y, str) and self.template is None


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[Section]  # its params section's schema (alignment/config.py)
    section: str = ""  # params section (default: the stage's name)
    reads: tuple[str, ...] = ()  # stages whose outputs this stage reads
    data: tuple[str, ...] = ()  # files or folders of the repository it reads
    out: str = ""  # its output folder (default: outputs/<name>)
    checkpoints: bool = False  # checkpoints/<name>: kept across runs (resume, caches), never cached by DVC
    metrics: bool = True  # metrics/<name>.json
    plots: tuple[Plot, ...] = ()
    foreach: str | None = None  # a params key: one stage per item, `<name>@<key>`, run with --iteration <key>
    extra_deps: tuple[str, ...] = ()  # further deps (DVC templating allowed in foreach stages: ${item})
    desc: str = ""
    params_inputs: Any = None  # cfg -> further paths it reads, chosen by params (hashed, not DVC deps)
    processes: bool = False  # may run as several processes (torchrun, accelerate: params `launch`)
    pipeline: bool = True  # in the default `pipeline.stages`
    policy: bool = False  # writes a policy that `evaluate` puts on the leaderboard (as `name`)

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


def _training_curve(stage: str, y: str, title: str) -> Plot:
    return Plot(f"plots/{stage}/train.csv", "step", y, title)


ON_POLICY_READS = ("prepare", "sft", "rm", "gold")
_DECLARED = [
    Stage(
        "prepare",
        c.PrepareConfig,
        data=("data/embedded",),
        out="outputs/data",
        desc="raw sources -> sft / preference / prompts splits",
    ),
    Stage("tokenizer", c.TokenizerConfig, reads=("prepare",), metrics=False),
    Stage(
        "sft",
        c.SFTConfig,
        reads=("prepare", "tokenizer"),
        checkpoints=True,
        processes=True,
        plots=(
            _training_curve("sft", "loss", "SFT training loss"),
            Plot("plots/sft/eval.csv", "step", "loss", "SFT eval loss"),
        ),
    ),
    Stage(
        "gold",
        c.GoldConfig,
        data=("data/embedded/imdb_gold_train.jsonl.gz", "data/embedded/imdb_gold_test.jsonl.gz"),
        desc="the IMDb gold scorer: plays the human, never trained against",
    ),
    Stage(
        "pairs",
        c.PairsConfig,
        reads=("prepare", "sft", "gold"),
        processes=True,
        desc="k SFT samples per IMDb prompt, all pairs labelled by gold",
    ),
    Stage(
        "rm",
        c.RewardModelConfig,
        reads=("prepare", "pairs", "sft"),
        checkpoints=True,
        processes=True,
        plots=(
            _training_curve("rm", "accuracy", "Reward model training"),
            Plot("plots/rm/eval.csv", "step", "accuracy", "Reward model eval"),
        ),
        params_inputs=lambda cfg: [] if cfg.init_from in ("sft", "model") else [cfg.init_from],
    ),
    Stage(
        "dpo",
        c.DPOConfig,
        reads=("prepare", "pairs", "sft", "rm", "gold"),
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(_training_curve("dpo", "rewards/margins", "DPO training"),),
    ),
    Stage(
        "simpo",
        c.SimPOConfig,
        reads=("prepare", "pairs", "sft", "rm", "gold"),
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(_training_curve("simpo", "rewards/margins", "SimPO training"),),
        desc="SimPO: reference-free, length-normalised preference optimisation with a target margin",
    ),
    Stage(
        "brain_variance",
        c.BrainVarianceConfig,
        plots=(
            Plot(
                "plots/brain_variance/variance.csv",
                "kl_proposal_target",
                ("brain", "no_self_normalization", "no_baseline", "dpg", "gdcpp"),
                "BRAIn toy: gradient variance against KL(proposal || target)",
                name="brain_variance",
                x_label="KL(proposal || target)",
                y_label="variance of the gradient estimate",
            ),
        ),
        desc="BRAIn's gradient variance on the Gaussian toy",
    ),
    Stage(
        "brain",
        c.BRAInConfig,
        reads=ON_POLICY_READS,
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(
            Plot(
                "plots/brain/train.csv",
                "step",
                ("objective/scores", "objective/kl", "brain/ess_fraction"),
                "BRAIn training: RM score of the samples, KL to SFT, ESS fraction",
                name="brain_training",
            ),
        ),
        params_inputs=_reward_model_input,
    ),
    Stage(
        "ppo",
        c.PPOConfig,
        reads=ON_POLICY_READS,
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(
            Plot(
                "plots/ppo/train.csv",
                "step",
                ("objective/scores", "objective/rlhf_reward", "objective/kl"),
                "PPO: RM score, RLHF reward and KL to SFT per rollout",
                name="ppo_training",
            ),
        ),
        params_inputs=_reward_model_input,
    ),
    Stage(
        "grpo",
        c.GRPOConfig,
        reads=ON_POLICY_READS,
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(_training_curve("grpo", "reward", "GRPO: mean reward per generation batch"),),
        params_inputs=_reward_model_input,
        desc="GRPO: k samples per prompt, group-normalised advantages, no critic",
    ),
    Stage(
        "rloo",
        c.RLOOConfig,
        reads=ON_POLICY_READS,
        checkpoints=True,
        processes=True,
        policy=True,
        plots=(_training_curve("rloo", "reward", "RLOO: mean reward per generation batch"),),
        params_inputs=_reward_model_input,
        desc="RLOO: k samples per prompt, leave-one-out baseline, no critic",
    ),
    Stage(
        "rest_iter",
        c.RestConfig,
        section="rest",
        reads=ON_POLICY_READS,
        foreach="rest.iterations",
        out="outputs/rest/${key}",
        extra_deps=("data/incoming", "${item}"),
        params_inputs=_reward_model_input,
        processes=True,
        desc="ReST: one stage per iteration, rest_iter@1, rest_iter@2, ... (params rest.iterations)",
    ),
    Stage(
        "rest",
        c.RestConfig,
        extra_deps=("outputs/rest",),
        out="outputs/rest_best",
        policy=True,
        plots=(
            Plot(
                "plots/rest/iterations.csv",
                "iteration",
                ("grow/rm_reward", "rm/reward", "gold/reward", "gold/win_rate_vs_sft"),
                "ReST per iteration (0: start policy): RM reward (proxy) vs gold reward and win rate "
                "(held-out)",
                name="rest_iterations",
                x_label="ReST iteration",
            ),
        ),
        desc="keeps the best ReST iteration by the held-out judge",
    ),
    Stage(
        "best_of_n",
        c.BestOfNStageConfig,
        reads=ON_POLICY_READS,
        plots=(Plot("plots/best_of_n/curve.csv", "objective_kl", "gold_reward", "Best-of-n: gold vs KL"),),
        params_inputs=_reward_model_input,
        desc="the RM picks the best of n SFT samples on the policy stages' held-out prompts",
    ),
    Stage(
        "evaluate",
        c.EvaluateConfig,
        reads=("prepare", "rm", "gold", "sft"),  # and every policy stage's output (below)
        data=("data/judge",),
        checkpoints=True,
        processes=True,
        plots=(
            Plot(
                "plots/evaluate/frontier.csv",
                "objective/kl",
                ("gold/reward", "rm/reward"),
                "Reward-KL frontier: mean reward against KL(policy || SFT) per model "
                "(best-of-n: analytic KL)",
                name="reward_kl_frontier",
                template="scatter",
                x_label="KL(policy || SFT), nats",
                y_label="mean reward",
            ),
            Plot(
                "plots/evaluate/win_rates.csv",
                "win_rate",
                "model_judge",
                "Win rate against the reference response, per model and judge",
                name="win_rates",
                template="bar_horizontal",
            ),
        ),
        params_inputs=lambda cfg: list((cfg.models or {}).values()) + _reward_model_input(cfg),
        desc="every policy vs the held-out references: leaderboard, frontier (caches in checkpoints/)",
    ),
    Stage(
        "rlaif",
        c.RLAIFConfig,
        reads=("prepare", "pairs"),
        data=("data/judge",),
        checkpoints=True,
        pipeline=False,
        desc="an LLM judge labels pairs (not in the default pipeline.stages: minutes on 2 CPU cores)",
    ),
]

POLICY_STAGES: tuple[str, ...] = tuple(s.name for s in _DECLARED if s.policy)
STAGES: dict[str, Stage] = {
    s.name: dataclasses.replace(s, reads=s.reads + POLICY_STAGES) if s.name == "evaluate" else s
    for s in _DECLARED
}
# every stage's section, and `tracking` (the MLflow experiment every stage process logs to)
SECTIONS: dict[str, type[Section]] = {s.params_section: s.config for s in STAGES.values()} | {
    "tracking": c.TrackingConfig
}
PIPELINE_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES.values() if s.pipeline)


def get(name: str) -> Stage:
    """A stage by its name, or by a foreach member's (`rest_iter@2` -> rest_iter)."""
    base = name.split("@")[0]
    if base not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    return STAGES[base]


def leaderboard_models() -> dict[str, str]:
    """evaluate's default `models`: the SFT model (the KL reference) and every policy stage's output."""
    return {"sft": STAGES["sft"].output} | {name: STAGES[name].output for name in POLICY_STAGES}


# ------------------------------------------------------------------------------------------ params
def parse(name: str, raw: dict | None, path: str | Path = "params.yaml") -> Section:
    """A stage's params section (or `tracking`) from its raw values, validated: errors name the file and
    each dotted key."""
    if name not in SECTIONS:
        raise ConfigError(f"{path}: {name!r} is not a stage's params section; those are {sorted(SECTIONS)}")
    return parse_section(SECTIONS[name], name, raw, path)


def load_section(name: str, path: str | Path = "params.yaml") -> Section:
    """A stage's params section (or `tracking`) of params file `path`, validated."""
    return parse(name, read_params(path).get(name), path)


def load_stage_sections(path: str | Path = "params.yaml") -> dict[str, Section]:
    """Every stage's section and `tracking`, validated. Other top-level sections (the flows': pipeline,
    workers, ...)
    are not the library's: the flows validate them (flows/config.py)."""
    raw = read_params(path)
    return {name: parse_section(cls, name, raw.get(name), path) for name, cls in SECTIONS.items()}


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
