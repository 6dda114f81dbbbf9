"""The flows' own settings: the params sections no stage reads (pipeline, workers, launch, retrain, sweep).

They live with the flows, not in the library, so that none of them is a DVC param or a code dep of a
stage: changing a work pool, the sweep grid or a stage's launcher never re-runs a stage. Each is still
validated before any compute starts, with the stages' own sections (`load_all`): an unknown section, an
unknown key or a bad value fails the flow naming the file and the dotted key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignment.config import ConfigError, Section, parse_section, read_params
from alignment.registry import PIPELINE_STAGES, STAGES
from alignment.registry import SECTIONS as STAGE_SECTIONS
from alignment.training.sharding import unsupported


class ScheduleConfig(Section):
    cron: str | None = None  # e.g. "0 3 * * *"; None: the deployment runs only when triggered
    timezone: str = "UTC"


class RetrainConfig(Section):
    """The scheduled retraining flow (flows/retrain.py): ReST rounds from the champion as a DVC experiment."""

    deployment: str = Field(default="rest-retraining", min_length=1)
    schedule: ScheduleConfig = ScheduleConfig()
    model_name: str = Field(default="alignment-rest", min_length=1)  # the registered model
    alias: str = Field(default="champion", min_length=1)  # moves only when a new policy beats it
    champion_dir: str = "outputs/champion"  # where the champion is downloaded to start from
    retrain_rm: bool = False  # re-run the reward model stage first (DVC runs it only if its inputs changed)
    min_improvement: float = Field(default=0.0, ge=0.0)  # on the guard's held-out score
    # the Prefect global concurrency limit (1 slot) a run holds: no two runs at once, on any machine
    lock: str = Field(default="alignment-retrain", min_length=1)


class StageLaunch(Section):
    """How dvc.yaml's `cmd` starts one stage: `python -m alignment <stage>` (one process), or as several
    processes through `torchrun --standalone --nproc_per_node <processes>` (one machine; gloo on CPU, NCCL on
    GPUs) or `accelerate launch --config_file <config_file>` (configs/accelerate/: one GPU, DDP, FSDP2).
    Several processes replicate the model (DDP) unless `sharding: fsdp2` (or accelerate's fsdp2.yaml) shards
    it: the project's own FSDP2 (alignment/training/sharding.py), the same code on CPU processes and GPUs."""

    launcher: Literal["python", "torchrun", "accelerate"] = "python"
    processes: int = Field(default=1, ge=1)  # torchrun only: processes on this machine
    config_file: str | None = None  # accelerate only: a path from the project root
    sharding: Literal["none", "fsdp2"] = "none"  # torchrun only (accelerate: its config file says)
    timeout_minutes: float | None = Field(default=None, gt=0)
    """how long a collective waits for the other processes (torch's default: 10 minutes), e.g. while the
    main process alone registers a big model in MLflow or runs a judge; None: torch's default"""

    @model_validator(mode="after")
    def _options_match_launcher(self) -> StageLaunch:
        if self.launcher != "torchrun" and "processes" in self.model_fields_set:
            raise ValueError(f"processes applies to launcher torchrun, not {self.launcher}")
        if (self.launcher == "accelerate") != (self.config_file is not None):
            raise ValueError("launcher accelerate needs a config_file, and only it takes one")
        if self.sharding != "none" and self.launcher != "torchrun":
            raise ValueError(
                f"sharding applies to launcher torchrun (accelerate: its config file), not {self.launcher}"
            )
        if self.timeout_minutes is not None and self.launcher == "python":
            raise ValueError("timeout_minutes applies to several processes (torchrun, accelerate)")
        if self.config_file is not None and "deepspeed" in self.config_file.lower():
            raise ValueError(
                "DeepSpeed is not supported (never started by a test here): use configs/accelerate/fsdp2.yaml"
            )
        return self

    def command(self, root: str = "") -> str:
        """The command that runs `-m alignment ...` for this launch (`root`: the way up to the project)."""
        settings = {"ALIGNMENT_SHARDING": self.sharding if self.sharding != "none" else None}
        settings["ALIGNMENT_PROCESS_GROUP_TIMEOUT_MINUTES"] = self.timeout_minutes
        env = " ".join(
            f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in settings.items()
            if value is not None
        )
        prefix = f"env {env} " if env else ""
        if self.launcher == "torchrun":
            return f"{prefix}torchrun --standalone --nproc_per_node {self.processes}"
        if self.launcher == "accelerate":
            config = f"{root}/{self.config_file}" if root else self.config_file
            return f"{prefix}accelerate launch --config_file {config}"
        return "python"


class LaunchConfig(Section):
    """Read by `python -m alignment dvc-yaml` (flows/dvc_yaml.py) when it writes each stage's `cmd`; a
    stage not named here
    runs as one process."""

    stages: dict[str, StageLaunch] = {}

    @model_validator(mode="after")
    def _stages_can_run_as_several(self) -> LaunchConfig:
        several = [name for name, stage in STAGES.items() if stage.processes]
        for name, launch in self.stages.items():
            if name not in STAGES:
                raise ValueError(f"stages.{name}: not a stage; the stages: {list(STAGES)}")
            if not STAGES[name].processes and launch.launcher != "python":
                raise ValueError(f"stages.{name}: runs as one process; these run as several: {several}")
        return self


class SweepMethodConfig(Section):
    """One method of a sweep: the DVC stage(s) each point runs (alone: shared upstream outputs are
    never re-run), its strength knob and values, the params key of its seed, and fixed settings."""

    stages: tuple[str, ...] = Field(min_length=1)  # e.g. [dpo]; ReST: [rest_iter@1, rest_iter@2]
    knob: str | None = None  # a dotted params key, e.g. dpo.beta; None: one point per seed
    values: tuple[float | int | str, ...] = ()
    seed: str = Field(min_length=3)  # the dotted params key the sweep's seeds go to, e.g. dpo.train.seed
    set: dict[str, Any] = Field(default_factory=dict)  # fixed dotted settings, e.g. {brain.baseline: none}

    @model_validator(mode="after")
    def _knob_and_values(self) -> SweepMethodConfig:
        if (self.knob is None) != (not self.values):
            raise ValueError("knob and values go together: a knob needs values, values need a knob")
        return self


class SweepConfig(Section):
    """Seeded sweeps (flows/sweep.py): every method x strength x seed a DVC experiment of its own stage,
    reported as a reward-KL frontier with intervals over seeds, matched-KL comparisons and the papers'
    claims. Read by the flow only; not a DVC param of any stage."""

    seeds: tuple[int, ...] = Field(default=(0, 1, 2), min_length=1)
    methods: dict[str, SweepMethodConfig] = Field(default_factory=dict)
    matched_kl: tuple[float, ...] = Field(default=(2.0, 5.0), min_length=1)  # nats, for the comparisons
    level: float = Field(default=0.95, gt=0.5, lt=1.0)
    out: str = "outputs/sweep"

    @model_validator(mode="after")
    def _stages_and_keys(self) -> SweepConfig:
        for name, method in self.methods.items():
            for stage in method.stages:
                if stage.split("@")[0] not in STAGES:
                    raise ValueError(f"methods.{name}.stages: unknown stage {stage!r}")
            for key in [method.seed, *method.set, *([method.knob] if method.knob else [])]:
                if key.split(".")[0] not in STAGE_SECTIONS:
                    raise ValueError(f"methods.{name}: {key!r} is not a key of a stage's params section")
        return self


class PipelineConfig(Section):
    """Read by the Prefect flow and the serve script; not a DVC param of any stage."""

    stages: tuple[str, ...] = PIPELINE_STAGES  # the registry's `pipeline=True` stages, in DAG order
    deployment: str = Field(default="alignment-pipeline", min_length=1)
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="before")
    @classmethod
    def _experiment_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "experiment" in data:
            raise ValueError(
                "experiment: moved to tracking.experiment (the MLflow experiment every stage logs to)"
            )
        return data

    @model_validator(mode="after")
    def _stages_are_registered(self) -> PipelineConfig:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the registry has {list(STAGES)}")
        return self


