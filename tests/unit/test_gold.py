"""The gold scorer is the same files for the same fit, whichever process made it (DVC hashes it), and
loads from data alone (JSON and safetensors: no pickle that could run code where it is loaded)."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from alignment.evaluation.gold_scorer import GoldScorer
from tests.conftest import ROOT

FIT = """
import sys
from pathlib import Path
from alignment.evaluation.gold_scorer import GoldScorer
texts = ["a great film", "great acting", "an awful film", "awful, boring"] * 5
GoldScorer.fit(texts, [1, 1, 0, 0] * 5).save(Path(sys.argv[1]))
"""


def test_a_refit_in_another_process_writes_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-c", FIT, str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["scorer.json", "weights.safetensors"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_saved_scorer_scores_exactly_as_the_fitted_one_without_unpickling(tmp_path, monkeypatch):
    texts = ["a great film", "great acting", "an awful film", "awful, boring"] * 5
    fitted = GoldScorer.fit(texts, [1, 1, 0, 0] * 5)
    fitted.save(tmp_path / "gold")
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("the gold scorer must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = GoldScorer.load(Path(tmp_path / "gold"))
    probe = ["great", "awful film", "a great acting film", "no known words"]
    np.testing.assert_array_equal(loaded.reward(probe), fitted.reward(probe))
    # a text with no known n-gram scores the intercept; "great" scores above it, "awful" below
    assert loaded.reward(["zzz"])[0] == loaded.intercept
    assert loaded.reward(["great"])[0] > loaded.intercept > loaded.reward(["awful"])[0]
