"""Prompts for the on-policy stages: one source from a split of `prepare`'s prompt files, and new
prompts dropped into a folder (ReST's scheduled retraining picks them up)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from alignment.data.chat import Prompt, check_messages, render_prompt
from alignment.data.io import DataError, read_jsonl
from alignment.data.sources import prompt_key
from alignment.paths import Paths


class PromptRow(str):
    """A rendered prompt that carries its data row's other columns (`columns`: a reference `answer`, an
    `id`), for a reward computed by code (alignment/rewards/). Everywhere else it is the prompt's text:
    tokenized, seeded, hashed, compared and written as that string."""

    columns: dict

    def __new__(cls, text: str, columns: dict | None = None) -> PromptRow:
        row = super().__new__(cls, text)
        row.columns = dict(columns or {})
        return row

    def __reduce__(self):  # pickled (gathered across processes) with its columns
        return PromptRow, (str(self), self.columns)


def prompt_row(tokenizer, row: dict, fields: tuple[str, ...] = ("prompt", "source")) -> PromptRow:
    """A prepared row's prompt rendered for `tokenizer`, carrying every column but `fields`."""
    return PromptRow(
        render_prompt(tokenizer, row["prompt"]), {k: v for k, v in row.items() if k not in fields}
    )


def load_prompts(paths: Paths, split: str, source: str, limit: int, tokenizer) -> list[PromptRow]:
    """The first `limit` prompts of `split` ("train", "eval", "test") whose `source` matches, rendered
    for `tokenizer` (a conversation through its chat template, chat.render_prompt), each with its row's
    other columns."""
    path = paths.data / f"prompts_{split}.jsonl"
    rows = [r for r in read_jsonl(path) if r["source"] == source][:limit]
    prompts = [prompt_row(tokenizer, row) for row in rows]
    if not prompts:
        raise ValueError(f"{path}: no prompts with source {source!r}")
    return prompts


def load_incoming(folder: str | Path) -> tuple[list[Prompt], dict[str, int]]:
    """New prompts dropped into `folder`: `*.jsonl` rows with a `prompt` (text, or a conversation as a list
    of messages), `*.txt` one per line;
    other files (a README) are ignored. Returns the distinct prompts in file-name order and what was
    skipped, by reason. A line that is not JSON raises DataError naming the file and line."""
    prompts, skipped, seen = [], Counter(), set()
    folder = Path(folder)
    files = (
        sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt"))
        if folder.is_dir()
        else []
    )
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                prompt = line.strip()
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
                prompt = row.get("prompt") if isinstance(row, dict) else None
                if isinstance(prompt, list):
                    try:
                        prompt = check_messages(prompt, f"{path}, line {number}")
                    except ValueError as error:
                        raise DataError(str(error)) from None
                elif not isinstance(prompt, str) or not prompt.strip():
                    skipped["no `prompt` string or messages"] += 1
                    continue
            key = prompt_key(prompt)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            prompts.append(prompt)
    return prompts, dict(skipped)
