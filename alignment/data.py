"""Reading raw data and normalising it to the project's three schemas.

- SFT:        {"prompt", "response", "source"}
- preference: {"prompt", "chosen", "rejected", "source"}
- prompts:    {"prompt", "source"}

Responses keep their leading whitespace, so `prompt + response` is the original text exactly.
Every file goes through `datasets` (local jsonl / jsonl.gz / json / parquet / csv, or a hub id). A
malformed file raises DataError naming file, line and field; a well-formed row that cannot be used is
dropped and counted by reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from alignment.config import PrepareConfig, Source

SCHEMAS = ("sft", "preference", "prompts")
SPLITS = ("train", "eval", "test")
ASSISTANT = "\n\nAssistant:"
REQUIRED_FIELDS = {
    "text": ("text",),
    "hh": ("chosen", "rejected"),
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}
LOADERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A malformed input file: the message names the file, the line (or row) and the field."""


# ---------------------------------------------------------------------------------------- reading
def read_rows(path: str, fields: tuple[str, ...], split: str = "train") -> list[dict]:
    """Rows of a local file or hub dataset, each checked to carry every field in `fields`."""
    import datasets  # heavy import, only for the stages that read raw data

    local = Path(path)
    try:
        if local.exists():
            loader = LOADERS.get(local.suffix)
            if loader is None:
                raise DataError(
                    f"{path}: unsupported file type {local.suffix!r}; use one of {sorted(LOADERS)}"
                )
            dataset = datasets.load_dataset(loader, data_files=str(local), split="train")
        else:
            dataset = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as error:
        if local.exists() and LOADERS.get(local.suffix) == "json":
            _raise_first_bad_json_line(local)
        raise DataError(f"{path}: could not be read: {error}") from error

    first_line = 2 if local.suffix == ".csv" else 1  # csv: line 1 is the header
    unit = "line" if local.exists() and local.suffix != ".parquet" else "row"
    rows = dataset.to_list()
    for field in fields:
        if field not in dataset.column_names:
            raise DataError(
                f"{path}: {unit} {first_line}: missing field {field!r} (fields: {dataset.column_names})"
            )
    for i, row in enumerate(rows):
        for field in fields:
            if not isinstance(row[field], str):
                problem = (
                    "missing field"
                    if row[field] is None
                    else f"field is {type(row[field]).__name__}, not text:"
                )
                raise DataError(f"{path}: {unit} {i + first_line}: {problem} {field!r}")
    return rows


def _raise_first_bad_json_line(path: Path) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: not valid JSON: {error.msg}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: not valid JSON: {error.msg}") from None


# ------------------------------------------------------------------------------------ normalising
def split_hh_transcript(transcript: str) -> tuple[str, str] | None:
    """`\\n\\nHuman: … \\n\\nAssistant: reply` -> (every turn up to and with the last `Assistant:`, reply)."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def clean_review(text: str) -> str:
    """IMDb reviews carry `<br />` markup; a space keeps words apart without adding line structure."""
    return re.sub(r"[ \t]{2,}", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def split_words(text: str, n: int) -> tuple[str, str] | None:
    """The first n whitespace-separated words, and the rest with its leading space."""
    match = re.match(rf"\s*(?:\S+\s+){{{n - 1}}}\S+", text)
    if match is None or match.end() == len(text):
        return None
    return match.group(0), text[match.end() :]


def normalise(source: Source, row: dict, max_chars: int) -> tuple[dict[str, dict], str | None]:
    """One raw row -> ({schema: record}, drop reason or None)."""
    if source.kind == "text":
        parts = split_words(clean_review(row["text"]), source.prompt_words)
        if parts is None:
            return {}, "too_short_for_prompt"
        prompt, response = parts
        responses = [response]
    elif source.kind == "hh":
        chosen, rejected = split_hh_transcript(row["chosen"]), split_hh_transcript(row["rejected"])
        if chosen is None or rejected is None:
            return {}, "no_assistant_turn"
        if chosen[0] != rejected[0]:
            return {}, "no_shared_prompt"
        prompt, responses = chosen[0], [chosen[1], rejected[1]]
    elif source.kind == "preference":
        prompt, responses = row["prompt"], [row["chosen"], row["rejected"]]
    elif source.kind == "sft":
        prompt, responses = row["prompt"], [row["response"]]
    else:  # prompts
        prompt, responses = row["prompt"], []

    if not prompt.strip():
        return {}, "empty_prompt"
    if any(not r.strip() for r in responses):
        return {}, "empty_response"
    if len(responses) == 2 and responses[0].strip() == responses[1].strip():
        return {}, "identical_responses"
    if len(prompt) + max((len(r) for r in responses), default=0) > max_chars:
        return {}, "too_long"

    name = source.name
    records: dict[str, dict] = {"prompts": {"prompt": prompt, "source": name}}
    if responses:
        records["sft"] = {"prompt": prompt, "response": responses[0], "source": name}
    if len(responses) == 2:
        records["preference"] = {
            "prompt": prompt,
            "chosen": responses[0],
            "rejected": responses[1],
            "source": name,
        }
    return records, None


def assign_split(prompt: str, seed: int, eval_fraction: float, test_fraction: float) -> str:
    """Deterministic by (seed, prompt): rows sharing a prompt always land in the same split."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "eval" if u < test_fraction + eval_fraction else "train"


def prepare(cfg: PrepareConfig) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """All sources -> {schema: {split: rows}} and a report of rows read, kept and dropped by reason."""
    out: dict[str, dict[str, list[dict]]] = {schema: {split: [] for split in SPLITS} for schema in SCHEMAS}
    report: dict = {"sources": {}}
    seen_prompts: set[str] = set()  # each prompt once in `prompts`, however many pairs share it
    for source in cfg.sources:
        rows = read_rows(source.path, REQUIRED_FIELDS[source.kind], source.split)
        if source.limit is not None:
            rows = rows[: source.limit]
        dropped: Counter[str] = Counter()
        for row in rows:
            records, reason = normalise(source, row, cfg.max_chars)
            if reason is not None:
                dropped[reason] += 1
                continue
            split = assign_split(records["prompts"]["prompt"], cfg.seed, cfg.eval_fraction, cfg.test_fraction)
            for schema, record in records.items():
                if schema == "prompts":
                    if record["prompt"] in seen_prompts:
                        continue
                    seen_prompts.add(record["prompt"])
                out[schema][split].append(record)
        report["sources"][source.name] = {
            "read": len(rows),
            "kept": len(rows) - sum(dropped.values()),
            "dropped": dict(sorted(dropped.items())),
        }
    report["rows"] = {
        schema: {split: len(rows) for split, rows in splits.items()} for schema, splits in out.items()
    }
    return out, report


# ----------------------------------------------------------------------------- prepared jsonl i/o
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
    """A metrics file DVC and strict JSON readers accept: NaN (a rate over nothing) becomes null."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and value != value else value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(metrics), indent=2) + "\n")
