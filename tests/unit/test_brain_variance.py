"""The BRAIn variance toy: target N(0, 1), policy N(theta, 1), proposal N(mu, 1), n samples per estimate.

What the numbers show (default config: theta = 1, n = 8, mu = 0 .. 1, 10k estimates, seed 0):
  brain                  variance 0.176 .. 0.199, flat (symmetric about mu = 1/2); mean 0.77 .. 0.85,
                         biased towards 0 at n = 8 (self-normalisation), but exactly 0 at theta = 0.
  no_self_normalization  unbiased; variance U-shaped: 0.59 at mu = 0, 0.35 near mu = 0.35, 1.65 at mu = 1.
  no_baseline            variance grows steadily 0.128 -> 0.311; unbiased only at mu = 0, where it is
                         the lowest of the three (plain Monte Carlo, variance 1/n).
  dpg (true log Z)        unbiased; variance grows fastest, 0.128 (1/n) -> 2.08 (closed form 1.57).
  gdcpp (true log Z)      the same estimator as no_self_normalization: the same numbers, bit for bit.
So "BRAIn stays flat while the ablations grow" holds between the ends of the range, but the
no-self-normalisation ablation first falls, and BRAIn's variance is the lowest only away from mu = 0.
"""

import csv
import json
import math
from itertools import pairwise

import pytest
import torch
from torch.distributions import Normal

from alignment.config import BrainVarianceConfig
from alignment.paths import Paths
from alignment.stages import brain_variance
from alignment.stages.brain_variance import ALL_METHODS, METHODS, gradient_estimates, variance_table

THETA, N, ESTIMATES = 1.0, 8, 10_000


@pytest.fixture(autouse=True)
def one_thread():
    # tensors this small gain nothing from threads, and on a busy machine the hand-offs cost ~20x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_table() -> dict[str, list[dict]]:
    """The experiment at the default config, rows per method in order of mu."""
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one
    rows = variance_table(BrainVarianceConfig())
    return {
        m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["proposal_mean"])
        for m in ALL_METHODS
    }


def estimates(method: str, mu: float, theta: float = THETA, n: int = N, seed: int = 0) -> torch.Tensor:
    return gradient_estimates(method, mu, theta, n, ESTIMATES, torch.Generator().manual_seed(seed))


def standard_error(grads: torch.Tensor) -> float:
    return math.sqrt(grads.var().item() / len(grads))


def test_deterministic_under_seed():
    cfg = BrainVarianceConfig(proposal_means=(0.0, 0.7), estimates=500, seed=3)
    assert variance_table(cfg) == variance_table(cfg)
    assert variance_table(cfg) != variance_table(cfg.model_copy(update={"seed": 4}))


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        gradient_estimates("reinforce", 0.0, 1.0, 8, 10, torch.Generator())


# --- hand-worked special cases --------------------------------------------------------------------


