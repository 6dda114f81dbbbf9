"""The precision a stage runs its models in (params `<stage>.compute.dtype`, `train.mixed_precision`).

One rule for every stage (docs/scale.md):
- a model the stage only runs (the frozen reference, the reward model, a judge, the models evaluate
  samples from) is loaded in the stage's dtype;
- a model it trains in full keeps float32 weights (AdamW's master copy) and runs under autocast to that
  dtype; under LoRA its frozen base is loaded in the dtype and the adapter stays float32 (peft's default);
- `auto` is bfloat16 on a CUDA GPU that supports it and float32 elsewhere, so a CPU run computes exactly
  what it computed before the knob existed; float32 matmuls on a GPU use TF32 (`enable_tf32`).
"""

from __future__ import annotations

import contextlib

import torch

from alignment.training import distributed


def gpu_has_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a `compute.dtype` value on `device` (default: this process's)."""
    if name == "auto":
        return torch.bfloat16 if gpu_has_bf16(device or distributed.device()) else torch.float32
    return getattr(torch, name)


def training_precision(train) -> str:
    """accelerate's `mixed_precision` for a training loop's `train` section (an OptimizerConfig): `auto` is
    bf16 when the loop trains on a CUDA GPU that supports it, `no` elsewhere; any other value as it is."""
    if train.mixed_precision != "auto":
        return train.mixed_precision
    on_gpu = not distributed.use_cpu(train.device) and gpu_has_bf16(distributed.device())
    return "bf16" if on_gpu else "no"


def autocast(dtype: torch.dtype, device: torch.device | None = None):
    """Every forward inside runs in `dtype` (matmuls; softmaxes and norms stay float32 as autocast keeps
    them): a float32 model, such as a policy trained in full, samples and scores at the stage's precision.
    Nothing at float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast((device or distributed.device()).type, dtype=dtype)


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on an Ampere or later GPU (8-10x float32's throughput, a
    10-bit mantissa): what is left in float32 under bf16 autocast, and a float32 run. Nothing on a CPU."""
    if torch.cuda.is_available():
        # the legacy flags, as accelerate sets them: mixing them with the newer fp32_precision API makes
        # torch.get_float32_matmul_precision() raise
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
