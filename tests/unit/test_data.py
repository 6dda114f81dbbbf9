"""Data parsing on the real HH-RLHF and IMDb quirks, drop accounting, splits and file errors."""

import gzip
import json

import pytest

from alignment.config import PrepareConfig, Source
from alignment.data.chat import render_prompt
from alignment.data.io import DataError
from alignment.data.sources import (
    clean_review,
    normalise,
    prepare,
    prompt_key,
    read_rows,
    split_hh_transcript,
    split_words,
)
from tests.conftest import ROOT

HH = ROOT / "data" / "embedded" / "hh_pairs.jsonl.gz"
IMDB = ROOT / "data" / "embedded" / "imdb_reviews.jsonl.gz"
HH_SOURCE = Source(name="hh", kind="hh", path=str(HH))


def real_hh_rows() -> list[dict]:
    with gzip.open(HH, "rt") as f:
        return [json.loads(line) for line in f]


def test_multi_turn_transcript_keeps_every_turn_in_the_prompt():
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    prompt, response = split_hh_transcript(transcript)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert response == " Fine, thanks."
    assert prompt + response == transcript


def test_real_hh_pairs_without_a_shared_prompt_are_dropped_and_counted():
    rows = real_hh_rows()
    outcomes = [normalise(HH_SOURCE, row, max_chars=10**9)[1] for row in rows]
    no_shared = [row for row, reason in zip(rows, outcomes) if reason == "no_shared_prompt"]
    # the embedded subset keeps every such pair of both source splits: 5 of them in harmless-base
    assert sum(row["source"] == "harmless-base_test" for row in no_shared) == 5
    for row in no_shared:
        assert split_hh_transcript(row["chosen"])[0] != split_hh_transcript(row["rejected"])[0]
    kept = [row for row, reason in zip(rows, outcomes) if reason is None]
    multi_turn = [row for row in kept if row["chosen"].count("\n\nHuman:") > 1]
    assert len(multi_turn) > 500  # multi-turn dialogue survives whole
    records, _ = normalise(HH_SOURCE, multi_turn[0], max_chars=10**9)
    pair = records["preference"]
    # the prompt is the dialogue as messages; in the HH format (a tokenizer without a chat template) it
    # is the transcript again, and the reply keeps its leading space
    assert [m["role"] for m in pair["prompt"]][-2:] == ["assistant", "user"]
    assert render_prompt(None, pair["prompt"]) + pair["chosen"] == multi_turn[0]["chosen"]
    assert render_prompt(None, pair["prompt"]) + pair["rejected"] == multi_turn[0]["rejected"]


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant:  ", "empty_response"),
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: x ", "identical_responses"),
        ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y", "no_shared_prompt"),
        ("\n\nHuman: a", "\n\nHuman: a\n\nAssistant: y", "no_assistant_turn"),
        ("\n\nHuman: a\n\nAssistant: " + "x" * 50, "\n\nHuman: a\n\nAssistant: y", "too_long"),
    ],
)
def test_drop_reasons(chosen, rejected, reason):
    assert normalise(HH_SOURCE, {"chosen": chosen, "rejected": rejected}, max_chars=40) == ({}, reason)


def test_imdb_prefix_prompts_and_markup():
    text = clean_review("A fine  film.<br /><br />Truly, it was great fun to watch.")
    assert "<br" not in text and "  " not in text
    prompt, rest = split_words(text, 3)
    assert prompt == "A fine film." and rest.startswith(" Truly") and prompt + rest == text
    assert split_words("only two", 3) is None


def test_prepare_is_deterministic_and_splits_share_no_prompt():
    cfg = PrepareConfig(
        seed=3,
        eval_fraction=0.1,
        test_fraction=0.2,
        max_chars=1500,
        sources=(
            Source(name="imdb", kind="text", path=str(IMDB), limit=400),
            HH_SOURCE.model_copy(update={"limit": 400}),
        ),
    )
    first, report = prepare(cfg)
    second, _ = prepare(cfg)
    assert first == second
    for schema, splits in first.items():
        prompts = {split: {prompt_key(row["prompt"]) for row in rows} for split, rows in splits.items()}
        assert not prompts["train"] & prompts["eval"] and not prompts["train"] & prompts["test"]
        assert not prompts["eval"] & prompts["test"]
        assert all(rows for rows in splits.values()), schema
    hh = report["sources"]["hh"]
    assert hh["read"] == 400 and hh["kept"] + sum(hh["dropped"].values()) == 400
    assert (
        report["rows"]["preference"]["train"]
        + report["rows"]["preference"]["eval"]
        + report["rows"]["preference"]["test"]
        == hh["kept"]
    )
    # another seed reshuffles the splits
    other, _ = prepare(cfg.model_copy(update={"seed": 4}))
    assert other["sft"]["test"] != first["sft"]["test"]


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: not valid JSON"):
        read_rows(str(path), ("prompt", "chosen", "rejected"))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: missing field 'rejected'"):
        read_rows(str(path), ("prompt", "chosen", "rejected"))
    with pytest.raises(DataError, match=r"pairs.jsonl: line 1: missing field 'response'"):
        read_rows(str(path), ("prompt", "response"))


def test_every_supported_format_reads_the_same_rows(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"p{i}", "response": f" r{i}"} for i in range(5)]
    frame = pd.DataFrame(rows)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    frame.to_parquet(tmp_path / "a.parquet")
    frame.to_csv(tmp_path / "a.csv", index=False)
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.parquet", "a.csv"):
        assert read_rows(str(tmp_path / name), ("prompt", "response")) == rows, name
    with pytest.raises(DataError, match=r"a.csv: line 4: missing field 'response'"):
        frame.loc[2, "response"] = None
        frame.to_csv(tmp_path / "a.csv", index=False)
        read_rows(str(tmp_path / "a.csv"), ("prompt", "response"))


def test_a_hub_id_that_cannot_be_reached_is_a_clear_error():
    with pytest.raises(DataError, match="no-such-org/no-such-dataset: could not be read"):
        read_rows("no-such-org/no-such-dataset", ("prompt",))
