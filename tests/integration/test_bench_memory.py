"""`python -m alignment.bench --view memory`: sampling and scoring, before and after logits were cut to the
positions that need them, each in a fresh process."""

import json

import pytest

from alignment import bench


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
