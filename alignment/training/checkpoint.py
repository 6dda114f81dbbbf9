"""Checkpoints for every training loop: step folders, an atomic pointer, loading that cannot crash a resume.

A checkpoint directory holds

    step_0000004/   what the caller's `write(folder)` put there, plus meta.json
    latest.json     {"path": "step_0000004", "step": 4}

`save` writes `.step_<n>.partial/` (the caller's files, then meta.json), renames it to `step_<n>/`, points
`latest.json` at it (temp file, fsync, os.replace), then deletes the older step folders. A kill at any
moment leaves the old pointer or the new one, each naming a complete folder: a step folder gets its name
only once it is whole. (One gap: re-saving a step whose folder exists, another fingerprint's or a run's
with resume off, deletes it first; a kill right then leaves a pointer to nothing, which `load` survives.)

`load` trusts the pointer. If the pointer is unreadable (truncated, garbage) or names a missing folder, it
falls back to the newest step folder whose meta.json reads, and with none the run starts fresh. A
checkpoint of another fingerprint (other settings, data or code) is ignored.

meta.json holds the step, the fingerprint and whatever `meta` the caller passes: logged curves, and
`run_id`, the MLflow run a resumed stage continues. `load` reads JSON only, so peeking is cheap.

Several processes (torchrun, accelerate): every process calls `save` with the same arguments, and each
one's `write` puts its share (its RNG state, its shard) into the same folder, on a filesystem they share.
Only the main process renames, writes meta.json and the pointer, and deletes old folders, after barriers.
On one process the barriers are no-ops.

Saved RNG states go through `rng_state`: types that `torch.load(..., weights_only=True)` accepts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from alignment import registry
from alignment.paths import hash_paths
from alignment.tracking import STAGE_RUN_ENV
from alignment.training import distributed, sharding

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
POINTER = "latest.json"
META = "meta.json"


def save(
    checkpoint_dir: Path, step: int, fingerprint: str, write: Callable[[Path], None], meta: dict | None = None
) -> Path:
    """Write checkpoint `step` through `write(folder)` and make it the latest; returns its folder. Every
    process of a launch calls it; `write` runs on each."""
    is_main, barrier = distributed.is_main(), distributed.barrier
    target = checkpoint_dir / f"step_{step:07d}"
    partial = checkpoint_dir / f".{target.name}.partial"  # hidden from the step_* globs
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left behind by a kill mid-save
        partial.mkdir(parents=True)
    barrier()  # no process writes into the folder before it is there, emptied
    write(partial)
    if is_main:
        # run_id: the MLflow run that wrote it; a stage killed after this checkpoint continues that run
        meta = {
            "run_id": os.environ.get(STAGE_RUN_ENV),
            **(meta or {}),
            "step": step,
            "fingerprint": fingerprint,
        }
        (partial / META).write_text(json.dumps(meta))
    barrier()  # every process's files are in before the folder gets its name
    if is_main:
        shutil.rmtree(target, ignore_errors=True)  # a same-step checkpoint of other settings
        partial.rename(target)
        _replace_json(checkpoint_dir / POINTER, {"path": target.name, "step": step})
    barrier()  # nobody can still be writing or reading what is deleted next
    if is_main:
        for old in [*checkpoint_dir.glob("step_*"), *checkpoint_dir.glob(".step_*.partial")]:
            if old != target:  # older checkpoints, and saves a kill cut short
                shutil.rmtree(old, ignore_errors=True)
    return target


def load(checkpoint_dir: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The latest checkpoint's folder and meta, or None: nothing there, nothing readable, or another
    fingerprint's. Reads JSON only; the caller loads its own files from the folder."""
    found = _from_pointer(checkpoint_dir) or _newest_folder(checkpoint_dir)
    if found is None:
        return None
    folder, meta = found
    if meta.get("fingerprint") != fingerprint:
        logger.info("ignoring checkpoint %s: it belongs to other settings, data or code", folder)
        return None
    return folder, meta


def _from_pointer(checkpoint_dir: Path) -> tuple[Path, dict] | None:
    pointer = checkpoint_dir / POINTER
    if not pointer.exists():
        return None
    try:
        folder = checkpoint_dir / json.loads(pointer.read_text())["path"]
        return folder, _read_meta(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("unusable %s (%r): looking for the newest complete step folder", pointer, error)
        return None


def _newest_folder(checkpoint_dir: Path) -> tuple[Path, dict] | None:
    for folder in sorted(checkpoint_dir.glob("step_*"), reverse=True):  # zero-padded: newest first
        try:
            return folder, _read_meta(folder)
        except (OSError, ValueError) as error:
            logger.warning("skipping %s (%r)", folder, error)
    return None


def _read_meta(folder: Path) -> dict:
    meta = json.loads((folder / META).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{folder / META} is not a checkpoint's meta")
    return meta


def _replace_json(path: Path, content: dict) -> None:
    """Write `path` atomically: readers see the old content or the new, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps(content))
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name moves to them
    os.replace(temporary, path)


def rng_state() -> dict:
    """Every global RNG (torch CPU and CUDA, python, numpy) as weights_only-safe types: numpy's uint32
    key array becomes an int64 tensor, the rest are tensors, ints, floats, str, tuples and None."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )


def save_state(
    checkpoint_dir: Path, step: int, fingerprint: str, state: dict, meta: dict | None = None
) -> Path:
    """A loop's own tensors (models, optimizers, ...) and every RNG in `step_<n>/state.pt`, loadable with
    weights_only=True; `meta` (the curves) in meta.json. For loops that do not run under accelerate."""
    state = {**state, "rng": rng_state()}
    return save(
        checkpoint_dir, step, fingerprint, lambda folder: torch.save(state, folder / "state.pt"), meta
    )


def load_state(checkpoint_dir: Path, fingerprint: str) -> tuple[int, dict, dict] | None:
    """(step, state, meta) of what `save_state` wrote, every RNG restored; None when there is nothing to
    resume (see `load`)."""
    found = load(checkpoint_dir, fingerprint)
    if found is None:
        return None
    folder, meta = found
    state = torch.load(folder / "state.pt", weights_only=True)
    set_rng_state(state.pop("rng"))
    logger.info("resumed from %s (step %d)", folder, meta["step"])
    return meta["step"], state, meta


def _without_resume(value):
    if isinstance(value, dict):
        return {k: _without_resume(v) for k, v in value.items() if k != "resume"}
    return value


def fingerprint(
    name: str, cfg, root: Path, iteration: str | None = None, world_size: int | None = None
) -> str:
    """Identifies the run a checkpoint belongs to: the stage's settings (less `resume`), the content of
    what it reads (`registry.inputs`), the package's code, the number of processes and whether they shard
    the parameters (FSDP2's checkpoints hold shards). A checkpoint of anything else is never resumed
    (`world_size`: this launch's number of processes by default)."""
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(PACKAGE.rglob("*.py")))).hexdigest()
    parts = [
        name,
        str(iteration),
        _without_resume(cfg.model_dump()),
        hash_paths(registry.inputs(registry.get(name), cfg, root, iteration)),
        code,
        distributed.world() if world_size is None else world_size,
        "fsdp2" if sharding.enabled() else "replicated",
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
