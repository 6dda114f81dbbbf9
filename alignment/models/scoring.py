"""Log-probabilities of token sequences under a causal LM without gradients, in batches of a given size,
with logits formed only where a response token is predicted.

A forward pass's logits are (B, T, V) floats: with a 152k vocabulary and 1,000-token rows, 0.6 GB of
float32 per row. A scorer needs them only at the positions that predict a response token, so the hidden
states are cut to those positions before the LM head (transformers' 2-D `logits_to_keep`), and the
log-softmax over the vocabulary runs a chunk of rows at a time (`logprobs.selected_logps`). Each kept
row's logits are the ones a full forward gives, bit for bit (the LM head is a matmul per row).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from alignment.config import PACKED_LOGITS_TRANSFORMERS, _version
from alignment.data.batching import collate
from alignment.losses.logprobs import IGNORE_INDEX, selected_logps


def on_main_process() -> bool:
    """Rank 0 of a launch (torchrun and accelerate set RANK), or a process of its own: the one that shows
    progress bars. (distributed.is_main says the same, from a floor above the models.)"""
    return os.environ.get("RANK", "0") == "0"


def progress(starts: range, desc: str):
    """A progress bar over batches, on the main process, when there is more than one batch."""
    return tqdm(
        starts, desc=desc, unit="batch", mininterval=2.0, disable=len(starts) <= 1 or not on_main_process()
    )


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside the wrappers of training and scoring: DDP / FSDP (`.module`),
    torch.compile (`._orig_mod`), a LoRA adapter or a reference with its adapter off (`get_base_model`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def takes(model: torch.nn.Module, keyword: str) -> bool:
    """Whether the transformers model inside `model` has a forward argument `keyword` (a wrapper passes
    its keywords through)."""
    return keyword in inspect.signature(inner_model(model).forward).parameters


def keeps_2d_logits(model: torch.nn.Module) -> bool:
    """Whether the model slices its hidden states by a 2-D `logits_to_keep` before the LM head."""
    return takes(model, "logits_to_keep") and _version("transformers") >= PACKED_LOGITS_TRANSFORMERS


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions' logits predict a response token (labels[:, t + 1] counts), as (B, K) positions,
    each row's in order and then padded with position 0, and (B, K) bool, which slots are real; K is the
    most response tokens of a row. Counted on the host (a copy of the labels): shapes that do not depend
    on a device's data."""
    real = (labels[:, 1:] != IGNORE_INDEX).cpu()
    k = max(1, int(real.sum(-1).max()))
    order = torch.argsort((~real).int(), dim=1, stable=True)[:, :k]  # a row's real positions first
    slots = real.gather(1, order)
    return torch.where(slots, order, 0).to(labels.device), slots.to(labels.device)


def logits_at(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """(B, K, V) the logits at `positions` (B, K); the LM head runs on those positions alone where the model
    can slice its hidden states before it."""
    if keeps_2d_logits(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.take_along_dim(logits, positions.unsqueeze(-1), dim=1)


@torch.no_grad()
def response_token_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(B, T - 1) float32 log-probs of each response token on the shifted grid of `logprobs.token_logps`
    (column j is token j + 1), 0 off the response: the same values, without prompt or padding logits."""
    labels = batch["labels"]
    positions, slots = response_positions(labels)
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], positions)
    targets = labels.gather(1, positions + 1).masked_fill(~slots, 0)
    picked = selected_logps(logits, targets, temperature) * slots  # filler slots add 0 to position 0
    grid = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float32, device=logits.device)
    return grid.scatter_add_(1, positions, picked)


def in_batches(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    examples: Sequence[dict],
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    desc: str = "score",
) -> list[torch.Tensor]:
    """fn over right-padded batches of `batch_size` examples ({"input_ids", "labels"}) on `device`, each
    result moved to the CPU; a progress bar on the main process when there is more than one batch."""
    pad, out = collate(pad_token_id), []
    starts = range(0, len(examples), batch_size)
    for start in progress(starts, desc):
        batch = {
            key: value.to(device) for key, value in pad(list(examples[start : start + batch_size])).items()
        }
        out.append(fn(batch).cpu())
    return out


@torch.no_grad()
def sequence_logps(
    model, examples: Sequence[dict], batch_size: int, temperature: float = 1.0, pad_token_id: int = 0
) -> torch.Tensor:
    """(N,) summed response log-probs of token-level examples ({"input_ids", "labels"}, labels
    IGNORE_INDEX off the response) under `model` at `temperature`, `batch_size` sequences per forward.
    Right padding: no real token attends to a pad, so the pad id does not matter."""
    device = next(model.parameters()).device
    parts = in_batches(
        lambda batch: response_token_logps(model, batch, temperature).sum(-1),
        examples,
        pad_token_id,
        batch_size,
        device,
    )
    return torch.cat(parts) if parts else torch.empty(0)
