"""Seeded sweeps: the interval arithmetic and matched-KL interpolation on hand-made numbers, the claims on
a hand-made table, and the flow on micro params through real `dvc exp run`s, a real MLflow store and the
Prefect test harness: every point recorded, a second sweep re-runs nothing, a killed sweep resumes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from alignment import tracking
from alignment.config import ConfigError
from alignment.evaluation import sweep_stats as s
from alignment.stages.best_of_n import best_of_n_metrics
from flows.config import parse
from tests.conftest import git, write_params

T_975_2 = 4.302652729911275  # Student's t quantile, 2 degrees of freedom
T_975_4 = 2.7764451051977987


def test_t_interval_by_hand():
    mean, low, high = s.t_interval([1.0, 2.0, 3.0])
    half = T_975_2 * 1.0 / math.sqrt(3)  # sd of [1, 2, 3] is 1
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert s.t_interval([5.0])[0] == 5.0 and math.isnan(s.t_interval([5.0])[1])
    assert math.isnan(s.t_interval([])[0])
    assert s.t_interval([1.0, float("nan"), 3.0])[0] == 2.0  # NaNs dropped


def test_difference_intervals_welch_and_paired():
    # Welch: var 1 each, n 3 each -> se sqrt(2/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    diff, low, high = s.difference_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = T_975_4 * math.sqrt(2 / 3)
    assert diff == -3.0 and low == pytest.approx(-3 - half) and high == pytest.approx(-3 + half)
    assert s.verdict(low, high) == "does not hold"
    # paired: the differences [2, 3, 1] -> mean 2, sd 1
    diff, low, high = s.difference_interval([3.0, 5.0, 4.0], [1.0, 2.0, 3.0], paired=True)
    assert diff == 2.0 and low == pytest.approx(2 - T_975_2 / math.sqrt(3))
    assert s.verdict(low, high) == "inconclusive"  # 2 - 2.48 < 0
    assert s.verdict(0.1, 0.3) == "holds" and s.verdict(float("nan"), float("nan")) == "inconclusive"


def test_interpolation_at_matched_kl_on_a_hand_made_curve():
    assert s.interpolate([1.0, 3.0, 2.0], [10.0, 30.0, 20.0], 2.5) == pytest.approx(25.0)  # sorted by KL
    assert s.interpolate([1.0, 3.0], [10.0, 30.0], 3.0) == 30.0
    assert math.isnan(s.interpolate([1.0, 3.0], [10.0, 30.0], 0.5))  # never extrapolated
    points = [
        {"method": "m", "seed": 0, "value": 0.1, "objective/kl": 1.0, "gold/reward": 0.5},
        {"method": "m", "seed": 0, "value": 0.2, "objective/kl": 3.0, "gold/reward": 0.7},
        {"method": "m", "seed": 1, "value": 0.1, "objective/kl": 2.0, "gold/reward": 0.6},
        {"method": "m", "seed": 1, "value": 0.2, "objective/kl": 4.0, "gold/reward": 0.8},
        {"method": "m", "seed": 2, "value": 0.1, "objective/kl": 2.9, "gold/reward": 0.9},
        {"method": "m", "seed": 2, "value": 0.2, "objective/kl": 5.0, "gold/reward": 1.0},
    ]
    # seed 0: 0.5 + 0.2 * 0.75; seed 1: 0.6 + 0.2 * 0.25; seed 2's curve starts above 2.5: left out
    assert s.at_matched_kl(points, "m", "gold/reward", 2.5) == pytest.approx([0.65, 0.65])
    table = s.matched_kl_table(points, [2.5], ["gold/reward"])
    assert table[0]["seeds"] == 2 and table[0]["mean"] == pytest.approx(0.65)


def test_aggregate_keeps_seed_and_prompt_intervals_apart():
    points = [
        {"method": "m", "value": 1, "seed": k, "gold/reward": g, "gold/reward_ci_low": g - h}
        | {"gold/reward_ci_high": g + h, "objective/kl": 1.0}
        for k, (g, h) in enumerate([(1.0, 0.1), (2.0, 0.3), (3.0, 0.2)])
    ]
    (row,) = s.aggregate(points)
    assert row["seeds"] == 3 and row["gold/reward"] == 2.0
    assert row["gold/reward_high"] - row["gold/reward"] == pytest.approx(T_975_2 / math.sqrt(3))
    assert row["gold/reward_boot_halfwidth"] == pytest.approx(0.2)
    assert "| m | 1 | 3 |" in s.frontier_markdown([row])


def hand_made_sweep() -> list[dict]:
    """BRAIn well ahead of DPO everywhere; PPO and DPO indistinguishable; ReST's RM reward rising."""
    points = []
    for seed, noise in enumerate([-0.01, 0.0, 0.01]):
        for method, base in (("brain", 0.8), ("dpo", 0.6), ("ppo", 0.6)):
            for value, kl in ((1, 1.0), (2, 4.0)):
                win = base + 0.02 * kl + noise * (1 if method != "ppo" else -1)
                points.append({"method": method, "value": value, "seed": seed, "objective/kl": kl + noise})
                points[-1] |= {"gold/win_rate_vs_sft": win, "gold/reward": win, "rm/reward": win}
        for ablation in ("brain_no_baseline", "brain_no_self_normalize"):
            points.append(
                {"method": ablation, "value": None, "seed": seed, "gold/win_rate_vs_sft": 0.5 + noise}
            )
        for iteration, rm in ((0, 0.0), (1, 1.0 + noise), (2, 2.0 + 2 * noise)):
            points.append({"method": "rest", "value": iteration, "seed": seed, "rm/reward": rm})
            points[-1] |= {"gold/reward": 0.3 + noise * iteration, "objective/kl": float(iteration)}
    return points


