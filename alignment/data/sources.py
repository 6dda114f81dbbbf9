"""Reading raw data and normalising it to the project's three schemas.

- SFT:        {"prompt", "response", "source"}
- preference: {"prompt", "chosen", "rejected", "source"}
- prompts:    {"prompt", "source"}

SFT and prompt rows of `sft`, `prompts` and `arithmetic` sources keep their other columns (a reference
`answer`, an `id`): what a reward computed by code gets beside the completions (alignment/rewards/). The
`arithmetic` kind is generated, not read (alignment/data/arithmetic.py).

A prompt is raw text or a conversation (a list of `{role, content}` messages ending with a user turn,
alignment/data/chat.py); responses are text. Raw-text responses keep their leading whitespace, so
`prompt + response` is the original text exactly. HH transcripts become conversations. Conversational
rows in the hub's schemas are read as they are: `preference` rows with `chosen` / `rejected` as the
assistant turn or the whole conversation (then `prompt` may be absent: the shared turns before the
reply), `sft` rows as `prompt` / `response` or as TRL's `messages`.

Every file goes through `datasets` (local jsonl / jsonl.gz / json / parquet / csv, a local dataset folder
or a hub id). A malformed file raises DataError naming file, line and field; a well-formed row that
cannot be used is dropped and counted by reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from alignment.config import ArithmeticConfig, PrepareConfig, Source
from alignment.data import arithmetic
from alignment.data.chat import check_messages, hh_messages, hh_text
from alignment.data.io import DataError

SCHEMAS = ("sft", "preference", "prompts")
SPLITS = ("train", "eval", "test")
ASSISTANT = "\n\nAssistant:"
REQUIRED_FIELDS = {
    "text": ("text",),
    "hh": ("chosen", "rejected"),
    "sft": ("prompt", "response"),
    "preference": ("chosen", "rejected"),  # `prompt` too, unless chosen / rejected are conversations
    "prompts": ("prompt",),
}
CONVERSATIONAL = ("sft", "preference", "prompts")  # kinds whose fields may hold messages
# kinds whose rows keep their other columns (e.g. a reference `answer`), for a reward computed by code
WITH_COLUMNS = ("sft", "prompts", "arithmetic")
SCHEMA_FIELDS = ("prompt", "response", "chosen", "rejected", "messages", "source")
LOADERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------- reading
def read_rows(
    path: str, fields: tuple[str, ...], split: str = "train", messages_allowed: bool = False
) -> list[dict]:
    """Rows of a local file, a local dataset folder or a hub dataset, each checked to carry every field
    in `fields` as text (or, with `messages_allowed`, as a list of messages). A folder is read as a hub
    dataset is (its data files, `split`)."""
    import datasets  # heavy import, only for the stages that read raw data

    local = Path(path)
    try:
        if local.is_dir():
            dataset = datasets.load_dataset(str(local), split=split)
        elif local.exists():
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
    unit = "line" if local.is_file() and local.suffix != ".parquet" else "row"
    rows = dataset.to_list()
    columns = dataset.column_names
    if messages_allowed and "messages" in columns and fields == REQUIRED_FIELDS["sft"]:
        fields = ("messages",)  # TRL's conversational SFT schema
    if messages_allowed and fields == REQUIRED_FIELDS["preference"]:
        # the prompt may be left out only when the replies are whole conversations that carry it
        if "prompt" in columns or not rows or isinstance(rows[0].get("chosen"), str):
            fields = ("prompt", *fields)
    for field in fields:
        if field not in dataset.column_names:
            raise DataError(f"{path}: {unit} {first_line}: missing field {field!r} (fields: {columns})")
    for i, row in enumerate(rows):
        for field in fields:
            if not isinstance(row[field], str) and not (messages_allowed and isinstance(row[field], list)):
                kind = "text or messages" if messages_allowed else "text"
                problem = (
                    "missing field"
                    if row[field] is None
                    else f"field is {type(row[field]).__name__}, not {kind}:"
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


def _reply(value, prompt) -> tuple[object, str]:
    """A `chosen` / `rejected` / `response` field -> (its prompt, the reply text). Text is the reply itself
    (prompt unchanged); messages are the assistant turn alone or the whole conversation ending with it."""
    if isinstance(value, str):
        return prompt, value
    messages = check_messages(value, "a response")
    if messages[-1]["role"] != "assistant":
        raise ValueError("a response conversation must end with an assistant message")
    return (messages[:-1] or prompt), messages[-1]["content"]


def _conversational(row: dict) -> tuple[object, list[str]] | str:
    """A `preference` / `sft` row that may hold messages -> (prompt, replies), or a drop reason."""
    if "messages" in row and "response" not in row:  # TRL's SFT schema: the whole conversation
        prompt, reply = _reply(row["messages"], None)
        return (prompt, [reply]) if prompt else "no_prompt"
    fields = ["chosen", "rejected"] if "chosen" in row else ["response"]
    prompt = row.get("prompt")
    prompts, replies = zip(*(_reply(row[f], prompt) for f in fields))
    if any(p != prompts[0] for p in prompts):
        return "no_shared_prompt"
    prompt = prompts[0]
    if prompt is None:
        return "no_prompt"
    if isinstance(prompt, list):
        prompt = check_messages(prompt, "prompt")
        if prompt[-1]["role"] != "user":
            return "prompt_not_ending_with_user"
    return prompt, list(replies)


def _chars(prompt) -> int:
    """A prompt's length for `max_chars`: a conversation counts as its HH-format text (the transcript an
    HH row came from), so the limit keeps the same rows whichever form the prompt takes."""
    return len(prompt_key(prompt))


def _blank(prompt) -> bool:
    return not prompt.strip() if isinstance(prompt, str) else not any(m["content"].strip() for m in prompt)


def prompt_key(prompt) -> str:
    """A prompt (text or messages) as one string, what splits and de-duplicates by: a conversation as its
    HH-format text, so an HH row lands in the split its transcript always did."""
    return prompt if isinstance(prompt, str) else hh_text(prompt)


def normalise(source: Source, row: dict, max_chars: int) -> tuple[dict[str, dict], str | None]:
    """One raw row -> ({schema: record}, drop reason or None). Malformed messages raise ValueError."""
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
        prompt = hh_messages(chosen[0].removesuffix(ASSISTANT))  # the turns before the reply
        if prompt is None:
            return {}, "not_a_dialogue"
        responses = [chosen[1], rejected[1]]
    elif source.kind == "arithmetic":  # generated in the project's schema, text only
        prompt, responses = row["prompt"], [row["response"]]
    elif source.kind == "prompts":
        prompt, responses = row["prompt"], []
        if isinstance(prompt, list):
            prompt = check_messages(prompt, "prompt")
    else:  # sft, preference: text or messages
        parsed = _conversational(row)
        if isinstance(parsed, str):
            return {}, parsed
        prompt, responses = parsed

    if _blank(prompt):
        return {}, "empty_prompt"
    if any(not r.strip() for r in responses):
        return {}, "empty_response"
    if len(responses) == 2 and responses[0].strip() == responses[1].strip():
        return {}, "identical_responses"
    if _chars(prompt) + max((len(r) for r in responses), default=0) > max_chars:
        return {}, "too_long"

    name = source.name
    columns = {k: v for k, v in row.items() if k not in SCHEMA_FIELDS} if source.kind in WITH_COLUMNS else {}
    records: dict[str, dict] = {"prompts": {"prompt": prompt, "source": name, **columns}}
    if responses:
        records["sft"] = {"prompt": prompt, "response": responses[0], "source": name, **columns}
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
        if source.kind == "arithmetic":
            task = source.arithmetic or ArithmeticConfig()
            rows = arithmetic.generate(
                task.problems, cfg.seed, task.max_number, task.steps, task.tagged_fraction
            )
        else:
            conversational = source.kind in CONVERSATIONAL
            rows = read_rows(source.path, REQUIRED_FIELDS[source.kind], source.split, conversational)
        if source.limit is not None:
            rows = rows[: source.limit]
        dropped: Counter[str] = Counter()
        for number, row in enumerate(rows, start=1):
            try:
                records, reason = normalise(source, row, cfg.max_chars)
            except ValueError as error:
                raise DataError(f"{source.path or source.name}: row {number}: {error}") from None
            if reason is not None:
                dropped[reason] += 1
                continue
            key = prompt_key(records["prompts"]["prompt"])
            split = assign_split(key, cfg.seed, cfg.eval_fraction, cfg.test_fraction)
            for schema, record in records.items():
                if schema == "prompts":
                    if key in seen_prompts:
                        continue
                    seen_prompts.add(key)
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
