"""Preference pairs as tensors: loading the configured sources, encoding, and batching chosen and
rejected together so that one forward pass scores both (rows [0, B) chosen, [B, 2B) rejected)."""

from __future__ import annotations

import logging

import torch

from alignment.config import PreferenceData
from alignment.data.batching import collate, encode
from alignment.data.chat import render_row
from alignment.data.io import read_jsonl
from alignment.paths import Paths

logger = logging.getLogger(__name__)

FILES = {
    "imdb_pairs": lambda paths, split: paths.pairs / f"{split}.jsonl",
    "prepared": lambda paths, split: paths.data / f"preference_{split}.jsonl",
    "rlaif": lambda paths, split: paths.rlaif / f"{split}.jsonl",
}


def load_pairs(paths: Paths, data: PreferenceData, split: str) -> list[dict]:
    """The pairs of every configured source for `split` ("train" or "eval"), each capped per source.
    Rows keep their own `source` (e.g. `hh` for the human pairs of prepare), for per-source metrics.
    Training pairs with gold rewards closer than `data.min_gold_gap` are dropped (before the cap) and
    counted in the log; pairs without gold rewards (human labels) are kept."""
    cap = data.max_train_pairs if split == "train" else data.max_eval_pairs
    rows = []
    for source in data.sources:
        kept = list(read_jsonl(FILES[source](paths, split)))
        if split == "train" and data.min_gold_gap > 0:
            before = len(kept)
            kept = [r for r in kept if "chosen_gold" not in r or gold_gap(r) >= data.min_gold_gap]
            logger.info(
                "%s: dropped %d of %d training pairs with a gold gap below %g",
                source,
                before - len(kept),
                before,
                data.min_gold_gap,
            )
        rows += kept[:cap]
    return rows


def gold_gap(pair: dict) -> float:
    return abs(pair["chosen_gold"] - pair["rejected_gold"])


def encode_pair(tokenizer, pair: dict, max_length: int) -> dict:
    """A pair (prompt and replies rendered for `tokenizer`, chat.render_row) as token ids. A reply closes
    with EOS when it is finished: `chosen_finished` / `rejected_finished` of sampled pairs, which are
    false for a sample cut at max_new_tokens; a data set's answers (no such field) are finished."""
    pair = render_row(tokenizer, pair)
    return {
        key: encode(tokenizer, pair["prompt"], pair[key], max_length, pair.get(f"{key}_finished", True))
        for key in ("chosen", "rejected")
    }


def collate_pairs(pad_token_id: int):
    pad = collate(pad_token_id)

    def pad_pairs(examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad([e["chosen"] for e in examples] + [e["rejected"] for e in examples])

    return pad_pairs


def count_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor(batch["input_ids"].shape[0] // 2)
