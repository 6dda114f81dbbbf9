"""The gold scorer is the same file for the same fit, whichever process made it (DVC hashes it)."""

import subprocess
import sys

from tests.conftest import ROOT

FIT = """
import sys
from pathlib import Path
from alignment.evaluation.gold_scorer import GoldScorer
texts = ["a great film", "great acting", "an awful film", "awful, boring"] * 5
GoldScorer.fit(texts, [1, 1, 0, 0] * 5).save(Path(sys.argv[1]))
"""


def test_a_refit_in_another_process_writes_the_same_bytes(tmp_path):
    for name in ("a.joblib", "b.joblib"):
        done = subprocess.run(
            [sys.executable, "-c", FIT, str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.joblib").read_bytes() == (tmp_path / "b.joblib").read_bytes()