class WorkersConfig(Section):
    """Where the pipeline flow runs each stage (flows/pipeline.py, flows/stage.py); not a DVC param.

    With no pool (the default) every stage runs in the flow's own process and folder, as `make pipeline`
    does. With pools, each stage is a flow run of the deployment `alignment-stage/<stage>` on its Prefect
    work pool, executed by a worker in its own checkout (`python -m flows.workers start --pool <pool>`);
    files move only through the DVC remote and every run logs to the MLflow server of
    `MLFLOW_TRACKING_URI`."""

    pools: dict[str, str] = {}  # stage (a foreach stage by its name: rest_iter) -> work pool
    default_pool: str | None = None  # the pool of a stage not in `pools`; null with `pools` empty: local
    max_parallel: int = Field(
        default=2, ge=1
    )  # stage runs at once (only stages that do not depend on each other)
    stage_timeout_minutes: float | None = Field(default=1440, gt=0)
    """a stage run still going after this is cancelled (its worker kills the process) and fails the flow:
    a stuck worker; null: no limit (a hung stage then holds the flow and the worker for ever)"""
    start_timeout_minutes: float = Field(default=30, gt=0)
    """a stage run that no worker has picked up after this (no worker on its pool) is cancelled and
    fails the flow, instead of waiting Scheduled for ever"""
    poll_seconds: float = Field(default=5.0, gt=0)  # how often the flow reads its children's states
    heartbeat_seconds: int | None = Field(default=30, ge=30)
    """a stage run's heartbeat (Prefect's minimum: 30 s); `deploy` adds the automation that sets a run
    Cancelling after 3 missed ones, so a lost worker fails the flow in minutes; null: no automation, only
    `stage_timeout_minutes` tells"""
    pull_outputs: bool = True  # the flow's folder pulls every out from the remote at the end (dvc pull)

    @property
    def enabled(self) -> bool:
        return bool(self.pools) or self.default_pool is not None

    def pool(self, stage: str) -> str | None:
        return self.pools.get(stage.split("@")[0], self.default_pool)

    @model_validator(mode="after")
    def _stages_and_pools(self) -> WorkersConfig:
        unknown = [s for s in self.pools if s not in STAGES]
        if unknown:
            raise ValueError(f"pools: unknown stage(s) {unknown}; the registry has {list(STAGES)}")
        empty = [s for s, pool in self.pools.items() if not pool.strip()]
        if empty or (self.default_pool is not None and not self.default_pool.strip()):
            raise ValueError(f"a work pool name is empty (stages {empty or ['default_pool']})")
        return self


