"""Reading and writing the pipeline's own files: prepared jsonl splits and metrics (strict JSON)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class DataError(ValueError):
    """A malformed input file: the message names the file, the line (or row) and the field."""


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary file beside `path` that replaces `path` when the block ends (flushed and
    fsynced first): a reader, or a process killed mid-write, sees the old file whole or the new one,
    never a part. When the block raises, `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name moves to them
        if path.exists():  # mkstemp makes it 0600: keep the mode the file had
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        else:
            os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_metrics(path: Path, metrics: dict) -> None:
    """A metrics file DVC and strict JSON readers accept: NaN (a rate over nothing) becomes null. Written
    to a temporary file and renamed: a killed stage leaves the old metrics whole, never half a file."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and value != value else value

    write_text_atomic(path, json.dumps(clean(metrics), indent=2) + "\n")
