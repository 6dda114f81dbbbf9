"""The best-of-n stage on the micro upstream: a frontier point per n on the policy stages' held-out
prompts, nested (the best of 4 is never worse by the RM than the best of 2), n = 1 an SFT sample."""

import json
import shutil

import pytest

from alignment.evaluation.leaderboard import best_of_n_kl
from alignment.paths import Paths
from alignment.stages import best_of_n
from flows.config import parse
from tests.conftest import MICRO_PARAMS


def test_best_of_n_stage_on_the_micro_upstream(upstream, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(upstream, root, symlinks=True)
    monkeypatch.chdir(root)
    cfg = parse("best_of_n", MICRO_PARAMS["best_of_n"])
    metrics = best_of_n.run(cfg, Paths(root), None)

    assert metrics["eval/prompts"] == 4
    for n in cfg.n:
        assert metrics[f"best_of_{n}/objective/kl"] == pytest.approx(best_of_n_kl(n))
        assert metrics[f"best_of_{n}/gold/reward_ci_low"] <= metrics[f"best_of_{n}/gold/reward"]
        assert metrics[f"best_of_{n}/gold/reward"] <= metrics[f"best_of_{n}/gold/reward_ci_high"]
    assert metrics["best_of_1/objective/kl"] == 0.0
    # nested: the RM's pick among more samples scores at least as high by the RM
    assert metrics["best_of_4/rm/reward"] >= metrics["best_of_2/rm/reward"] >= metrics["best_of_1/rm/reward"]
    # the comparison sample is the same for every n
    assert len({metrics[f"best_of_{n}/gold/sft_reward"] for n in cfg.n}) == 1

    assert json.loads((root / "metrics" / "best_of_n.json").read_text()) == pytest.approx(metrics)
    curve = (root / "plots" / "best_of_n" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("n,objective_kl,gold_reward") and len(curve) == 1 + len(cfg.n)
    picks = (root / "outputs" / "best_of_n" / "picks.jsonl").read_text().splitlines()
    assert len(picks) == 4 and {"prompt", "best", "sft", "best_rm", "best_gold"} <= set(json.loads(picks[0]))
