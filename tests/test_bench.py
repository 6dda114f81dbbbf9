"""`python -m alignment.bench` on a micro model: one JSON line, and padded and padding-free DPO count the
same real tokens (the same pairs, whatever the layout)."""

import json

import pytest

from alignment import bench

MICRO = ["--model", "gpt2:1x64", "--vocab-size", "300", "--pairs", "8", "--batch-size", "4"]
MICRO += ["--max-length", "64", "--steps", "1", "--warmup", "1"]


def test_padded_and_padding_free_dpo_report_the_same_tokens(capsys):
    results = []
    for extra in ([], ["--padding-free"]):
        bench.main(MICRO + extra)
        results.append(json.loads(capsys.readouterr().out))
    padded, packed = results
    assert padded["tokens_per_step"] == packed["tokens_per_step"] > 0
    assert packed["padding_free"] and padded["steps_per_second"] > 0 and "mfu" not in padded


def test_padding_free_is_a_dpo_option():
    with pytest.raises(SystemExit):
        bench.parse_args(["--stage", "sft", "--padding-free"])


@pytest.mark.slow  # four fresh processes (one per task and code)
def test_the_memory_view_measures_sampling_and_scoring_before_and_after(capsys):
    """At a 32k vocabulary the former scoring holds the logits of every position and their float32
    log-softmax; the current one, the logits of the response positions: several times less, measured."""
    bench.main(
        ["--view", "memory", "--model", "gpt2:1x32", "--vocab-size", "32000", "--max-length", "256"]
        + ["--new-tokens", "8", "--batch-size", "4"]
    )
    rows = {(r["task"], r["code"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {(t, c) for t in ("sampling", "scoring") for c in ("before", "after")}
    assert all(r["tokens_per_second"] > 0 and r["vocab_size"] == 32000 for r in rows.values())
    full_logits_mib = 4 * 256 * 32000 * 4 / 2**20  # (batch, length, vocabulary) float32: 125 MiB
    assert (
        rows["scoring", "before"]["peak_mib"]
        > 1.5 * full_logits_mib
        > 4 * rows["scoring", "after"]["peak_mib"]
    )
    assert rows["sampling", "before"]["peak_mib"] > 2 * rows["sampling", "after"]["peak_mib"]
