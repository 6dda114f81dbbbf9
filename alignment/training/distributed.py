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
On a machine without a GPU the processes talk over gloo (accelerate's MULTI_CPU). Under FSDP or ZeRO-3
(parameters sharded) `map_sharded` computes every item in every process: forward passes are collectives.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def use_cpu(device: str = "auto") -> bool:
    """accelerate's `cpu` flag: forced by `device: cpu`, and needed on a machine without a GPU for
    torchrun's processes to form a (gloo) group; without it each would run alone as rank 0."""
    return device == "cpu" or not torch.cuda.is_available()


@functools.cache
def state():
    """The process's accelerate PartialState (initialises the process group under torchrun)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(os.environ.get("ALIGNMENT_DEVICE", "auto")))


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


def parameters_sharded() -> bool:
    """Whether the launch shards the parameters themselves (FSDP, DeepSpeed ZeRO-3: accelerate launch
    sets these variables). Then every forward pass is a collective: all processes must run the same
    number of them, so no process may sample a block of prompts of its own."""
    if not launched():
        return False
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    zero3 = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
    return fsdp or zero3


def map_sharded(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn(items), computed block-wise across the processes: fn maps a list to one result per item,
    each item's result independent of the others in its list (a process with no items skips fn).
    Under sharded parameters every process computes every item instead (the same forward passes in
    lockstep; the same results, without the speed-up)."""
    if parameters_sharded():
        return list(fn(items))
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
    """The whole model's weights on the CPU of the main process when the launch shards them (FSDP2,
    ZeRO-3): a collective, every process calls it. None when every process holds them whole (one
    process, DDP), where the model saves its own. Not run on this project's CI (no GPU there)."""
    if not parameters_sharded():
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if is_main() else {}
