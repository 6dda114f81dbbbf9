"""Prompts of one source from a split of `prepare`'s prompt files, for the on-policy stages."""
from __future__ import annotations

from alignment.data import read_jsonl
from alignment.paths import Paths


def load_prompts(paths: Paths, split: str, source: str, limit: int) -> list[str]:
    """The first `limit` prompts of `split` ("train", "eval", "test") whose `source` matches."""
    path = paths.data / f"prompts_{split}.jsonl"
    prompts = [r["prompt"] for r in read_jsonl(path) if r["source"] == source][:limit]
    if not prompts:
        raise ValueError(f"{path}: no prompts with source {source!r}")
    return prompts