def test_claims_on_a_hand_made_table():
    rows = {r["claim"]: r for r in s.claims(hand_made_sweep(), targets=[2.0], brain_value=1)}
    assert rows["BRAIn ahead of DPO at matched KL (2 nats)"]["verdict"] == "holds"
    assert rows["BRAIn ahead of DPO at matched KL (2 nats)"]["difference"] == pytest.approx(0.2)
    assert rows["DPO's frontier above PPO's (2 nats)"]["verdict"] == "inconclusive"
    assert rows["BRAIn ahead of its ablation: no baseline (DPG-like)"]["verdict"] == "holds"
    assert rows["ReST: rm/reward rises from iteration 1 to 2"]["verdict"] == "holds"
    assert rows["ReST: rm/reward rises from iteration 1 to 2"]["difference"] == pytest.approx(1.0)
    assert rows["ReST: gold/reward rises from iteration 1 to 2"]["verdict"] == "inconclusive"
    table = s.claims_markdown(list(rows.values()))
    assert table.count("\n") == len(rows) + 2 and "**holds**" in table


def test_grid_and_points_of_each_kind():
    methods = {
        "dpo": SimpleNamespace(
            stages=("dpo",), knob="dpo.beta", values=(0.1, 0.3), seed="dpo.train.seed", set={}
        ),
        "rest": SimpleNamespace(
            stages=("rest_iter@1", "rest_iter@2"), knob=None, values=(), seed="rest.seed", set={}
        ),
    }
    runs = s.grid(methods, seeds=[0, 1])
    assert len(runs) == 2 * 2 + 2
    assert runs[1]["settings"] == {"dpo.beta": 0.3, "dpo.train.seed": 0}
    assert runs[-1]["settings"] == {"rest.seed": 1} and runs[-1]["value"] is None

    best = {"method": "bon", "seed": 0, "stages": ["best_of_n"], "value": None}
    found = {"metrics/best_of_n.json": {"best_of_1/gold/reward": 0.1, "best_of_4/gold/reward": 0.4}}
    assert [(p["value"], p["gold/reward"]) for p in s.points_of(best, found)] == [(1, 0.1), (4, 0.4)]
    rest = {"method": "rest", "seed": 0, "stages": ["rest_iter@1", "rest_iter@2"], "value": None}
    found = {
        "metrics/rest_iter_1.json": {"gold/reward": 0.5, "gold/sft_reward": 0.1, "objective/kl": 2.0},
        "metrics/rest_iter_2.json": {"gold/reward": 0.6, "objective/kl": 3.0},
    }
    points = s.points_of(rest, found)
    assert [(p["value"], p["gold/reward"]) for p in points] == [(0, 0.1), (1, 0.5), (2, 0.6)]
    assert points[0]["objective/kl"] == 0.0 and points[0]["gold/win_rate_vs_sft"] == 0.5  # SFT vs itself


def test_best_of_n_metrics_by_hand():
    rm = np.array([[1.0, 3.0, 0.0], [2.0, 1.0, 5.0]])  # 2 prompts, 2 samples + the SFT comparison
    gold = np.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
    lengths = np.array([[4, 8, 5], [6, 2, 3]], dtype=float)
    one = best_of_n_metrics(rm, {"rm": rm, "gold": gold}, lengths, n=1, seed=0)
    assert one["objective/kl"] == 0.0 and one["gold/reward"] == pytest.approx(0.45)
    assert one["gold/win_rate_vs_sft"] == 0.5  # 0.2 < 0.5, 0.7 > 0.3
    two = best_of_n_metrics(rm, {"rm": rm, "gold": gold}, lengths, n=2, seed=0)
    # the RM picks sample 1 of prompt 0 (3 > 1) and sample 0 of prompt 1 (2 > 1)
    assert two["gold/reward"] == pytest.approx(0.8) and two["length/mean_tokens"] == 7.0
    assert two["objective/kl"] == pytest.approx(math.log(2) - 0.5)
    assert two["rm/win_rate_vs_sft"] == 0.5 and two["gold/win_rate_vs_sft"] == 1.0


