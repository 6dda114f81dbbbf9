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
