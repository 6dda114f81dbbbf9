"""FSDP2, the project's own: torch's `fully_shard` on every decoder layer and the model as the root, the same
code on CPU processes (gloo) and on GPUs (NCCL).

accelerate shards nothing without a GPU (an FSDP config becomes MULTI_CPU, or a lone process), so a sharded
run that accelerate wrapped would execute code no CPU test ever ran. Here the launch asks for sharding
(`launch.stages.<stage>.sharding: fsdp2`, which sets ALIGNMENT_SHARDING, or accelerate's FSDP config,
which sets ACCELERATE_USE_FSDP), and this module shards; accelerate keeps one process and DDP.

- `shard(model)`: each decoder layer (the model's `_no_split_modules`) and then the whole model become FSDP2
  units: each process holds 1/N of every parameter; a forward gathers a layer's parameters just before the
  layer runs and frees them after it (reshard after forward); gradients are reduce-scattered. A frozen model
  (the reference) is sharded the same way and never trained.
- `gathered(*models)`: the models' full parameters on every process for the length of a block, gathered once
  and not freed after each forward: generation (one forward per token) and scoring, where each process works
  on its own block of prompts, a different number of forwards on each (a sharded forward is a collective,
  so without this every process would have to run every forward in lockstep).
- `save_state` / `load_state`: torch distributed checkpoint of the sharded model and optimizer states, each
  process writing its own shard; `full_state_dict`: the whole model on the main process for `save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SHARDING_ENV = "ALIGNMENT_SHARDING"


def enabled() -> bool:
    """Whether this launch shards the parameters with FSDP2: `ALIGNMENT_SHARDING=fsdp2` (the launch section's
    `sharding`) or accelerate's FSDP config (`accelerate launch --config_file configs/accelerate/fsdp2.yaml`).
    DeepSpeed is refused: no test here has ever started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise RuntimeError(
            "DeepSpeed launches are not supported (never started by a test here); use FSDP2: "
            "configs/accelerate/fsdp2.yaml, or launch.stages.<stage>: {launcher: torchrun, sharding: fsdp2}"
        )
    return (
        os.environ.get(SHARDING_ENV, "").lower() == "fsdp2"
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    )


def unsupported(stage: str, cfg) -> str | None:
    """Why `stage` with settings `cfg` cannot run under FSDP2, or None: the combinations the project
    refuses before any model is loaded (README "Scale-out")."""
    lora = getattr(cfg, "lora", None) or getattr(getattr(cfg, "improve", None), "lora", None)
    if lora is not None:
        return f"{stage}: a LoRA adapter under FSDP2 is not supported; launch it with DDP (no sharding)"
    if getattr(cfg, "critic_init", None) == "policy_head":
        return f"{stage}: critic_init policy_head under FSDP2 is not supported; use reward_model or sft"
    return None


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names of the decoder layers (what a transformers model never splits across devices) of
    `model`, or of the transformers model inside it (a peft wrapper, a value head over a reward model)."""
    for module in model.modules():
        inner = getattr(module, "get_base_model", lambda m=module: m)()
        names = set(getattr(inner, "_no_split_modules", None) or [])
        if names:
            return names
    raise ValueError(f"{type(model).__name__} names no decoder layers (_no_split_modules): can't shard it")


def shard(model: torch.nn.Module, mixed_precision: str = "no") -> torch.nn.Module:
    """`model` sharded in place, every decoder layer a unit of its own and the model the root. bf16 mixed
    precision: parameters gathered in bf16, gradients reduced in float32 (the sharded master weights stay
    float32). Returns `model`.

    The root's forward must return the tensors the loss is taken from: FSDP2 gathers the root's own
    parameters (embeddings, final norm, heads) for the backward pass through hooks on those outputs (a
    reward model read at every position is wrapped to return those scores: online.TokenValues)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision == "fp16":
        raise ValueError("mixed_precision fp16 under FSDP2 needs a sharded gradient scaler: use bf16")
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    names = layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _units(models) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(*models: torch.nn.Module | None) -> Iterator[None]:
    """The sharded `models` whole on every process inside the block (one all-gather per unit on entry, none
    per forward), sharded again on exit; models that are not sharded pass through. Every process must enter
    and leave together (the gather is a collective); inside, each may run as many forwards as it likes."""
    units = _units(models)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """The global gradient norm (over every shard), the gradients clipped to `max_norm`."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_state(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """The sharded model and optimizer in `folder/sharded` (torch distributed checkpoint): every process
    writes its shard. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "sharded"))


def load_state(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """What `save_state` wrote, into the sharded model and optimizer (as many processes). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process ({} on the others). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