def test_sweep_params_are_validated():
    with pytest.raises(ConfigError, match="knob and values go together"):
        parse("sweep", {"methods": {"d": {"stages": ["dpo"], "knob": "dpo.beta", "seed": "dpo.train.seed"}}})
    with pytest.raises(ConfigError, match="unknown stage"):
        parse("sweep", {"methods": {"d": {"stages": ["dpoo"], "seed": "dpo.train.seed"}}})
    with pytest.raises(ConfigError, match="not a key of a stage"):
        parse("sweep", {"methods": {"d": {"stages": ["dpo"], "seed": "sweep.seeds"}}})


# ------------------------------------------------------------------------------- the flow, for real
MICRO_SWEEP = {
    "seeds": [0, 1],
    "matched_kl": [0.01],
    "methods": {  # one method, two strengths, two seeds: 4 points, each a `dvc exp run` of DPO alone
        "dpo": {"stages": ["dpo"], "knob": "dpo.beta", "values": [0.1, 0.5], "seed": "dpo.train.seed"},
    },
}
POINTS = 4


@pytest.fixture
def sweep_project(upstream_project, micro_params):
    write_params(upstream_project / "params.yaml", micro_params | {"sweep": MICRO_SWEEP})
    git(upstream_project, "commit", "-qam", "sweep params")
    return upstream_project


def experiments(project) -> list[str]:
    refs = git(project, "for-each-ref", "--format=%(refname)", "refs/exps")
    # a finished experiment: refs/exps/<baseline sha, split 2/38>/<name> (DVC's temporary refs differ)
    return [
        r.rsplit("/", 1)[1]
        for r in refs.split()
        if re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", r)
    ]


def stage_runs(project) -> list:
    mlflow.set_tracking_uri(tracking.tracking_uri(project))
    return [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("stage") in ("dpo", "brain")
    ]


@pytest.mark.slow
def test_sweep_records_every_point_resumes_when_killed_and_reruns_nothing(sweep_project):
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep
    from tasks.dvc import WorkspaceBusy, workspace_lock

    project = sweep_project
    with (
        temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        # 1. a sweep killed (SIGKILL, with its DVC child) once its first point is recorded
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(project)}
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.sweep"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600
        while not experiments(project):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no point finished in 10 minutes"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        first = set(experiments(project))
        assert 1 <= len(first) < POINTS

        # 2. the re-run resumes: the recorded points are reused, only the others run
        before = len(stage_runs(project))
        result = sweep(root=str(project))
        assert len(result["points"]) == POINTS and len(set(experiments(project))) == POINTS
        assert len(stage_runs(project)) - before == POINTS - len(first)
        assert {(p["method"], p["value"], p["seed"]) for p in result["points"]} == {
            ("dpo", v, k) for v in (0.1, 0.5) for k in (0, 1)
        }
        assert all(math.isfinite(p["gold/reward"]) and "length/mean_tokens" in p for p in result["points"])

        # 3. a second sweep runs nothing: every point is an experiment at this commit already
        runs = len(stage_runs(project))
        again = sweep(root=str(project), overrides={"sweep.matched_kl": [0.02]})  # re-reported only
        assert len(stage_runs(project)) == runs
        assert [p["gold/reward"] for p in again["points"]] == [p["gold/reward"] for p in result["points"]]

        # 4. one flow at a time per workspace: a second one fails at once
        with workspace_lock(project, "sweep"), pytest.raises(WorkspaceBusy, match="another flow"):
            sweep(root=str(project))

    # MLflow: the killed sweep's runs were closed; the last sweep has one child run per point, all reused
    client = mlflow.MlflowClient(tracking.tracking_uri(project))
    sweeps = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.kind = 'sweep'", order_by=["start_time"]
    )
    assert [r.info.status for r in sweeps] == ["KILLED", "FINISHED", "FINISHED"]
    children = client.search_runs(
        [sweeps[-1].info.experiment_id], f"tags.mlflow.parentRunId = '{sweeps[-1].info.run_id}'"
    )
    assert len(children) == POINTS and all(c.data.tags.get("reused") == "true" for c in children)
    assert all("dpo/gold/reward" in c.data.metrics for c in children)
    # the stage runs of the resumed sweep are nested under their point's run and name their experiment
    resumed = client.search_runs(
        [sweeps[1].info.experiment_id], f"tags.mlflow.parentRunId = '{sweeps[1].info.run_id}'"
    )
    ran = [c for c in resumed if c.data.tags.get("reused") != "true"]
    nested = [
        r
        for r in stage_runs(project)
        if r.data.tags.get("mlflow.parentRunId") in {c.info.run_id for c in ran}
    ]
    assert len(nested) == len(ran) and all(r.data.tags["dvc_experiment"] for r in nested)

    # the report: tables, the claims, a DVC plot
    out = project / "outputs" / "sweep"
    for name in ("points.csv", "frontier.csv", "matched_kl.csv", "frontier.md", "claims.md", "frontier.png"):
        assert (out / name).exists(), name
    assert (project / "plots" / "sweep" / "frontier.csv").read_text().startswith("method,value,kl,")
    assert json.loads((out / "summary.json").read_text())["points"] == POINTS
