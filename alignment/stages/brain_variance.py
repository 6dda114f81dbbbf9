"""brain_variance: the BRAIn blog's toy. How noisy is each gradient estimator as the proposal moves
away from the target?

Target p = N(0, 1), policy pi_theta = N(theta, 1), proposal q = N(mu, 1). Each estimate draws
n samples y_i ~ q. The three self-normalised methods (`METHODS`) differentiate `brain_loss` with
respect to theta by autograd, so the numbers are those of the loss the language model trains with, not
of a second implementation. The two of the BRAIn author's toy that use the true normaliser
(`TRUE_NORMALIZER`: DPG and GDC++, log Z = 0 because the Gaussian target is normalised) are closed
forms, with grad_theta log N(y; theta, 1) = y - theta. The true gradient of KL(p || pi_theta)
(equivalently of the cross-entropy -E_p[log pi_theta]) is theta - E_p[y] = theta; each row reports the
estimator's mean, variance and bias against it, and KL(q || p) = mu^2 / 2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch
from torch.distributions import Normal

from alignment.config import BrainVarianceConfig
from alignment.losses.brain_loss import brain_loss
from alignment.paths import Paths
from alignment.plots import plt
from alignment.stages.results import finish
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)

# method -> brain_loss keyword arguments; log Z = 0 because the Gaussian target is normalised
METHODS: dict[str, dict] = {
    "brain": {"self_normalize": True, "baseline": "self_normalized"},
    "no_self_normalization": {"self_normalize": False, "baseline": "self_normalized", "log_partition": 0.0},
    "no_baseline": {"self_normalize": True, "baseline": "none"},
}

# method -> its importance weight w(p/q, pi/q) in the estimate -(1/n) sum_i w_i (y_i - theta), y_i ~ q
TRUE_NORMALIZER: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dpg": lambda target_ratio, policy_ratio: target_ratio,
    "gdcpp": lambda target_ratio, policy_ratio: target_ratio - policy_ratio,
}
ALL_METHODS = (*METHODS, *TRUE_NORMALIZER)


def gradient_estimates(
    method: str, proposal_mean: float, policy_mean: float, n: int, estimates: int, generator: torch.Generator
) -> torch.Tensor:
    """(estimates,) independent estimates of d loss / d theta, each from n samples of N(proposal_mean, 1)."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(ALL_METHODS)}")
    samples = proposal_mean + torch.randn(estimates, n, generator=generator, dtype=torch.float64)
    if method in TRUE_NORMALIZER:
        return true_normalizer_gradients(method, samples, proposal_mean, policy_mean)
    # one theta per estimate: each row's loss depends only on its own theta, so a single backward of
    # the summed losses gives every estimate's gradient
    theta = torch.full((estimates, 1), float(policy_mean), dtype=torch.float64, requires_grad=True)
    losses, _ = brain_loss(
        policy_logps=Normal(theta, 1.0).log_prob(samples),
        proposal_logps=Normal(float(proposal_mean), 1.0).log_prob(samples),
        target_logps=Normal(0.0, 1.0).log_prob(samples),
        **METHODS[method],
    )
    losses.sum().backward()
    return theta.grad.squeeze(-1)


def true_normalizer_gradients(
    method: str, samples: torch.Tensor, proposal_mean: float, policy_mean: float
) -> torch.Tensor:
    """(estimates,) gradient estimates from (estimates, n) samples of q, with the true normaliser:

      dpg:   -(1/n) sum_i (p(y_i) / q(y_i)) (y_i - theta)
      gdcpp: -(1/n) sum_i ((p(y_i) - pi_theta(y_i)) / q(y_i)) (y_i - theta)

    Signs: the cross-entropy's gradient is -E_p[grad log pi_theta] = -E_p[y - theta] = theta, and
    E_q[(p/q) (y - theta)] = E_p[y - theta] = -theta, so dpg is unbiased for theta; gdcpp subtracts
    E_q[(pi/q) (y - theta)] = E_pi[y - theta] = 0, so it is too. Worked number: mu = 0 makes q = p and
    p/q = 1, so dpg is theta - mean(y), plain Monte Carlo with variance 1/n (0.125 at n = 8). gdcpp is
    the estimator `no_self_normalization` gets from `brain_loss` with log Z = 0: the same draws give
    the same numbers, which checks the autograd path against this closed form."""
    proposal_logps = Normal(proposal_mean, 1.0).log_prob(samples)
    target_ratio = torch.exp(Normal(0.0, 1.0).log_prob(samples) - proposal_logps)
    policy_ratio = torch.exp(Normal(policy_mean, 1.0).log_prob(samples) - proposal_logps)
    weights = TRUE_NORMALIZER[method](target_ratio, policy_ratio)
    return -(weights * (samples - policy_mean)).mean(-1)


