"""`python -m alignment <stage>`: the one entry point that dvc.yaml calls.

Validates the stage's params section (and fails before any compute), opens the stage's MLflow run
(nested under the pipeline run when the Prefect flow started one), runs the stage, logs its metrics.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignment import registry, settings_doc, tracking
from alignment.config import ConfigError, flatten
from alignment.data.io import DataError
from alignment.evaluation.judging import JudgeFailed
from alignment.paths import Paths, hash_paths
from alignment.precision import enable_tf32
from alignment.rewards.source import RewardFunctionError
from alignment.training import checkpoint, distributed, sharding


def keep_freed_memory() -> None:
    """Stop glibc from returning every large freed block to the OS: a training step allocates and
    frees the same (batch, length, vocab) buffers each time, and the page faults of fresh mmaps cost
    a small model on a CPU about a third of its speed (measured: ~4.5k -> ~7k tokens/s)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)


class _TiedWeightsSaved(logging.Filter):
    """accelerate warns at every checkpoint of a model with tied embeddings (GPT-2's lm_head is its input
    embedding) that it saved the shared tensor once: expected, and `load_state` ties them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def quiet_libraries() -> None:
    """A stage's log holds its own INFO lines, every library's warnings and its own progress bar, not the
    libraries' INFO chatter (accelerate's line per checkpoint file, MLflow's model logging) or their
    per-file bars (transformers' weight loading and saving, MLflow's artifact transfers)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level on import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it on import
    for name in ("accelerate", "mlflow", "transformers", "peft", "datasets", "huggingface_hub", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsSaved())
    if "transformers" in sys.modules:  # imported already: its bars were decided then
        sys.modules["transformers"].utils.logging.disable_progress_bar()


CHECKPOINTS_ENV = "ALIGNMENT_CHECKPOINTS_DIR"


