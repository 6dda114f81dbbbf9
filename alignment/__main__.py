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
import sys
import time
from pathlib import Path

from alignment import tracking
from alignment.config import ConfigError, flatten, load_all, load_section
from alignment.data import DataError
from alignment.paths import Paths, hash_paths

# imported on demand: `prepare` need not pay for torch and transformers (~8 s per process)
STAGES = {name: f"alignment.stages.{name}" for name in (
    "prepare", "tokenizer", "sft", "gold", "pairs", "rm", "dpo", "brain", "brain_variance", "ppo", "rest_iter", "rest",
    "evaluate", "rlaif")}
SECTION = {"rest_iter": "rest"}  # a stage whose params section has another name


def stage_inputs(stage: str, paths: Paths, cfg, iteration: int | None = None) -> list[Path]:
    """What the stage reads: hashed into the run's `data_hash` tag."""
    inputs = {  # lambdas: each stage's config has only its own fields
        "prepare": lambda: [Path(s.path) for s in cfg.sources],
        "tokenizer": lambda: [paths.data],
        "sft": lambda: [paths.data, paths.tokenizer],
        "gold": lambda: [Path(cfg.train_path), Path(cfg.test_path)],
        "pairs": lambda: [paths.data, paths.sft, paths.gold],
        "rm": lambda: [paths.data, paths.pairs, paths.sft],
        "dpo": lambda: [paths.data, paths.pairs, paths.sft, paths.rm, paths.gold],
        "brain": lambda: [paths.data, paths.sft, paths.rm, paths.gold],
        "brain_variance": lambda: [],
        "ppo": lambda: [paths.data, paths.sft, paths.rm, paths.gold],
        "rest_iter": lambda: [paths.data, paths.sft, paths.rm, paths.gold, paths.resolve(cfg.iterations[str(iteration)]),
                              *([paths.resolve(cfg.incoming)] if cfg.incoming else [])],
        "rest": lambda: [paths.root / "outputs" / "rest"],
        "evaluate": lambda: [paths.data, paths.rm, paths.gold, *(paths.resolve(p) for p in cfg.models.values())],
        "rlaif": lambda: [paths.data, paths.pairs],
    }
    return [p for p in inputs[stage]() if p.exists()]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "check"], help="a stage to run, or `check` to validate params")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--iteration", type=int, help="rest_iter: which ReST iteration (a key of rest.iterations)")
    args = parser.parse_args(argv)
    if (args.stage == "rest_iter") != (args.iteration is not None):
        parser.error("--iteration goes with the rest_iter stage, and only with it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        if args.stage == "check":
            load_all(args.params)
            print(f"{args.params}: ok")
            return 0
        cfg = load_section(SECTION.get(args.stage, args.stage), args.params)
        pipeline = load_section("pipeline", args.params)
        if args.iteration is not None and str(args.iteration) not in cfg.iterations:
            raise ConfigError(f"{args.params}: rest.iterations has no iteration {args.iteration!r}; it has {list(cfg.iterations)}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    keep_freed_memory()
    paths = Paths(Path("."))
    run_stage = importlib.import_module(STAGES[args.stage]).run
    name = args.stage
    if args.iteration is not None:  # the DVC stage rest_iter@<k>
        run_stage, name = functools.partial(run_stage, iteration=args.iteration), f"{args.stage}@{args.iteration}"
    started = time.perf_counter()
    try:
        if args.no_tracking:
            metrics = run_stage(cfg, paths, None)
        else:
            with tracking.stage_run(name, pipeline.experiment) as log:
                log.params(flatten(cfg))
                log.tags({"data_hash": hash_paths(stage_inputs(args.stage, paths, cfg, args.iteration))})
                metrics = run_stage(cfg, paths, log)
                log.summary(metrics | {"stage_seconds": time.perf_counter() - started})
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": name, "seconds": round(time.perf_counter() - started, 1), **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
