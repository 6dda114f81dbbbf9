"""LoRA adapters (Hu et al. 2021) through peft: train a low-rank update of a frozen base model.

The frozen reference that DPO and the policy stages compare against is the same model with its adapter
turned off (`reference_model`), so a LoRA run holds one copy of the weights, not two.

An adapter is saved alone (`save_adapter`): adapter_config.json, adapter_model.safetensors, the model's
config.json and the tokenizer. adapter_config.json's `base_model_name_or_path` records the base as it was
loaded: a pipeline output relative to the project root (`outputs/sft`), an absolute path or a hub id.
`alignment.models.loading.load_causal_lm` and `load_sequence_classifier` load such a folder like any saved
model: the base (found by `resolve_base`), then the adapter merged in.
"""

from __future__ import annotations

import copy
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
    load_causal_lm,
    record_attention,
    resolve_base,
    save_pretrained,
)

logger = logging.getLogger(__name__)


def add_adapter(model: PreTrainedModel, cfg: LoraConfig, seed: int = 0) -> PeftModel:
    """`model` with a fresh adapter (B = 0: it starts as the identity). The base weights are frozen in place;
    only the adapter trains, and a reward model's `score` head in full (it is fresh, and saved with the
    adapter). A is drawn from `seed` alone (the global RNG is left as it was), so the adapter is the same
    whatever ran before it: in any process of a launch, and for any number of processes."""
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
        return get_peft_model(model, peft_config)


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
    `merge`, `out` holds the merged model instead, a plain model like any other, and the adapter goes to
    `out/adapter`. The in-memory model keeps its adapter either way."""
    if merge:
        save_pretrained(copy.deepcopy(model).merge_and_unload(), tokenizer, out)
        out = out / "adapter"
    elif not model.peft_config[model.active_adapter].base_model_name_or_path:
        raise ValueError("the base model was built in memory and saved nowhere: save the adapter merged")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # adapter_config.json and adapter_model.safetensors only
    model.config.save_pretrained(out)
    record_attention(model.config, out)
    tokenizer.save_pretrained(out)


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

    @property
    def config(self):
        return self._policy[0].config


def load_for_training(path: Path, cfg: LoraConfig, seed: int = 0) -> tuple[PeftModel, str]:
    """A LoRA policy to train from the saved model at `path`, and the path of its base: an adapter folder
    goes on training its own adapter on its base (so the adapter off is still that base, the SFT model
    for a ReST iteration); a whole model gets a fresh adapter."""
    if (Path(path) / ADAPTER_CONFIG).is_file():
        base_path = resolve_base(Path(path))
        base = load_causal_lm(base_path)
        return PeftModel.from_pretrained(base, str(path), is_trainable=True), base_path
    return add_adapter(load_causal_lm(path), cfg, seed), str(path)
