"""Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to
Debias Automatic Evaluators", arXiv 2404.04475): the win rate a judge would give if the model's response
and the reference had the same length.

Per valid prompt i: the outcome as a target y_i (win 1, tie 1/2, loss 0; invalid rows are dropped) and
the length difference d_i = model tokens - reference tokens. A logistic model

    P(model preferred | d) = sigmoid(theta_0 + theta_1 g(d)),   g(d) = tanh(d / sd(d))

is fitted by penalised maximum likelihood, and the length-controlled win rate is its prediction at
d = 0 (g(0) = 0): sigmoid(theta_0). g is AlpacaEval's: the difference over its standard deviation across
the prompts, squashed by tanh so that a few very long answers cannot set the slope. The model is the
paper's GLM with its length and model terms only (alpaca_eval's `length_controlled_minimal`): the
per-instruction difficulty term needs many models judged on the same prompts, and without it every
prompt's prediction is the same, so the mean over prompts of sigmoid(theta_0) is sigmoid(theta_0).
"""

from __future__ import annotations

import numpy as np

from alignment.evaluation.judging import TIE, WIN, bootstrap_ci

# L2 on the slope theta_1 only (the intercept is left free, as scikit-learn leaves it): weak (a prior
# standard deviation of 10 on the logit scale), yet it keeps theta_1 finite when length separates wins
# from losses. Every other non-convergent case is one where all targets are equal (see `lc_win_rate`).
SLOPE_L2 = 0.01


def length_feature(length_difference: np.ndarray) -> np.ndarray:
    """g(d) = tanh(d / sd(d)) per prompt, sd the population standard deviation over the prompts given.
    A constant difference carries no information to tell length from quality apart: g = 0 then.
    Worked: d = (-2, 0, 2, 4) has sd = sqrt(5) = 2.236, so g = tanh((-0.894, 0, 0.894, 1.789)) =
    (-0.713, 0, 0.713, 0.946)."""
    difference = np.asarray(length_difference, dtype=np.float64)
    spread = difference.std() if difference.size else 0.0
    return np.tanh(difference / spread) if spread > 0 else np.zeros_like(difference)


def fit_length_model(targets: np.ndarray, features: np.ndarray, slope_l2: float = SLOPE_L2) -> np.ndarray:
    """(theta_0, theta_1) minimising sum_i [log(1 + e^z_i) - y_i z_i] + slope_l2 theta_1^2 / 2, with
    z_i = theta_0 + theta_1 g_i and fractional targets y_i in [0, 1] (a tie is half a win). Newton's
    method in float64, each step halved until the objective falls, from theta = 0. The objective is
    strictly convex; it has a finite minimiser when some target is above 0 and some below 1 (callers
    handle the rest), so this converges, in ~5 steps on ordinary data, ~12 when length separates."""
    design = np.stack([np.ones_like(features), features], axis=1).astype(np.float64)
    penalty = np.diag([0.0, slope_l2])
    y = np.asarray(targets, dtype=np.float64)

    def objective(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * theta @ penalty @ theta)

    theta = np.zeros(2)
    value = objective(theta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) + penalty @ theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
        step, scale = np.linalg.solve(hessian, gradient), 1.0
        while (trial := objective(theta - scale * step)) > value and scale > 1e-8:
            scale /= 2
        theta, value = theta - scale * step, trial
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return theta


def lc_win_rate(targets: np.ndarray, features: np.ndarray) -> float:
    """sigmoid(theta_0) of `fit_length_model`, the predicted win rate at equal length. When all targets
    are equal (all wins, all losses, all ties) or the feature does not vary, length explains nothing:
    the rate is the raw one, mean(targets), exactly (all wins would otherwise send theta_0 to infinity).
    Worked: targets (1, 1, 1, 0) at every one of several lengths fit theta_1 = 0 exactly, and the rate
    is the raw 0.75."""
    targets = np.asarray(targets, dtype=np.float64)
    if len(targets) == 0:
        return float("nan")
    if np.ptp(targets) == 0 or np.ptp(features) == 0:
        return float(targets.mean())
    theta_0, _ = fit_length_model(targets, features)
    return float(1.0 / (1.0 + np.exp(-theta_0)))


def lc_win_rate_summary(
    outcomes: np.ndarray,
    model_lengths: np.ndarray,
    reference_lengths: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """`lc_win_rate` with its 95% percentile-bootstrap interval over prompts (`lc_win_rate_ci_low`,
    `..._high`), from per-prompt outcomes (WIN / TIE / LOSS / NaN) and response lengths. Invalid rows
    are dropped first; g is computed once on the valid rows and each resample refits the model. With
    the same `resamples` and `seed` as `win_rate_summary`, the interval resamples the same prompts as
    the raw rates' intervals do. Comparable with `win_rate`: both count a tie half."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    valid = ~np.isnan(outcomes)
    targets = np.where(outcomes[valid] == WIN, 1.0, np.where(outcomes[valid] == TIE, 0.5, 0.0))
    difference = np.asarray(model_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    features = length_feature(difference[valid])

    def resampled(rows: np.ndarray) -> float:
        picked = rows.astype(int)
        return lc_win_rate(targets[picked], features[picked])

    low, high = bootstrap_ci(np.arange(len(targets), dtype=np.float64), resampled, resamples, seed=seed)
    return {
        "lc_win_rate": lc_win_rate(targets, features),
        "lc_win_rate_ci_low": low,
        "lc_win_rate_ci_high": high,
    }