def test_no_baseline_on_target_is_plain_monte_carlo():
    """mu = 0: q = p, so alpha = 1/n and the gradient is -(1/n) sum (y_i - theta) = theta - mean(y):
    unbiased, with variance 1/n."""
    y = torch.randn(ESTIMATES, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = estimates("no_baseline", 0.0)
    assert torch.allclose(grads, THETA - y.mean(-1))
    assert grads.var().item() == pytest.approx(1 / N, rel=0.1)


def test_brain_with_proposal_on_policy_is_no_baseline_plus_control_variate():
    """mu = theta: q = pi, so beta = 1/n and BRAIn's gradient is
    -sum alpha_i (y_i - theta) + (mean(y) - theta): the no-baseline estimate plus a zero-mean control
    variate, the same draws giving both."""
    y = THETA + torch.randn(ESTIMATES, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(estimates("brain", THETA), estimates("no_baseline", THETA) + y.mean(-1) - THETA)


def second_moment(a: float, b: float, mu: float) -> float:
    """K(a, b) = E_q[(N(a)/q)(N(b)/q)(y - theta)^2], y ~ q = N(mu, 1). Since
    N(a) N(b) / N(mu) = exp((m^2 - a^2 - b^2 + mu^2) / 2) N(m) with m = a + b - mu,
    K(a, b) = exp((m^2 - a^2 - b^2 + mu^2) / 2) (1 + (m - theta)^2)."""
    m = a + b - mu
    return math.exp((m**2 - a**2 - b**2 + mu**2) / 2) * (1 + (m - THETA) ** 2)


def test_second_moment_matches_quadrature():
    """The closed form against the integral of N(a) N(b) / N(mu) (y - theta)^2 on a fine grid."""
    y = torch.linspace(-20, 20, 400_001, dtype=torch.float64)

    def density(mean: float) -> torch.Tensor:
        return Normal(mean, 1.0).log_prob(y).exp()

    for a, b, mu in [(0, 0, 0.5), (0, THETA, 1.0), (THETA, THETA, 0.0)]:
        integral = torch.trapezoid(density(a) * density(b) / density(mu) * (y - THETA) ** 2, y).item()
        assert integral == pytest.approx(second_moment(a, b, mu), rel=1e-9)


def test_variance_without_self_normalization_matches_closed_form():
    """The estimate is -(1/n) sum h_i, h = (p/q - pi/q)(y - theta), y ~ q, with E h = -theta, so
    Var = (K(0, 0) - 2 K(0, theta) + K(theta, theta) - theta^2) / n. At mu = 1/2, theta = 1:
    (e^(1/4) 13/4 - 2 e^(-1/4) 5/4 + e^(1/4) 5/4 - 1) / 8 ~ 0.354. (mu = 1/2 because there the
    importance weights' tails are lightest, so the sample variance settles fastest.)"""
    mu = 0.5
    exact = (
        second_moment(0, 0, mu) - 2 * second_moment(0, THETA, mu) + second_moment(THETA, THETA, mu) - THETA**2
    ) / N
    assert exact == pytest.approx(0.354, abs=1e-3)
    assert estimates("no_self_normalization", mu).var().item() == pytest.approx(exact, rel=0.15)


def test_dpg_variance_matches_closed_form():
    """DPG with the true normaliser: -(1/n) sum (p/q)(y_i - theta), so Var = (K(0, 0) - theta^2) / n.
    At mu = 1/2, theta = 1: m = -1/2, K(0, 0) = e^(1/4) (1 + 9/4) = 4.173, Var = 3.173 / 8 ~ 0.397
    (at mu = 0, (2 - 1) / 8 = 1/n; at mu = 1, (5e - 1) / 8 = 1.574). Over ten seeds the 10k-estimate
    variance lands within 0.97 .. 1.09 of it."""
    mu = 0.5
    exact = (second_moment(0, 0, mu) - THETA**2) / N
    assert exact == pytest.approx(0.397, abs=1e-3)
    assert estimates("dpg", mu).var().item() == pytest.approx(exact, rel=0.15)


def test_dpg_on_target_is_plain_monte_carlo():
    """mu = 0: p/q = 1, so dpg's estimate is theta - mean(y), the same numbers as no_baseline's there."""
    assert torch.allclose(estimates("dpg", 0.0), estimates("no_baseline", 0.0))


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_gdcpp_closed_form_is_brain_loss_without_self_normalization(mu):
    """gdcpp's weights (p - pi)/q with log Z = 0 are what `brain_loss(self_normalize=False,
    log_partition=0)` differentiates to: the closed form and autograd agree on the same draws."""
    assert torch.allclose(estimates("gdcpp", mu), estimates("no_self_normalization", mu), atol=1e-12)


# --- bias -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["no_self_normalization", "dpg", "gdcpp"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_true_normaliser_estimators_are_unbiased(method, mu):
    # E_q[(p/q)(y - theta)] = E_p[y - theta] = -theta and E_q[(pi/q)(y - theta)] = E_pi[y - theta] = 0
    grads = estimates(method, mu)
    assert abs(grads.mean().item() - THETA) < 4 * standard_error(grads)


def test_brain_is_biased_at_finite_n_but_consistent():
    """Self-normalised importance weights (ratios of sample sums) are biased by O(1/n): at n = 8 the
    mean gradient is ~15% short of theta, though it points the right way; at n = 128 the gap is ~1%."""
    small, large = estimates("brain", 0.5, n=8), estimates("brain", 0.5, n=128)
    assert 0 < small.mean().item() < THETA - 10 * standard_error(small)
    assert abs(large.mean().item() - THETA) < abs(small.mean().item() - THETA) / 5


def test_brain_bias_vanishes_at_the_optimum():
    """theta = 0: pi = p, so beta = alpha and every BRAIn estimate is 0, whatever the proposal.
    Without the baseline, the self-normalised estimate of E_p[y] leans towards the proposal's mean,
    so the estimator keeps pushing theta away from the target: its mean is not 0."""
    for mu in (0.5, 1.0):
        assert estimates("brain", mu, theta=0.0).abs().max().item() < 1e-12
    no_baseline = estimates("no_baseline", 1.0, theta=0.0)
    assert abs(no_baseline.mean().item()) > 10 * standard_error(no_baseline)


# --- the claim: BRAIn's variance stays flat as the proposal moves away from the target -------------


def variances(rows: list[dict]) -> list[float]:
    return [r["grad_variance"] for r in rows]


def test_brain_variance_stays_flat(default_table):
    brain = variances(default_table["brain"])
    assert max(brain) / min(brain) < 1.3  # measured 1.13
    # and at the far end it is the lowest of the three
    assert brain[-1] < min(variances(default_table[m])[-1] for m in ("no_self_normalization", "no_baseline"))


def test_no_baseline_variance_grows(default_table):
    no_baseline = variances(default_table["no_baseline"])
    assert all(a < b for a, b in pairwise(no_baseline))
    assert no_baseline[-1] / no_baseline[0] > 1.8  # measured 2.43
    # near the target it beats BRAIn: at mu = 0 it is plain Monte Carlo (variance 1/n = 0.125)
    assert no_baseline[0] < variances(default_table["brain"])[0]


def test_no_self_normalization_variance_grows_but_not_monotonically(default_table):
    """Its baseline pi/q is itself an importance weight, heaviest-tailed when q is far from the policy
    (mu = 0, theta = 1), so the variance first falls (closed form: 0.555 at mu = 0, 0.325 at mu = 0.4),
    then grows with p/q (1.199 at mu = 1)."""
    variance = variances(default_table["no_self_normalization"])
    # heavy-tailed: across seeds the 10k-estimate ratio ranges 1.4 .. 2.8 (closed form 2.16)
    assert variance[-1] / variance[0] > 1.3  # measured 2.78 at seed 0
    assert min(variance) < 0.75 * variance[0]  # measured 0.58


def test_dpg_variance_grows_fastest(default_table):
    """Nothing tempers DPG's weights p/q: no baseline, no self-normalisation. Closed form
    (K(0, 0) - 1) / n rises 0.125 -> 1.574 over mu = 0 .. 1; seed 0 measures 0.128 -> 2.08 (p/q's
    heavy tail at mu = 1), above the other methods' 1.65 at most."""
    dpg = variances(default_table["dpg"])
    assert all(a < b for a, b in pairwise(dpg))
    assert dpg[0] == pytest.approx(1 / N, rel=0.1)
    assert dpg[-1] > max(variances(default_table[m])[-1] for m in METHODS)
    assert variances(default_table["gdcpp"]) == variances(default_table["no_self_normalization"])


# --- the stage ------------------------------------------------------------------------------------


def test_run_writes_table_csv_and_metrics(tmp_path):
    cfg = BrainVarianceConfig(proposal_means=(0.0, 0.5, 1.0), estimates=200)
    paths = Paths(tmp_path)
    metrics = brain_variance.run(cfg, paths, None)

    table = json.loads((tmp_path / "outputs" / "brain_variance" / "variance.json").read_text())
    assert table["config"]["estimates"] == 200 and table["true_gradient"] == 1.0
    cells = {(r["method"], r["proposal_mean"]) for r in table["rows"]}
    assert cells == {(m, mu) for m in ALL_METHODS for mu in cfg.proposal_means}
    with open(paths.plots("brain_variance") / "variance.csv") as f:
        wide = list(csv.DictReader(f))
    assert list(wide[0]) == ["proposal_mean", "kl_proposal_target", *ALL_METHODS]
    assert [float(r["kl_proposal_target"]) for r in wide] == [0.0, 0.125, 0.5]
    assert json.loads(paths.metrics("brain_variance").read_text()) == metrics
    ratio = metrics["brain/variance_farthest"] / metrics["brain/variance_nearest"]
    assert metrics["brain/variance_ratio"] == pytest.approx(ratio)


def test_figure_has_one_line_per_method():
    rows = variance_table(BrainVarianceConfig(proposal_means=(0.0, 1.0), estimates=50))
    figure = brain_variance.variance_figure(rows)
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.lines] == list(ALL_METHODS)
    assert ax.get_yscale() == "log"
