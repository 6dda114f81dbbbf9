"""Judging arithmetic on known inputs: verdict parsing, the both-order rule, win rates, bootstrap
intervals, position statistics, scalar judges; and the sampler the evaluation relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignment.evaluation.judging import (
    LOSS,
    TIE,
    WIN,
    ScalarJudge,
    Template,
    bootstrap_ci,
    combine,
    load_template,
    parse_verdict,
    position_stats,
    rates,
    win_rate_summary,
)
from alignment.evaluation.leaderboard import best_of, best_of_n_kl, prompt_seed
from alignment.models.generation import sample_next
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A is more positive. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equal: [[C]]", "C"),
        ("Final verdict: [[A]] ... as I said, [[A]]", "A"),
        ("[[A]] no wait [[B]]", None),
        ("A", None),
        ("[A]", None),
        ("", None),
        (None, None),
        ("[[D]]", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize(
    "model_first, model_second, outcome",
    [
        ("A", "B", WIN),
        ("B", "A", LOSS),
        ("C", "C", TIE),
        ("A", "A", TIE),
        ("B", "B", TIE),  # position bias: the two orders disagree
        ("A", "C", TIE),
        ("C", "B", TIE),
        ("B", "C", TIE),
    ],
)
def test_both_orders_must_agree(model_first, model_second, outcome):
    assert combine(model_first, model_second) == outcome


@pytest.mark.parametrize("first, second", [(None, "B"), ("A", None), (None, None)])
def test_an_invalid_order_makes_the_row_invalid(first, second):
    assert math.isnan(combine(first, second))


def test_rates_exclude_invalid_rows():
    outcomes = np.array([WIN, WIN, WIN, LOSS, TIE, np.nan, np.nan])
    r = rates(outcomes)
    assert (r["n"], r["wins"], r["losses"], r["ties"], r["invalid"]) == (5, 3, 1, 1, 2)
    assert r["win_rate"] == pytest.approx(3.5 / 5) and r["win_rate_strict"] == pytest.approx(3 / 5)
    assert math.isnan(rates(np.array([np.nan]))["win_rate"])


def test_bootstrap_interval_matches_the_binomial_and_is_reproducible():
    outcomes = np.array(
        [WIN] * 100 + [LOSS] * 100
    )  # p = 0.5, n = 200: normal interval +-1.96 * 0.0354 = +-0.069
    summary = win_rate_summary(outcomes, resamples=4000, seed=1)
    assert summary["win_rate"] == 0.5
    assert summary["win_rate_ci_low"] == pytest.approx(0.5 - 0.069, abs=0.012)
    assert summary["win_rate_ci_high"] == pytest.approx(0.5 + 0.069, abs=0.012)
    assert win_rate_summary(outcomes, resamples=4000, seed=1) == summary
    assert bootstrap_ci(np.array([WIN] * 20), lambda v: np.mean(v == WIN)) == (1.0, 1.0)
    ties = win_rate_summary(np.array([TIE] * 50 + [WIN] * 50), resamples=500)
    assert (
        ties["win_rate"] == 0.75
        and ties["win_rate_ci_low"] < 0.75 < ties["win_rate_ci_high"]
        and ties["win_rate_strict"] == 0.5
    )
    assert math.isnan(bootstrap_ci(np.array([np.nan]), np.mean)[0])


def test_position_stats():
    details = [
        {"model_first": "A", "model_second": "B"},  # consistent
        {"model_first": "A", "model_second": "A"},  # first position both times
        {"model_first": "C", "model_second": "C"},  # consistent tie
        {"model_first": None, "model_second": "A"},
    ]  # one invalid order
    stats = position_stats(details)
    assert stats["consistency"] == pytest.approx(2 / 3)
    assert stats["first_position_rate"] == pytest.approx(4 / 5)  # A,B,A,A,A: 4 of 5 decided verdicts chose A
    assert stats["invalid_single_verdicts"] == 1


def test_scalar_judge_compares_scores():
    judge = ScalarJudge("len", lambda prompts, responses, _: [len(r) for r in responses], {"model": "length"})
    judgement = judge.compare(["p"] * 3, ["long answer", "ab", "xy"], ["short", "abc", "zw"])
    assert judgement.outcomes.tolist() == [WIN, LOSS, TIE]
    assert judgement.scores.tolist() == [11, 2, 2] and judge.identity()["kind"] == "scalar"


def test_templates_are_mt_bench_pairwise_prompts():
    for name in ("pair-v2", "sentiment-pair"):
        template = load_template(ROOT / "data/judge/templates.jsonl", name)
        messages = template.messages("Q?", "first answer", "second answer")
        assert [m["role"] for m in messages] == ["system", "user"]
        assert '"[[A]]" if assistant A is better' in messages[0]["content"]
        assert messages[1]["content"].index("first answer") < messages[1]["content"].index("second answer")
    assert (
        Template("x", "s", "{question}{answer_a}{answer_b}").sha256
        != Template("x", "s2", "{question}{answer_a}{answer_b}").sha256
    )
    with pytest.raises(ValueError, match="no template named"):
        load_template(ROOT / "data/judge/templates.jsonl", "nope")


def test_sample_next_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).repeat(20000, 1)
    counts = torch.bincount(sample_next(logits, 1.0), minlength=4).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015)
    hot = torch.bincount(sample_next(logits, 0.5), minlength=4).float() / 20000  # p^2 renormalised
    assert torch.allclose(hot, torch.tensor([1, 4, 9, 16]) / 30.0, atol=0.015)
    nucleus = (
        torch.bincount(sample_next(logits, 1.0, top_p=0.65), minlength=4).float() / 20000
    )  # keeps 0.4 and 0.3
    assert nucleus[:2].sum() == 0 and nucleus[3] == pytest.approx(4 / 7, abs=0.015)
    assert sample_next(logits[:2], 0.0).tolist() == [3, 3]
    edge = sample_next(logits[:3], 1.0, uniforms=torch.tensor([0.0, 0.35, 0.999999]))
    assert edge.tolist() == [0, 2, 3]


def test_sample_next_never_draws_a_token_of_zero_probability():
    """At u = 0 the left-side search returned token 0 (EOS) whatever its probability; at u just below
    1 (a float64 uniform that rounds to 1.0 in float32) the right-side search runs past the last token."""
    p = torch.tensor([[0.0, 0.2, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    zero = sample_next(p.log(), 1.0, uniforms=torch.zeros(3))
    assert zero.tolist() == [1, 0, 0]
    nucleus = sample_next(p[1:2].log(), 1.0, top_p=0.65, uniforms=torch.zeros(1))  # keeps tokens 2 and 3
    assert nucleus.tolist() == [2]
    top = sample_next(p.log(), 1.0, uniforms=torch.full((3,), 1 - 1e-12, dtype=torch.float64))
    assert top.tolist() == [3, 3, 1]


def test_best_of_n_helpers():
    scores = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, 0.0, 1.0, 0.5]])
    assert (
        best_of(scores, 1).tolist() == [0, 0]
        and best_of(scores, 2).tolist() == [1, 0]
        and best_of(scores, 4).tolist() == [3, 0]
    )
    assert best_of_n_kl(1) == 0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert prompt_seed(0, "a") == prompt_seed(0, "a") != prompt_seed(1, "a") != prompt_seed(0, "a", 1)


def test_the_leaderboard_puts_rates_that_count_ties_alike_side_by_side():
    """The headline win rate and the length-controlled one both count a tie half (LC beside a rate that
    counted ties as losses compared two conventions); the strict rate (ties none) is shown apart."""
    from alignment.evaluation.leaderboard import leaderboard_markdown

    outcomes = np.array([WIN, TIE, TIE, LOSS])
    summary = win_rate_summary(outcomes, resamples=100)
    row = {"model": "dpo", "objective/kl": 1.0, "objective/kl_se": 0.1, "length/mean_tokens": 5.0}
    row |= {f"llm/{k}": v for k, v in summary.items()} | {"llm/lc_win_rate": 0.5, "llm/consistency": 1.0}
    table = leaderboard_markdown([row], ["llm"], {"llm": {"kind": "pairwise_llm"}})
    cell = table.splitlines()[2].split(" | ")[1]
    assert summary["win_rate"] == 0.5 and summary["win_rate_strict"] == 0.25
    assert cell.startswith("0.500 [") and "; LC 0.500" in cell and "strict 0.250" in cell
    assert "ties ½" in table.splitlines()[0]
