"""What the training loops (the supervised trainer and the online-RL loop) ask of the launch, in one place:
where the models live and how they are wrapped, backward, clipping, accumulation without gradient syncs,
autocast, and checkpoints.

Two ways, chosen by the launch, with the same loop code above them:
- accelerate (one process, or DDP under torchrun / `accelerate launch` with a multi-GPU config; MULTI_CPU
  over gloo without a GPU): every process holds the whole model, gradients are all-reduced;
- FSDP2 (alignment/training/sharding.py: `launch.stages.<stage>.sharding: fsdp2`, or accelerate's FSDP
  config): every process holds a shard of each parameter and of the optimizer state.

Checkpoints are the loops' own (weights_only-safe): the model, optimizer and scheduler states with the main
process's extras in `state.pt` (under FSDP2 the model and optimizer in `sharded/`, each process writing its
shard) and every process's RNG states in `rng_<rank>.pt`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from alignment import precision
from alignment.config import OptimizerConfig
from alignment.training import checkpoint, distributed, sharding


class Engine:
    def __init__(self, cfg: OptimizerConfig):
        self.cfg = cfg
        self.fsdp = sharding.enabled()
        # `auto`: bf16 on a GPU that takes it, no on a CPU (alignment/precision.py)
        self.mixed_precision = precision.training_precision(cfg)
        self.accelerator = None
        if not self.fsdp:
            # step_scheduler_with_optimizer off: accelerate would otherwise step the schedule once per process
            # at every optimizer step (it assumes each process's data loader is 1/N as long), and N processes
            # would follow another learning-rate curve than one
            self.accelerator = Accelerator(
                mixed_precision=self.mixed_precision,
                cpu=distributed.use_cpu(cfg.device),
                step_scheduler_with_optimizer=False,
            )
        self.device = distributed.device() if self.fsdp else self.accelerator.device
        self.wrapped: torch.nn.Module | None = None

    def place(self, model: torch.nn.Module | None, frozen: bool = False) -> torch.nn.Module | None:
        """`model` on this process's device; under FSDP2 sharded in place (a frozen one too: the reference
        is as big as the policy). Before its optimizer is made: the optimizer holds the sharded parameters."""
        if model is None:
            return None
        model = model.to(self.device)
        if self.fsdp and not sharding.is_sharded(model):
            if hasattr(model, "peft_config"):
                raise NotImplementedError("a LoRA adapter under FSDP2: launch with DDP (no `sharding`)")
            sharding.shard(model, "no" if frozen else self.mixed_precision)
        return model

    def prepare(self, model: torch.nn.Module, optimizer, scheduler=None):
        """The trained module, optimizer and scheduler as the loop steps them (DDP-wrapped under several
        accelerate processes; FSDP2's sharded model is its own wrapper)."""
        if self.fsdp:
            self.wrapped = model
            return model, optimizer, scheduler
        if scheduler is None:
            wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        else:
            wrapped, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.wrapped = wrapped
        return wrapped, optimizer, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        if self.fsdp:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
        if self.fsdp:
            return sharding.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)

    def autocast(self):
        """The forward passes' precision: accelerate's autocast; FSDP2's mixed-precision policy casts the
        gathered parameters itself."""
        return contextlib.nullcontext() if self.fsdp else self.accelerator.autocast()

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """A micro-batch's backward: gradients synced across processes only on the window's `last` one (DDP's
        no_sync, FSDP2's requires_gradient_sync): one reduction per optimizer step, not per micro-batch."""
        if last or distributed.world() == 1:
            yield
        elif self.fsdp:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(model):
                yield

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if distributed.world() == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    # ------------------------------------------------------------------------------------- checkpoints
    def save_state(self, folder: Path, model: torch.nn.Module, optimizer, scheduler=None, extra=None) -> None:
        """Every process calls it (inside `checkpoint.save`'s write). `model` is the unwrapped module."""
        state = {} if scheduler is None else {"scheduler": scheduler.state_dict()}
        if self.fsdp:
            sharding.save_state(folder, model, optimizer)
        else:
            state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if distributed.is_main():
            torch.save(state | {"extra": extra or {}}, folder / "state.pt")
        torch.save(checkpoint.rng_state(), folder / f"rng_{distributed.rank()}.pt")

    def load_state(self, folder: Path, model: torch.nn.Module, optimizer, scheduler=None) -> dict:
        """What `save_state` wrote, restored on every process; returns the extras."""
        state = torch.load(folder / "state.pt", weights_only=True)
        if self.fsdp:
            sharding.load_state(folder, model, optimizer)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(torch.load(folder / f"rng_{distributed.rank()}.pt", weights_only=True))
        return state["extra"]
