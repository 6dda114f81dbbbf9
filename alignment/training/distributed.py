"""Where a stage's tensors live and which process does what, when a stage runs as several processes
(`torchrun` or `accelerate launch`): one helper owns placement, the accelerate `PartialState` device.

One process (the default `python -m alignment <stage>`) is the special case of every function here:
the device is the GPU when there is one, else the CPU; `shard` returns everything; `gather` its input;
the barrier is a no-op. Under N processes:
- every model a stage loads goes to `device()`; batches go to their model's device, results come back
  with `.cpu()`;
- work on independent items (sampling prompts, scoring rows, reference log-probs) is split with
  `shard` into contiguous blocks, one per process, and put back in order with `gather`: since every
  sample's seed is a function of its prompt (`generation.prompt_seed`), the result is the same for any N;
- only the main process writes files, logs to MLflow and registers models (`is_main`); the others wait
  at `barrier()`.
On a machine without a GPU the processes talk over gloo (accelerate's MULTI_CPU). Under FSDP2
(alignment/training/sharding.py) the models are gathered around `map_sharded`, so that each process runs the
forward passes of its own block.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from alignment.training import sharding

T = TypeVar("T")
R = TypeVar("R")


def use_cpu(device: str = "auto") -> bool:
    """accelerate's `cpu` flag: forced by `device: cpu`, and needed on a machine without a GPU for
    torchrun's processes to form a (gloo) group; without it each would run alone as rank 0."""
    return device == "cpu" or not torch.cuda.is_available()


TIMEOUT_ENV = "ALIGNMENT_PROCESS_GROUP_TIMEOUT_MINUTES"


@functools.cache
def state():
    """The process's accelerate PartialState (initialises the process group under torchrun), its collectives
    waiting `ALIGNMENT_PROCESS_GROUP_TIMEOUT_MINUTES` (the launch section's `timeout_minutes`; torch's default
    is 10 minutes, which the main process alone registering a big model can outlast)."""
    from datetime import timedelta

    from accelerate import PartialState

    minutes = os.environ.get(TIMEOUT_ENV)
    timeout = {"timeout": timedelta(minutes=float(minutes))} if minutes else {}
    return PartialState(cpu=use_cpu(os.environ.get("ALIGNMENT_DEVICE", "auto")), **timeout)


def launched() -> bool:
    """Whether this process was started by a launcher as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> int:
    return state().num_processes if launched() else 1


def rank() -> int:
    return state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """The device every model of this process goes to: its GPU (one per process), else the CPU."""
    return state().device


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def shard(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous block of `items` (block sizes differ by at most one)."""
    n, w, r = len(items), world(), rank()
    return items[r * n // w : (r + 1) * n // w]


def gather(mine: list[R]) -> list[R]:
    """Every process's list, concatenated in rank order, on every process: with `shard`, the results
    of a map over items back in the items' order."""
    if not launched():
        return list(mine)
    everyone: list = [None] * world()
    torch.distributed.all_gather_object(everyone, mine)
    return [item for part in everyone for item in part]


def map_sharded(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn(items), computed block-wise across the processes: fn maps a list to one result per item, each
    item's result independent of the others in its list (a process with no items skips fn). Models that
    FSDP2 shards must be gathered around the call (`sharding.gathered`): each process runs its own number
    of forward passes."""
    mine = shard(items)
    return gather(list(fn(mine)) if len(mine) else [])


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Metrics averaged over processes (each process's value weighted equally)."""
    if not launched() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(tensor)
    return {k: v / world() for k, v in zip(keys, tensor.tolist())}


def to_device(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(device())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU of the main process when FSDP2 shards them: a collective, every
    process calls it. None when every process holds them whole (one process, DDP): the model saves its own."""
    if not sharding.is_sharded(model):
        return None
    return sharding.full_state_dict(model)
