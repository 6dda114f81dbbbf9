"""LoRA adapters (Hu et al. 2021) through peft: train a low-rank update of a frozen base model.

The frozen reference that DPO and the policy stages compare against is the same model with its adapter
turned off (`reference_model`), so a LoRA run holds one copy of the weights, not two.

An adapter is saved alone (`save_adapter`): adapter_config.json, adapter_model.safetensors, the model's
config.json and the tokenizer. adapter_config.json's `base_model_name_or_path` names the base so that it
loads from any working directory, with plain peft too: a hub id, or a local folder by its absolute path;
a base inside the project (a pipeline output such as `outputs/sft`) is also kept in `base_model.json` by
its path from the project root, by which another checkout or worker finds its own copy.
`alignment.models.loading.load_causal_lm` and `load_sequence_classifier` load such a folder like any saved
model: the base (found by `resolve_base`), then the adapter merged in. Registered in MLflow, an adapter
names its base by the registered version's URI (alignment/tracking.py).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import LoraConfig
from alignment.models.loading import (
    ADAPTER_CONFIG,
    BASE_RECORD,
    load_causal_lm,
    record_attention,
    resolve_base,
    save_pretrained,
    stored_dtype,
)

logger = logging.getLogger(__name__)


def add_adapter(model: PreTrainedModel, cfg: LoraConfig, seed: int = 0) -> PeftModel:
    """`model` with a fresh adapter (B = 0: it starts as the identity). The base weights are frozen in place
    (in whatever dtype they were loaded); only the adapter trains, and a reward model's `score` head in
    full (it is fresh, and saved with the adapter), both in float32. A is drawn from `seed` alone (the
    global RNG is left as it was), so the adapter is the same whatever ran before it: in any process of a
    launch, and for any number of processes."""
    reward_model = hasattr(model, "score")
    targets = cfg.target_modules
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        task_type="SEQ_CLS" if reward_model else "CAUSAL_LM",
        modules_to_save=["score"] if reward_model else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, peft_config)
    # what trains keeps float32 weights over a bf16 / fp16 base (peft upcasts the adapter, not the head)
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    return model


@contextmanager
def reference_model(model: PeftModel) -> Iterator[PeftModel]:
    """The base model, from the same weights: `model` with its adapter off, in eval mode (no dropout) and
    without gradients. The training flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def unwrap(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (its layers carry the adapter), or `model` itself: for
    code that reaches into a model's parts, such as a reward model's `base_model` and `score`."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_adapter(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, out: Path, merge: bool = False
) -> None:
    """The adapter, the model's config (labels, pad id, reward pooling) and the tokenizer in `out`. With
    `merge`, `out` holds the merged model instead, a plain model like any other in the dtype its base
    checkpoint stores (a bfloat16 base trained in float32 saves bfloat16), and the adapter goes to
    `out/adapter`. The in-memory model keeps its adapter either way."""
    base = model.peft_config[model.active_adapter].base_model_name_or_path
    if merge:
        merged = copy.deepcopy(model).merge_and_unload()
        dtype = stored_dtype(base) if base else None
        save_pretrained(merged if dtype is None else merged.to(dtype), tokenizer, out)
        out = out / "adapter"
    elif not base:
        raise ValueError("the base model was built in memory and saved nowhere: save the adapter merged")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # adapter_config.json and adapter_model.safetensors only
    if base:
        record_base(out, base)
    model.config.save_pretrained(out)
    record_attention(model.config, out)
    tokenizer.save_pretrained(out)


def record_base(out: Path, base: str) -> None:
    """Name a local base in `out/adapter_config.json` by its absolute path (peft records it as it was
    loaded, e.g. `outputs/sft`, which resolves only from the project root), and one inside the working
    directory (the project root of a stage) in BASE_RECORD by its path from there. A hub id stays."""
    if not Path(base).exists():
        return
    absolute = Path(base).resolve()
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(
        json.dumps(config | {"base_model_name_or_path": str(absolute)}, indent=2)
    )
    if absolute.is_relative_to(Path.cwd().resolve()):
        project_path = absolute.relative_to(Path.cwd().resolve()).as_posix()
        (out / BASE_RECORD).write_text(json.dumps({"project_path": project_path}) + "\n")


class AdapterDisabled(torch.nn.Module):
    """A LoRA policy's base model as a frozen reference: every call runs the policy with its adapter off,
    in eval mode and without gradients (`reference_model`). Holds no weights of its own, so moving it,
    or switching its mode, leaves the policy alone; `parameters()` are the policy's (for its device)."""

    def __init__(self, policy: PeftModel):
        super().__init__()
        self._policy = (policy,)  # a tuple: not a submodule, so .eval() / .train() do not reach it

    def forward(self, *args, **kwargs):
        with reference_model(self._policy[0]) as model:
            return model(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self._policy[0].parameters(recurse)

    def get_base_model(self):
        """The transformers model inside (its config, generation config, heads), as peft's own method."""
        return self._policy[0].get_base_model()

    @property
    def config(self):
        return self._policy[0].config


def load_for_training(
    path: Path, cfg: LoraConfig, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[PeftModel, str]:
    """A LoRA policy to train from the saved model at `path`, and the path of its base: an adapter folder
    goes on training its own adapter on its base (so the adapter off is still that base, the SFT model
    for a ReST iteration); a whole model gets a fresh adapter. The frozen base in `dtype` (None: as
    saved), the adapter in float32."""
    if (Path(path) / ADAPTER_CONFIG).is_file():
        base_path = resolve_base(Path(path))
        base = load_causal_lm(base_path, dtype=dtype)
        return PeftModel.from_pretrained(base, str(path), is_trainable=True), base_path
    return add_adapter(load_causal_lm(path, dtype=dtype), cfg, seed), str(path)
