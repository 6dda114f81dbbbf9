"""tokenizer: a pretrained tokenizer (path, hub id, GGUF), or a byte-level BPE trained on the SFT
training text (the embedded default; with `family`, the CPU twin of a model family's tokenizer), saved in
the HF format."""

from __future__ import annotations

import logging

from alignment.config import TokenizerConfig
from alignment.data.chat import render_prompt, render_row
from alignment.data.io import read_jsonl
from alignment.models.loading import load_tokenizer, train_tokenizer
from alignment.paths import Paths
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: TokenizerConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    if cfg.source == "pretrained":
        tokenizer = load_tokenizer(cfg.name_or_path, cfg.gguf_file)
    else:
        # training split only: no eval or test text shapes the vocabulary
        texts = (
            render_prompt(None, r["prompt"]) + r["response"]
            for r in read_jsonl(paths.data / "sft_train.jsonl")
        )
        if cfg.family is None:
            tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
        else:  # a model family's tokenizer, for a CPU twin of its models (alignment/models/families.py)
            from alignment.models.families import twin_tokenizer

            tokenizer = twin_tokenizer(texts, cfg.family, cfg.min_frequency)
    tokenizer.save_pretrained(paths.tokenizer)
    rows = [
        render_row(tokenizer, row) for _, row in zip(range(200), read_jsonl(paths.data / "sft_eval.jsonl"))
    ]
    sample = [row["prompt"] + row["response"] for row in rows]
    chars = sum(len(t) for t in sample)
    tokens = sum(len(tokenizer(t).input_ids) for t in sample)
    logger.info(
        "vocabulary %d tokens, %.2f characters per token on eval text", len(tokenizer), chars / max(tokens, 1)
    )
    return {"vocab_size": len(tokenizer), "chars_per_token": chars / max(tokens, 1)}
