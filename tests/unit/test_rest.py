"""ReST: threshold arithmetic, filtering, the guard, the champion rule, and the stages on micro models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from alignment.config import ConfigError, GuardConfig, ThresholdConfig
from alignment.data.io import DataError
from alignment.data.prompts import load_incoming
from alignment.evaluation.leaderboard import prompt_seed
from alignment.models.generation import generate_ids
from alignment.models.loading import load_causal_lm, load_tokenizer
from alignment.paths import Paths
from alignment.training.rest_rules import (
    above,
    beats_champion,
    best_iteration,
    guard,
    learning_rate,
    thresholds,
)
from flows.config import parse
from tests.conftest import MICRO_PARAMS


# ------------------------------------------------------------------------------------ arithmetic
def test_value_thresholds_rise_by_the_increment():
    cfg = ThresholdConfig(kind="value", start=0.5, increment=0.25)
    assert thresholds([9.0, -9.0], cfg, 3) == [0.5, 0.75, 1.0]


def test_percentile_thresholds_are_percentiles_of_the_grown_rewards():
    rewards = np.arange(1.0, 101.0)  # 1 .. 100
    cfg = ThresholdConfig(kind="percentile", start=50, increment=25)
    taus = thresholds(rewards, cfg, 2)
    assert taus == [pytest.approx(50.5), pytest.approx(75.25)]  # numpy's linear interpolation
    assert len(above(rewards, taus[0])) == 50 and len(above(rewards, taus[1])) == 25
    # with increment 0 every step uses the same tau
    assert thresholds(rewards, ThresholdConfig(start=90, increment=0), 3) == [pytest.approx(90.1)] * 3


def test_only_samples_strictly_above_tau_are_kept():
    rewards = [0.1, 0.5, 0.5, 0.9, -2.0]
    assert above(rewards, 0.5).tolist() == [3]
    assert above(rewards, -3.0).tolist() == [0, 1, 2, 3, 4]
    assert above(rewards, 1.0).tolist() == []


def test_learning_rate_decays_per_iteration():
    assert [learning_rate(1e-3, 0.5, k) for k in (1, 2, 3)] == [1e-3, 5e-4, 2.5e-4]
    assert learning_rate(1e-3, 1.0, 5) == 1e-3
    with pytest.raises(ValueError):
        learning_rate(1e-3, 0.5, 0)


# ----------------------------------------------------------------------------------------- guard
def record(k, proxy, held_out):
    return {"iteration": k, "rm/reward": proxy, "gold/reward": held_out}


def test_guard_stops_when_proxy_rises_and_held_out_falls():
    cfg = GuardConfig()
    history = [record(0, 0.0, 0.50), record(1, 0.5, 0.70), record(2, 0.9, 0.74), record(3, 1.4, 0.61)]
    assert guard(history[:2], cfg) is None and guard(history[:3], cfg) is None
    reason = guard(history, cfg)
    assert "iteration 3" in reason and "0.740 -> 0.610" in reason and "0.900 -> 1.400" in reason
    assert best_iteration(history, cfg.held_out)["iteration"] == 2


def test_guard_lets_other_moves_pass():
    cfg = GuardConfig()
    assert guard([record(1, 1.0, 0.7), record(2, 0.8, 0.6)], cfg) is None  # both fell: not hacking
    assert guard([record(1, 1.0, 0.7), record(2, 1.2, 0.8)], cfg) is None  # both rose
    assert (
        guard([record(1, 1.0, 0.70), record(2, 1.2, 0.69)], GuardConfig(tolerance=0.02)) is None
    )  # within tolerance
    assert guard([record(1, 1.0, 0.70)], cfg) is None


def test_best_iteration_prefers_the_earliest_of_a_tie():
    history = [record(0, 0.0, 0.5), record(1, 1.0, 0.7), record(2, 2.0, 0.7)]
    assert best_iteration(history, "gold/reward")["iteration"] == 1
    with pytest.raises(ValueError):
        best_iteration([], "gold/reward")


def drifting(kl_3: float = 31.0) -> list[dict]:
    """Word salad: the RM and the bag-of-words gold scorer both keep rising (the README's run, then a
    third iteration) while the held-out KL to SFT climbs 0 -> 2.1 -> 4.1 -> `kl_3` nats."""
    rows = [(0, -0.975, 0.034, 0.0), (1, 0.387, 0.545, 2.1), (2, 1.266, 0.955, 4.1), (3, 2.0, 0.99, kl_3)]
    return [record(k, proxy, gold) | {"objective/kl": kl} for k, proxy, gold, kl in rows]


def test_kl_ceiling_stops_drift_that_no_judge_catches():
    history = drifting()
    # without a ceiling nothing looks wrong: both judges rise, so iteration 3 is kept
    assert guard(history, GuardConfig()) is None
    assert best_iteration(history, "gold/reward")["iteration"] == 3
    cfg = GuardConfig(max_kl=5.0)
    assert guard(history[:3], cfg) is None  # 4.1 <= 5
    assert guard(history, cfg) == (
        "KL ceiling reached at iteration 3: held-out objective/kl 31.00 > rest.guard.max_kl 5.0"
    )
    # gold 0.99 at 31 nats is above the ceiling: iteration 2 (gold 0.955, 4.1 nats) is kept
    assert best_iteration(history, "gold/reward", cfg.max_kl)["iteration"] == 2
    # the ceiling itself is allowed: 4.1 <= 4.1 keeps iteration 2 going and choosable
    assert guard(history[:3], GuardConfig(max_kl=4.1)) is None
    assert best_iteration(history[:3], "gold/reward", 4.1)["iteration"] == 2


def test_kl_ceiling_and_hacking_are_both_reported():
    history = drifting()
    history[3] |= {"gold/reward": 0.5}  # proxy 1.266 -> 2.0 up, gold 0.955 -> 0.5 down, KL 31
    reason = guard(history, GuardConfig(max_kl=5.0))
    assert reason.startswith("reward hacking suspected at iteration 3") and "; KL ceiling reached" in reason


def test_best_iteration_under_a_ceiling_nothing_meets_keeps_the_least_drifted():
    history = drifting()[1:]  # KL 2.1, 4.1, 31: all above 1 nat
    assert best_iteration(history, "gold/reward", 1.0)["iteration"] == 1  # lowest KL, not highest gold


def test_champion_rule_respects_the_kl_ceiling():
    history = drifting()
    promoted, why = beats_champion(history, "gold/reward", 0.0, "version 3", max_kl=5.0)
    assert promoted and "iteration 2 beats champion version 3" in why
    assert not beats_champion(history, "gold/reward", 0.0, "version 3", max_kl=1.0)[0]  # only iteration 0


def test_champion_moves_only_on_improvement():
    key = "gold/reward"
    better = [record(0, 0.0, 0.60), record(1, 0.5, 0.66), record(2, 0.9, 0.64)]
    worse = [record(0, 0.0, 0.60), record(1, 0.5, 0.58), record(2, 0.9, 0.55)]
    assert beats_champion(better, key, 0.0, "version 3")[0]
    assert "iteration 1 beats champion version 3" in beats_champion(better, key, 0.0, "version 3")[1]
    assert not beats_champion(better, key, 0.1, "version 3")[0]  # +0.06 is not more than 0.1
    assert not beats_champion(worse, key, 0.0, "version 3")[0]
    assert not beats_champion([record(0, 0.0, 0.6), record(1, 0.5, 0.6)], key, 0.0, "version 3")[
        0
    ]  # a tie keeps it
    assert beats_champion(worse, key, 0.0, None)[0]  # no champion yet: the best becomes the first


# ---------------------------------------------------------------------------------------- params
def rest_params(**changes) -> dict:
    return json.loads(json.dumps(MICRO_PARAMS["rest"])) | changes


def test_iterations_must_chain_and_be_named_in_order():
    assert list(parse("rest", rest_params()).iterations) == ["1", "2"]
    for iterations, message in [
        ({"1": "outputs/sft", "2": "outputs/dpo"}, "iteration 2 must start from outputs/rest/1/policy"),
        ({"1": "outputs/sft", "3": "outputs/rest/2/policy"}, "named"),
        ({1: "outputs/sft"}, "rest.iterations"),  # an integer key: DVC's foreach would skip it silently
    ]:
        with pytest.raises(ConfigError, match=message):
            parse("rest", rest_params(iterations=iterations))


def test_percentile_schedule_must_stay_below_100():
    improve = {"steps": 3, "threshold": {"kind": "percentile", "start": 60, "increment": 20}}
    with pytest.raises(ConfigError, match="reach 100"):
        parse("rest", rest_params(improve=improve))
    improve["threshold"]["kind"] = "value"  # reward values may go anywhere
    parse("rest", rest_params(improve=improve))


def test_guard_scores_must_be_ones_the_iterations_record():
    with pytest.raises(ConfigError, match="rest.guard.held_out"):
        parse("rest", rest_params(guard={"held_out": "gold/win_rate"}))


def test_max_kl_must_be_positive():
    assert parse("rest", rest_params()).guard.max_kl is None
    assert parse("rest", rest_params(guard={"max_kl": 8.0})).guard.max_kl == 8.0
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="rest.guard.max_kl"):
            parse("rest", rest_params(guard={"max_kl": bad}))


def test_incoming_prompts_are_read_and_bad_rows_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"prompt": "This movie"}\n{"text": "no prompt"}\n\n{"prompt": "This movie"}\n'
    )
    (tmp_path / "b.txt").write_text("I watched it\n\n")
    (tmp_path / "README.md").write_text("ignored")
    prompts, skipped = load_incoming(tmp_path)
    assert prompts == ["This movie", "I watched it"]
    assert skipped == {"no `prompt` string or messages": 1, "duplicate": 1}
    assert load_incoming(tmp_path / "missing") == ([], {})
    (tmp_path / "c.jsonl").write_text('{"prompt": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"c.jsonl, line 2"):
        load_incoming(tmp_path)


# ---------------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module")
def rest_run(upstream, tmp_path_factory):
    """rest_iter@1, rest_iter@2 and rest on the micro upstream outputs, with two incoming prompts."""
    from alignment.stages import rest, rest_iter

    root = tmp_path_factory.mktemp("rest")
    for name in ("data", "outputs"):
        (root / name).symlink_to(upstream / name) if name == "data" else shutil.copytree(
            upstream / name, root / name
        )
    incoming = root / "incoming"
    incoming.mkdir()
    (incoming / "new.txt").write_text("My favourite film of\nThe acting in this\n")
    cfg = parse("rest", rest_params(incoming=str(incoming)))
    paths = Paths(root)
    metrics = [rest_iter.run(cfg, paths, None, iteration=k) for k in (1, 2)]
    return cfg, paths, metrics, rest.run(cfg, paths, None)


def test_iterations_grow_keep_above_tau_and_chain(rest_run):
    cfg, paths, metrics, _ = rest_run
    for k, m in zip((1, 2), metrics):
        grown = [json.loads(line) for line in (paths.rest(k) / "grown.jsonl").read_text().splitlines()]
        kept = [json.loads(line) for line in (paths.rest(k) / "kept.jsonl").read_text().splitlines()]
        assert len(grown) == m["grow/samples"] == (8 + 2) * 3 and m["grow/prompts_incoming"] == 2
        assert m["improve/tau_1"] > m["improve/tau_0"]  # the threshold rises over the Improve steps
        for i in (0, 1):
            tau = m[f"improve/tau_{i}"]
            step = [r for r in kept if r["improve_step"] == i]
            assert all(r["reward"] > tau and r["tau"] == tau for r in step)
            assert (
                len(step)
                == sum(r["reward"] > tau for r in grown)
                == round(m[f"improve/kept_fraction_{i}"] * len(grown))
            )
        assert m["learning_rate"] == pytest.approx(
            cfg.improve.train.learning_rate * cfg.improve.lr_decay ** (k - 1)
        )


def test_iteration_two_starts_from_iteration_one_weights(rest_run):
    """Iteration 2's grown samples are exactly what iteration 1's saved policy draws under their seeds
    (and not what the SFT model draws)."""
    cfg, paths, _, _ = rest_run
    grown = [json.loads(line) for line in (paths.rest(2) / "grown.jsonl").read_text().splitlines()]
    prompts, indices = [r["prompt"] for r in grown], [r["index"] for r in grown]
    seeds = [prompt_seed(cfg.seed * 1_000 + 2, p, j) for p, j in zip(prompts, indices)]
    tokenizer = load_tokenizer(paths.sft)

    def draw(folder):
        model = load_causal_lm(folder)
        return [
            r
            for _, r in generate_ids(
                model, tokenizer, prompts, cfg.grow.max_new_tokens, cfg.grow.temperature, seeds=seeds
            )
        ]

    assert draw(paths.rest(1) / "policy") == [r["response_ids"] for r in grown]
    assert draw(paths.sft) != [r["response_ids"] for r in grown]
    # and iteration 1 changed the weights it started from
    before, after = (
        load_causal_lm(paths.sft).state_dict(),
        load_causal_lm(paths.rest(1) / "policy").state_dict(),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_rest_keeps_the_best_iteration_and_says_why(rest_run):
    cfg, paths, _, summary = rest_run
    selection = json.loads((paths.rest_best / "selection.json").read_text())
    history = selection["history"]
    assert [r["iteration"] for r in history] == [0, 1, 2]
    best = max(history, key=lambda r: (r["gold/reward"], -r["iteration"]))
    assert selection["best_iteration"] == summary["best_iteration"] == best["iteration"]
    assert f"iteration {best['iteration']} has the highest held-out gold/reward" in selection["why"]
    source = paths.sft if best["iteration"] == 0 else paths.rest(best["iteration"]) / "policy"
    assert (paths.rest_best / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (
        (paths.plots("rest") / "iterations.csv")
        .read_text()
        .startswith("iteration,grow/rm_reward,rm/reward,gold/reward")
    )


def test_a_stopped_run_skips_later_iterations(rest_run, tmp_path):
    """A synthetic record where iteration 1 tripped the guard: iteration 2 does not train, keeps its
    start policy, and `rest` says the run stopped."""
    from alignment.stages import rest, rest_iter

    cfg, paths, _, _ = rest_run
    root = tmp_path / "stopped"
    (root / "outputs" / "rest").mkdir(parents=True)
    for name in ("sft", "rm", "gold", "data"):
        (root / "outputs" / name).symlink_to(paths.root / "outputs" / name)
    shutil.copytree(paths.rest(1), root / "outputs" / "rest" / "1")
    report_path = root / "outputs" / "rest" / "1" / "report.json"
    report = json.loads(report_path.read_text())
    report["history"][1] |= {
        "rm/reward": report["history"][0]["rm/reward"] + 1.0,
        "gold/reward": report["history"][0]["gold/reward"] - 0.2,
    }
    cfg = cfg.model_copy(update={"guard": GuardConfig()})  # the micro params' guard never stops
    report["stopped"] = guard(report["history"], cfg.guard)
    assert report["stopped"]
    report_path.write_text(json.dumps(report))
    stopped_paths = Paths(root)
    assert rest_iter.run(cfg, stopped_paths, None, iteration=2) == {"iteration": 2, "skipped": 1}
    assert not (stopped_paths.rest(2) / "grown.jsonl").exists()
    assert (stopped_paths.rest(2) / "policy" / "model.safetensors").read_bytes() == (
        stopped_paths.rest(1) / "policy" / "model.safetensors"
    ).read_bytes()
    summary = rest.run(cfg, stopped_paths, None)
    selection = json.loads((stopped_paths.rest_best / "selection.json").read_text())
    assert summary["guard/stopped"] == 1 and summary["best_iteration"] == 0
    assert "stopped early" in selection["why"] and selection["skipped"] == [2]


def test_improve_examples_cut_a_long_prompt_from_the_left_and_keep_the_response():
    """A kept sample longer than max_length loses the start of its prompt, never the response it was kept
    for (cutting from the right kept the whole prompt and trained on nothing); as `encode` does."""
    import random

    from alignment.losses.logprobs import IGNORE_INDEX
    from alignment.stages.rest_iter import improve_examples

    prompt_ids, response_ids = list(range(100, 150)), [7, 8, 9, 10, 11, 0]
    cfg = parse("rest", {"max_length": 16})
    row = {"prompt_ids": prompt_ids, "response_ids": response_ids}
    (example,) = improve_examples([row], [], cfg, tokenizer=None, rng=random.Random(0))
    assert example["input_ids"] == prompt_ids[-10:] + response_ids
    assert [t for t in example["labels"] if t != IGNORE_INDEX] == response_ids
