"""The length-controlled win rate on hand-built judges: one that ignores length, one that only looks at
it, and the edge cases where length cannot explain anything."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignment.evaluation.judging import LOSS, TIE, WIN, ScalarJudge, rates, win_rate_summary
from alignment.evaluation.leaderboard import Samples, content_tokens, judge_model
from alignment.evaluation.length_control import (
    fit_length_model,
    lc_win_rate,
    lc_win_rate_summary,
    length_feature,
)


def test_length_feature_is_tanh_of_the_standardised_difference():
    # d = (-2, 0, 2, 4): mean 1, variance (9 + 1 + 1 + 9) / 4 = 5, so g = tanh(d / 2.236)
    assert length_feature(np.array([-2, 0, 2, 4])) == pytest.approx([-0.7136, 0.0, 0.7136, 0.9456], abs=1e-4)
    assert length_feature(np.array([3, 3, 3])).tolist() == [0.0, 0.0, 0.0]  # no spread: no information


def test_saturated_fit_is_the_mean_of_the_two_length_groups_logits():
    """Two length differences (g = +-a): the model has one parameter per group, so it fits each group's
    mean exactly and theta_0 = (logit(mean+) + logit(mean-)) / 2. Longer answers win 4 of 5, shorter
    ones 2 of 4: theta_0 = (log 4 + log 1) / 2 = log 2, so the rate at equal length is 2/3 (raw 6/9)."""
    targets = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0], dtype=float)
    features = np.array([0.5] * 5 + [-0.5] * 4)
    theta_0, theta_1 = fit_length_model(targets, features, slope_l2=0.0)
    assert theta_0 == pytest.approx(math.log(2), abs=1e-9) and theta_1 == pytest.approx(math.log(4), abs=1e-9)
    assert lc_win_rate(targets, features) == pytest.approx(2 / 3, abs=1e-3)  # the slope's penalty: +-1e-3


def test_lc_equals_the_raw_rate_when_outcomes_do_not_depend_on_length():
    """At every length difference the same mix, win win win loss: theta_1 = 0 solves the fit exactly
    (sum_i g_i (p - y_i) = 0 group by group), so the LC rate is the raw 0.75; with a tie in each group
    (win tie loss win) it is the tie-adjusted 0.625."""
    lengths = np.repeat([-10, 0, 10, 20], 4) + 32
    reference = np.full(16, 32)
    for mix in ([WIN, WIN, WIN, LOSS], [WIN, TIE, LOSS, WIN]):
        outcomes = np.tile(mix, 4)
        summary = lc_win_rate_summary(outcomes, lengths, reference, resamples=200)
        assert summary["lc_win_rate"] == pytest.approx(rates(outcomes)["win_rate"], abs=1e-9)
        assert summary["lc_win_rate_ci_low"] <= summary["lc_win_rate"] <= summary["lc_win_rate_ci_high"]


def test_a_judge_that_prefers_the_longer_answer_is_controlled_to_a_coin_flip():
    """The judge wins the model iff its answer is longer; the model is longer on 80 of 100 prompts
    (by 1..16 tokens, 5 prompts each) and shorter on 20 (by 1..4, 5 each). Raw win rate 0.8. Length
    separates wins from losses, so the slope grows until the penalty holds it (theta_1 ~ 15) and the
    boundary falls between d = -1 and d = +1, where the prompts nearest it are balanced: LC 0.500.
    What this does not promise: under perfect separation the intercept is set by the rows nearest the
    boundary, not identified by the data (the 20 shorter by 1..16 instead: 0.71); a judge with any noise
    in it is the case the estimator is for (next test)."""
    reference = np.full(100, 32)
    model = np.concatenate([32 - np.repeat(np.arange(1, 5), 5), 32 + np.repeat(np.arange(1, 17), 5)])
    outcomes = np.where(model > reference, WIN, LOSS)
    assert rates(outcomes)["win_rate"] == 0.8
    summary = lc_win_rate_summary(outcomes, model, reference, resamples=200)
    assert summary["lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    assert all(0 <= summary[k] <= 1 for k in ("lc_win_rate_ci_low", "lc_win_rate_ci_high"))


def test_a_noisy_length_judge_is_controlled_to_a_coin_flip():
    """P(win) = sigmoid(4 g(d)) whatever the content, the model longer on ~80% of 4000 prompts: the raw
    rate is ~0.74, the fit recovers theta_0 ~ 0 and the LC rate is 0.50 within its interval."""
    rng = np.random.default_rng(0)
    reference = rng.integers(10, 40, 4000)
    longer = rng.random(4000) < 0.8
    model = np.where(longer, reference + rng.integers(1, 20, 4000), reference - rng.integers(1, 20, 4000))
    p_win = 1 / (1 + np.exp(-4 * length_feature(model - reference)))
    outcomes = np.where(rng.random(4000) < p_win, WIN, LOSS)
    assert rates(outcomes)["win_rate"] == pytest.approx(0.74, abs=0.02)
    summary = lc_win_rate_summary(outcomes, model, reference, resamples=200)
    assert summary["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    assert summary["lc_win_rate_ci_low"] < 0.5 < summary["lc_win_rate_ci_high"] < 0.6


@pytest.mark.parametrize("outcome, rate", [(TIE, 0.5), (WIN, 1.0), (LOSS, 0.0)])
def test_all_the_same_outcome_is_the_raw_rate(outcome, rate):
    # nothing varies for length to explain; all wins would send theta_0 to infinity in the fit
    summary = lc_win_rate_summary(np.full(5, outcome), np.arange(5) + 30, np.full(5, 32), resamples=50)
    assert (summary["lc_win_rate"], summary["lc_win_rate_ci_low"], summary["lc_win_rate_ci_high"]) == (
        rate,
        rate,
        rate,
    )


def test_a_constant_length_difference_gives_the_raw_rate_and_its_interval():
    """Every answer 3 tokens longer: length cannot be told from quality, so every resample's LC rate is
    its tie-adjusted rate, and with the same resamples and seed the interval is `win_rate_summary`'s."""
    outcomes = np.array([WIN, WIN, LOSS, TIE, WIN, LOSS, np.nan, WIN])
    summary = lc_win_rate_summary(outcomes, np.full(8, 35), np.full(8, 32), resamples=300, seed=7)
    raw = win_rate_summary(outcomes, resamples=300, seed=7)
    assert summary["lc_win_rate"] == raw["win_rate"] == pytest.approx(4.5 / 7)
    for end in ("ci_low", "ci_high"):  # the same resamples; the rates summed in another order
        assert summary[f"lc_win_rate_{end}"] == pytest.approx(raw[f"win_rate_{end}"], abs=1e-12)


