"""A reward model: a scalar head on a transformer, read at each sequence's true last token."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from alignment.batching import collate, encode
from alignment.losses import gather_last
from alignment.models import load_tokenizer


def load_reward_model(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence-classification model with one output; a causal-LM checkpoint gets a fresh head."""
    model = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), num_labels=1, trust_remote_code=trust_remote_code
    )
    if not hasattr(model, "score"):
        raise ValueError(
            f"{name_or_path}: {type(model).__name__} has no `score` head; use a decoder-only model"
        )
    return model


def sequence_rewards(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) rewards at each row's last real token, by the attention mask.

    HF's own pooling finds the last token from `pad_token_id`, which goes wrong when pad == EOS or
    with left padding (the bug behind TRL reward models stuck at 50-60% accuracy); the mask cannot.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return gather_last(model.score(hidden).squeeze(-1).float(), attention_mask)


class RewardScorer:
    """Scores (prompt, response) texts with a saved reward model, in batches."""

    def __init__(self, path: str | Path, max_length: int = 256, batch_size: int = 64):
        self.tokenizer, self.model = load_tokenizer(path), load_reward_model(path).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.pad = collate(self.tokenizer.pad_token_id)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        encoded = [encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            batch = self.pad(encoded[start : start + self.batch_size])
            scores.append(sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"]))
        return torch.cat(scores) if scores else torch.empty(0)