FLOW_SECTIONS: dict[str, type[Section]] = {
    "pipeline": PipelineConfig,
    "workers": WorkersConfig,
    "launch": LaunchConfig,
    "retrain": RetrainConfig,
    "sweep": SweepConfig,
}
SECTIONS: dict[str, type[Section]] = STAGE_SECTIONS | FLOW_SECTIONS


def parse(name: str, raw: dict[str, Any] | None, path: str | Path = "params.yaml") -> Section:
    """Any section of params, stage's or flow's, validated."""
    if name not in SECTIONS:
        raise ConfigError(f"{path}: unknown section {name!r}; known: {sorted(SECTIONS)}")
    return parse_section(SECTIONS[name], name, raw, path)


def load_section(name: str, path: str | Path = "params.yaml") -> Section:
    return parse(name, read_params(path).get(name), path)


def check_sections(params: dict[str, Any], path: str | Path = "params.yaml") -> None:
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")


def load_all(path: str | Path = "params.yaml") -> dict[str, Section]:
    """Every section, validated: what a flow checks before it starts any stage (the launch section against
    the stages it launches too)."""
    raw = read_params(path)
    check_sections(raw, path)
    sections = {name: parse(name, raw.get(name), path) for name in SECTIONS}
    for name, launch in sections["launch"].stages.items():
        stage = STAGES[name]
        if launch.sharding == "fsdp2" and (refused := unsupported(name, sections[stage.params_section])):
            raise ConfigError(f"{path}: launch.stages.{name}: {refused}")
    return sections


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.config [params.yaml]`: validate every section, the stages' and the flows'."""
    path = (argv if argv is not None else sys.argv[1:]) or ["params.yaml"]
    try:
        load_all(path[0])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{path[0]}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