def link_checkpoints(folder: Path, key: str | None = None, shared: str | None = None) -> Path:
    """Make `checkpoints/<stage>` (a DVC out, kept across runs) ready for a stage: a folder, or, when
    `shared` (default: $ALIGNMENT_CHECKPOINTS_DIR: storage every worker mounts) is set, a link to
    `<shared>/<stage>/<key>`, so a stage re-run on another worker resumes from the checkpoint a lost one
    left there. `key` is the run's checkpoint fingerprint (settings, inputs, code, processes): two runs
    of one stage with other settings (two sweep points, two projects on one share) get folders of their
    own instead of deleting each other's resume point. A local folder already there moves to the shared
    place when that is empty, and otherwise gives way to it."""
    shared = os.environ.get(CHECKPOINTS_ENV) if shared is None else shared
    if not shared:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    if not key or not key.isalnum():
        raise ValueError(f"link_checkpoints({folder}): a fingerprint key is needed on shared storage")
    target = Path(shared).resolve() / folder.name / key
    if not (folder.is_symlink() and folder.resolve() == target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():
            folder.unlink()
        elif folder.is_dir() and not target.exists():
            shutil.move(str(folder), str(target))
        elif folder.is_dir():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # another process of the same launch made it first
            pass
    target.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["config"]:
        return show_config(argv[1:])
    if argv[:1] and argv[0] in registry.STAGES and {"-h", "--help"} & set(argv):
        stage = registry.STAGES[argv[0]]
        print(
            settings_doc.stage_help(stage.name, stage.params_section, stage.config, stage.desc, stage.module)
        )
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m alignment",
        description=__doc__.splitlines()[0],
        epilog="`python -m alignment <stage> --help` lists a stage's settings; `python -m alignment config "
        "<stage> [--params FILE]` prints its section as resolved.",
    )
    parser.add_argument(
        "stage",
        choices=[*registry.STAGES, "check", "dvc-yaml"],
        help="a stage to run; `check` validates the stages' params; `dvc-yaml` writes dvc.yaml from the "
        "registry (flows/dvc_yaml.py)",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument(
        "--iteration", help="a foreach stage (rest_iter): which item (a key of rest.iterations)"
    )
    parser.add_argument(
        "--check", action="store_true", help="dvc-yaml: fail if dvc.yaml differs instead of writing it"
    )
    args = parser.parse_args(argv)
    if args.stage == "dvc-yaml":  # DVC's file is the orchestration's: written by flows/dvc_yaml.py
        from flows import dvc_yaml

        return dvc_yaml.write(Path(args.params), args.check)
    stage = registry.STAGES.get(args.stage)
    if stage is not None and (stage.foreach is not None) != (args.iteration is not None):
        parser.error(
            f"--iteration goes with the foreach stages "
            f"({[s.name for s in registry.STAGES.values() if s.foreach]}), and only with them"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        if args.stage == "check":
            registry.load_stage_sections(args.params)
            print(
                f"{args.params}: every stage's section is valid (the flows' sections: python -m flows.config)"
            )
            return 0
        cfg = registry.load_section(stage.params_section, args.params)
        experiment = registry.load_section("tracking", args.params).experiment
        if sharding.enabled() and (refused := sharding.unsupported(stage.name, cfg)):
            raise ConfigError(f"{args.params}: {refused}")
        if args.iteration is not None and str(args.iteration) not in cfg.iterations:
            raise ConfigError(
                f"{args.params}: rest.iterations has no iteration {args.iteration!r}; "
                f"it has {list(cfg.iterations)}"
            )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    keep_freed_memory()
    quiet_libraries()
    enable_tf32()
    # where this process's models go (distributed.device): `train.device: cpu` keeps a stage off the GPU
    os.environ.setdefault("ALIGNMENT_DEVICE", stage_device(cfg))
    paths = Paths(Path("."))
    run = importlib.import_module(stage.module).run
    name = stage.name
    if args.iteration is not None:  # the DVC stage rest_iter@<k>
        run, name = (
            functools.partial(run, iteration=int(args.iteration)),
            f"{stage.name}@{args.iteration}",
        )
    if stage.checkpoints:  # a declared DVC out: it must exist even when the run was too short to save one
        key = None  # or a link into $ALIGNMENT_CHECKPOINTS_DIR, keyed by the run's fingerprint
        if os.environ.get(CHECKPOINTS_ENV):
            key = checkpoint.fingerprint(stage.name, cfg, paths.root, args.iteration)
        link_checkpoints(paths.checkpoints(stage.name), key)
    started = time.perf_counter()
    try:
        if args.no_tracking or not distributed.is_main():  # one MLflow run per stage, whatever the launch
            metrics = run(cfg, paths, None)
            distributed.barrier()  # the main process may still be logging: leave together
        else:
            resume = run_to_continue(stage, name, cfg, paths, args.iteration)
            with (
                tracking.mlflow_stage_run(name, experiment, resume_run_id=resume) as log,
                run_ledger(paths, name, log.run_id),
            ):
                log.params(flatten(cfg))
                log.tags(
                    {
                        "data_hash": hash_paths(registry.inputs(stage, cfg, paths.root, args.iteration)),
                        "num_processes": str(distributed.world()),
                    }
                )
                metrics = run(cfg, paths, log)
                log.summary(metrics | {"stage_seconds": time.perf_counter() - started} | peak_memory())
            distributed.barrier()
    except (DataError, RewardFunctionError, JudgeFailed) as error:  # bad input, a failing reward or judge
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not distributed.is_main():
        return 0
    seconds = round(time.perf_counter() - started, 1)
    print(json.dumps({"stage": name, "seconds": seconds, **peak_memory(), **metrics}, indent=2))
    return 0


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory so far (`peak_rss_mib`) and, on a GPU, the most its tensors
    held at once (`peak_gpu_mib`): what sizes a stage's machine (docs/scale.md)."""
    import resource

    import torch

    peak = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB
    if torch.cuda.is_available():
        peak["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def show_config(argv: list[str]) -> int:
    """`python -m alignment config <stage> [--params FILE]`: the stage's section, validated and with every
    default filled in, as YAML."""
    parser = argparse.ArgumentParser(
        prog="python -m alignment config", description="print a stage's params section as resolved"
    )
    parser.add_argument("stage", choices=list(registry.STAGES))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    section = registry.STAGES[args.stage].params_section
    try:
        cfg = registry.load_section(section, args.params)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(settings_doc.resolved_yaml(section, cfg), end="")
    return 0


def stage_device(cfg) -> str:
    """A stage's `train.device` (ReST: `improve.train.device`); `auto` for a stage that trains nothing."""
    train = getattr(cfg, "train", None) or getattr(getattr(cfg, "improve", None), "train", None)
    return getattr(train, "device", "auto")


def ledger_path(paths: Paths, name: str) -> Path:
    return paths.root / "checkpoints" / ".runs" / f"{name.replace('@', '_')}.json"


@contextmanager
def run_ledger(paths: Paths, name: str, run_id: str) -> Iterator[None]:
    """Which MLflow run this stage process has open, until it ends. A ledger left behind names a run whose
    process was killed (SIGKILL, a lost machine): MLflow would show it RUNNING forever."""
    path = ledger_path(paths, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def run_to_continue(stage: registry.Stage, name: str, cfg, paths: Paths, iteration: str | None) -> str | None:
    """The run of a killed process of this stage to continue, or None for a new run. A killed run is
    continued when the checkpoint the stage will resume from was written by it (same settings, inputs and
    code), so its curves go on from the resumed step; otherwise it is marked KILLED."""
    path = ledger_path(paths, name)
    if not path.exists():
        return None
    dead = json.loads(path.read_text())
    if dead["host"] == socket.gethostname() and _alive(dead["pid"]):
        return None  # not dead: another process of this stage (outside DVC, which locks the stage) owns it
    if tracking.run_status(dead["run_id"], paths.root) != "RUNNING":
        return None
    found = None
    if stage.checkpoints:
        found = checkpoint.load(
            paths.checkpoints(name), checkpoint.fingerprint(stage.name, cfg, paths.root, iteration)
        )
    if found is not None and found[1].get("run_id") == dead["run_id"]:
        logging.getLogger(__name__).info(
            "continuing MLflow run %s of the killed %s from step %d", dead["run_id"], name, found[1]["step"]
        )
        return dead["run_id"]
    tracking.mark_killed(dead["run_id"], paths.root)
    logging.getLogger(__name__).info("marked MLflow run %s of the killed %s as KILLED", dead["run_id"], name)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