def test_invalid_rows_are_dropped_with_their_lengths():
    outcomes = np.tile([WIN, WIN, WIN, LOSS], 4).astype(float)
    lengths, reference = np.repeat([22, 32, 42, 52], 4), np.full(16, 32)
    with_invalid = lc_win_rate_summary(
        np.append(outcomes, np.nan), np.append(lengths, 500), np.append(reference, 32), resamples=50
    )
    assert with_invalid["lc_win_rate"] == pytest.approx(0.75, abs=1e-9)
    assert math.isnan(lc_win_rate_summary(np.array([np.nan]), [1], [2], resamples=10)["lc_win_rate"])


def test_small_resamples_that_length_separates_stay_finite():
    """Six prompts: many resamples are separable by length or all one outcome; none may blow up."""
    outcomes = np.array([WIN, WIN, LOSS, WIN, TIE, LOSS])
    summary = lc_win_rate_summary(outcomes, np.array([40, 38, 20, 35, 32, 25]), np.full(6, 32), resamples=500)
    assert all(0 <= summary[k] <= 1 for k in summary)


def test_judge_model_reports_lc_next_to_each_win_rate():
    """A scalar judge that scores characters: the model's answers are longer on 3 of 4 prompts and win
    there. judge_model adds `<judge>/lc_win_rate` from the token lengths it is given, on the prompts the
    judge's limit keeps; the EOS is not counted (the first sample: 5 tokens, EOS included, is 4)."""
    judge = ScalarJudge("chars", lambda prompts, responses, finished: [len(r) for r in responses], {})
    samples = Samples(
        ["aaaa", "bbbbbb", "cc", "dddddd"], np.array([5, 6, 2, 6]), np.array([1, 0, 0, 0], bool), []
    )
    references = ["xxx", "yyy", "zzzz", "www"]
    tokens = content_tokens(samples)
    assert tokens.tolist() == [4, 6, 2, 6]
    reference_tokens = np.array([3, 3, 4, 3])
    metrics, judgements = judge_model(
        [judge], ["p"] * 4, samples.responses, references, {"chars": 3}, 100, 0, (tokens, reference_tokens)
    )
    expected = lc_win_rate_summary(judgements["chars"].outcomes, tokens[:3], reference_tokens[:3], 100, 0)
    assert metrics["chars/win_rate"] == pytest.approx(2 / 3)
    assert {k: metrics[f"chars/{k}"] for k in expected} == expected
    assert (
        "chars/lc_win_rate"
        not in judge_model([judge], ["p"] * 4, samples.responses, references, {}, 10, 0)[0]
    )
