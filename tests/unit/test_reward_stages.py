"""Rewards computed by code through the stages that score samples, on the micro upstream (IMDb prompts):
GRPO and RLOO train on them and log each function (in a real MLflow store), PPO puts their sum on the
last token, ReST's Grow thresholds them, best-of-n picks by them, evaluate judges by them; a function
that raises stops the stage naming itself and the row, or is skipped and counted."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import mlflow
import pytest

from alignment import tracking
from alignment.data.io import read_jsonl
from alignment.paths import Paths
from alignment.rewards.source import RewardFunctionError
from alignment.stages import best_of_n, evaluate, grpo, ppo, rest_iter, rloo
from flows.config import parse
from tests.conftest import MICRO_PARAMS

HERE = "tests.unit.test_reward_stages"
REWARDS = {
    "functions": [
        {"function": f"{HERE}:says_the", "weight": 1.0},
        {"function": "length_penalty", "weight": 0.5, "kwargs": {"max_tokens": 8, "cache_tokens": 4}},
    ]
}


def says_the(completions, **kwargs):
    """1 for a completion with the word "the" (about half of the micro SFT's samples), else 0."""
    return [1.0 if "the" in c.lower().split() else 0.0 for c in completions]


def fails_on_the(completions, **kwargs):
    """1 for a completion without the word "the"; raises on one with it."""
    return [1 / 0 if says else 1.0 for says in says_the(completions)]


@pytest.fixture
def root(upstream, tmp_path, monkeypatch):
    """A copy of the micro upstream to write this test's stage outputs into."""
    copied = tmp_path / "project"
    shutil.copytree(upstream, copied, symlinks=True)
    monkeypatch.chdir(copied)
    return copied


def params(stage: str, **overrides) -> dict:
    return copy.deepcopy(MICRO_PARAMS[stage]) | {"reward": "code", "rewards": REWARDS} | overrides


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_stages_train_on_code_rewards_and_log_each_function(root, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = parse(name, params(name))
    with tracking.mlflow_stage_run(name, root=tmp_path) as log:
        metrics = {"grpo": grpo, "rloo": rloo}[name].run(cfg, Paths(root), log)
        run_id = log.run_id

    # TRL's names, per generation batch, in MLflow and in the batch curve
    history = mlflow.MlflowClient().get_metric_history(run_id, "rewards/says_the/mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    for key in ("rewards/says_the/std", "rewards/length_penalty/mean", "rewards/says_the/skipped"):
        assert mlflow.MlflowClient().get_metric_history(run_id, key), key
    header = (root / f"plots/{name}/train.csv").read_text().splitlines()[0].split(",")
    assert {"rewards/says_the/mean", "rewards/length_penalty/mean"} <= set(header)
    # the held-out judges: gold and the RM as before, and each function and their sum
    for judge in ("gold", "rm", "says_the", "length_penalty", "code"):
        assert {f"{judge}/reward", f"{judge}/sft_reward", f"{judge}/win_rate_vs_sft"} <= set(metrics), judge
    rows = list(read_jsonl(root / f"outputs/{name}/held_out_generations.jsonl"))
    assert [r["policy_says_the"] for r in rows] == says_the([r["policy"] for r in rows])
    assert metrics["says_the/reward"] == pytest.approx(sum(r["policy_says_the"] for r in rows) / len(rows))


def test_a_raising_function_stops_the_stage_or_is_counted(root):
    failing = {"functions": [{"function": f"{HERE}:fails_on_the"}]}
    with pytest.raises(RewardFunctionError, match=r"'fails_on_the' .* failed on row \d+ of the batch"):
        grpo.run(parse("grpo", params("grpo", rewards=failing)), Paths(root), None)
    skipping = failing | {"on_error": "skip"}
    grpo.run(parse("grpo", params("grpo", rewards=skipping)), Paths(root), None)
    with open(root / "plots/grpo/train.csv") as f:
        batches = list(csv.DictReader(f))
    assert sum(float(b["rewards/fails_on_the/skipped"]) for b in batches) > 0
    means = {b["rewards/fails_on_the/mean"] for b in batches}
    assert "1.0" in means and means <= {"1.0", "nan"}  # the rows that did not fail (nan: none did)


def test_ppo_scores_the_sum_on_the_last_token(root):
    rewards = {"functions": [{"function": f"{HERE}:says_the", "weight": 2.0}]}
    metrics = ppo.run(parse("ppo", params("ppo", rewards=rewards)), Paths(root), None)
    # one function, nothing None, no penalty or clip: the score of a rollout is 2 x says_the
    assert metrics["train/objective/scores"] == pytest.approx(2 * metrics["train/rewards/says_the/mean"])
    assert {"says_the/reward", "code/reward", "rm/reward"} <= set(metrics)


def test_rest_grows_and_thresholds_on_code_rewards(root):
    cfg = parse(
        "rest",
        params(
            "rest",
            rewards={"functions": [{"function": f"{HERE}:says_the"}]},
            improve={
                "steps": 1,
                "threshold": {"kind": "value", "start": 0.5},  # keeps the samples that say "the"
                "train": {"batch_size": 1, "learning_rate": 1e-3},
            },
            guard={"held_out": "says_the/reward", "proxy": "code/reward", "tolerance": 10.0},
        ),
    )
    metrics = rest_iter.run(cfg, Paths(root), None, iteration=1)
    grown = list(read_jsonl(root / "outputs/rest/1/grown.jsonl"))
    assert [g["reward"] for g in grown] == says_the([g["response"] for g in grown])
    kept = list(read_jsonl(root / "outputs/rest/1/kept.jsonl"))
    assert {k["response"] for k in kept} == {g["response"] for g in grown if g["reward"] > 0.5}
    assert metrics["grow/code_reward"] == pytest.approx(sum(g["reward"] for g in grown) / len(grown))
    assert {"says_the/reward", "code/reward", "gold/reward"} <= set(metrics)


def test_best_of_n_picks_by_code_and_evaluate_judges_by_it(root):
    rewards = {"functions": [{"function": f"{HERE}:says_the"}]}
    picked = best_of_n.run(parse("best_of_n", params("best_of_n", rewards=rewards)), Paths(root), None)
    # nested picks by the function itself: more samples never score lower by it
    assert picked["best_of_4/says_the/reward"] >= picked["best_of_2/says_the/reward"]
    assert picked["best_of_2/says_the/reward"] >= picked["best_of_1/says_the/reward"]

    evaluated = parse(
        "evaluate",
        copy.deepcopy(MICRO_PARAMS["evaluate"])
        | {"models": {"sft": "outputs/sft"}, "rewards": rewards, "best_of_n": {"n": [2], "reward": "code"}},
    )
    evaluate.run(evaluated, Paths(root), None)
    board = json.loads((root / "outputs/evaluate/leaderboard.json").read_text())
    assert board["judges"]["says_the"]["code"] == f"{HERE}:says_the"
    assert [row["model"] for row in board["models"]] == ["sft", "best_of_2"]
    assert board["models"][1]["says_the/reward"] >= board["models"][0]["says_the/reward"]
    headline = json.loads((root / "metrics/evaluate.json").read_text())["sft"]
    assert "says_the/reward" in list(headline)[:6]  # the accuracy-like mean leads, beside the win rates
