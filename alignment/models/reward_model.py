"""A reward model: a scalar head on a transformer, read at each sequence's true last token (the usual
reward model) or averaged over the response's tokens (`pooling: mean`, kept in the saved config)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from alignment import precision
from alignment.data.batching import collate, encode
from alignment.losses.logprobs import IGNORE_INDEX, gather_last
from alignment.models.loading import load_sequence_classifier, load_tokenizer
from alignment.models.scoring import in_batches, inner_model


def load_reward_model(
    name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A sequence-classification model with one output; a causal-LM checkpoint gets a fresh head; a LoRA
    adapter folder loads with its adapter and head merged in. dtype None: as the checkpoint stores it."""
    model = load_sequence_classifier(name_or_path, trust_remote_code, dtype)
    if not hasattr(model, "score"):
        raise ValueError(
            f"{name_or_path}: {type(model).__name__} has no `score` head; use a decoder-only model"
        )
    return model


POOLING = ("last", "mean")


def pooling(model: PreTrainedModel) -> str:
    """How `model` turns per-token scores into a reward: `reward_pooling` in its config, `last` if unset
    (any sequence-classification checkpoint from elsewhere)."""
    mode = getattr(model.config, "reward_pooling", "last")
    if mode not in POOLING:
        raise ValueError(f"reward_pooling {mode!r} in the model's config.json: expected one of {POOLING}")
    return mode


def sequence_rewards(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) rewards: the score at each row's last real token, or the mean score over its response tokens.

    `last` finds the last token by the attention mask: HF's own pooling finds it from `pad_token_id`,
    which goes wrong when pad == EOS or with left padding (the bug behind TRL reward models stuck at
    50-60% accuracy). `mean` averages over the positions where `labels` != IGNORE_INDEX (the response
    and its EOS, as `batching.encode` builds them), so the prompt, which chosen and rejected share,
    does not dilute the comparison; it needs `labels`.
    """
    scores = token_scores(model, input_ids, attention_mask)
    if pooling(_inner(model)) == "last":
        return gather_last(scores, attention_mask)
    if labels is None:
        raise ValueError("a mean-pooled reward model needs `labels` to find the response tokens")
    response = ((labels != IGNORE_INDEX) & attention_mask.bool()).float()
    if (response.sum(1) == 0).any():
        raise ValueError("a row with no response token cannot be scored by a mean-pooled reward model")
    return (scores * response).sum(1) / response.sum(1)


_inner = inner_model  # the transformers model inside the wrappers of training (DDP, compile, LoRA)


def token_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) the head's score at every position, read from the head's output during the model's own
    forward: through the forward of whatever wraps it (DDP's gradient hooks, FSDP's gathered shards, a
    LoRA adapter), where calling the body and the head by hand would go around them."""
    captured: list[torch.Tensor] = []
    hook = _inner(model).score.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    return captured[0].squeeze(-1).float()


class RewardScorer:
    """Scores (prompt, response) texts with a saved reward model, `batch_size` sequences per forward.

    `dtype`: the reward model is loaded in it and scores under autocast to it (None: float32, as saved);
    `model`: a reward model already in memory to score with instead of loading the one at `path` (PPO's
    critic with its adapter off is the reward model, one copy of the weights for both); `device`: where a
    loaded model runs (the stages pass their process's device)."""

    def __init__(
        self,
        path: str | Path,
        max_length: int = 256,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        model: torch.nn.Module | None = None,
        device: torch.device | str = "cpu",
    ):
        self.tokenizer = load_tokenizer(path)
        self.dtype = dtype or torch.float32
        if model is None:
            model = load_reward_model(path, dtype=dtype).eval().requires_grad_(False).to(device)
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.pad = collate(self.tokenizer.pad_token_id)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], finished: Sequence[bool]) -> torch.Tensor:
        """(N,) rewards of the (rendered) prompts and responses. `finished[i]`: response i is complete (a
        data set's answer, or a sample that ended with its stop token, `generation.ended`) and is scored
        closed with the end of turn; a sample cut at max_new_tokens is scored as it is, so the reward
        model sees the cut."""
        if not len(prompts) == len(responses) == len(finished):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(finished)} flags")
        encoded = [
            encode(self.tokenizer, p, r, self.max_length, bool(f))
            for p, r, f in zip(prompts, responses, finished)
        ]
        device = next(self.model.parameters()).device

        def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])

        with precision.autocast(self.dtype, device):
            scores = in_batches(
                score, encoded, self.tokenizer.pad_token_id, self.batch_size, device, "reward"
            )
        return torch.cat(scores) if scores else torch.empty(0)