def variance_table(cfg: BrainVarianceConfig) -> list[dict]:
    """One row per (method, proposal mean): the gradient estimator's mean, variance and bias."""
    true_gradient = cfg.policy_mean  # d/dtheta KL(N(0,1) || N(theta,1)) = theta - 0
    n, rows = cfg.samples_per_estimate, []
    for method in ALL_METHODS:
        for mu in cfg.proposal_means:
            # the same standard-normal draws for every cell (common random numbers): differences
            # between cells come from the method and mu, not from the luck of the draw. Each cell
            # reseeds, so the methods added after the first three leave those rows as they were.
            generator = torch.Generator().manual_seed(cfg.seed)
            grads = gradient_estimates(method, mu, cfg.policy_mean, n, cfg.estimates, generator)
            grad_mean = grads.mean().item()
            rows.append(
                {
                    "method": method,
                    "proposal_mean": mu,
                    "kl_proposal_target": mu**2 / 2,
                    "grad_mean": grad_mean,
                    "grad_variance": grads.var().item(),
                    "grad_bias": grad_mean - true_gradient,
                }
            )
    return rows


def variance_figure(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(6, 4))
    for method in ALL_METHODS:
        mine = [r for r in rows if r["method"] == method]
        # dashed: the true-normaliser estimators; gdcpp lies on no_self_normalization (the same estimator)
        style = "x--" if method in TRUE_NORMALIZER else "o-"
        ax.plot(
            [r["kl_proposal_target"] for r in mine], [r["grad_variance"] for r in mine], style, label=method
        )
    ax.set(
        xlabel="KL(proposal || target)",
        ylabel="variance of the gradient estimate",
        yscale="log",
        title="BRAIn toy: target N(0,1), proposal N(mu,1)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.tight_layout()
    return figure


def summary(rows: list[dict]) -> dict[str, float]:
    """Per method: the variance at the proposal nearest the target (smallest |mu|), at the farthest,
    their ratio, and the largest |bias|."""
    metrics = {}
    for method in ALL_METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: abs(r["proposal_mean"]))
        near, far = mine[0]["grad_variance"], mine[-1]["grad_variance"]
        metrics |= {
            f"{method}/variance_nearest": near,
            f"{method}/variance_farthest": far,
            f"{method}/variance_ratio": far / near,
            f"{method}/max_abs_bias": max(abs(r["grad_bias"]) for r in mine),
        }
    return metrics


def run(cfg: BrainVarianceConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    rows = variance_table(cfg)
    for r in rows:
        logger.info(
            "%-22s mu=%.2f  mean %.4f  variance %.4f",
            r["method"],
            r["proposal_mean"],
            r["grad_mean"],
            r["grad_variance"],
        )

    out = paths.out("brain_variance")
    out.mkdir(parents=True, exist_ok=True)
    table = {"config": cfg.model_dump(), "true_gradient": cfg.policy_mean, "rows": rows}
    (out / "variance.json").write_text(json.dumps(table, indent=2) + "\n")

    # wide: one variance column per method, so DVC plots the curves against KL
    wide = [
        {
            "proposal_mean": mu,
            "kl_proposal_target": mu**2 / 2,
            **{r["method"]: r["grad_variance"] for r in rows if r["proposal_mean"] == mu},
        }
        for mu in cfg.proposal_means
    ]
    return finish(
        "brain_variance",
        paths,
        log,
        summary(rows),
        csvs={"variance.csv": (wide, ["proposal_mean", "kl_proposal_target", *ALL_METHODS])},
        figures={"plots/brain_variance.png": variance_figure(rows)},
        tables={"variance.json": rows},
    )
