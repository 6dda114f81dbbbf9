"""BRAIn's loss (Pandey et al., ICML 2024, arXiv 2402.02479) as a pure function of log-densities.

No models, no config, no I/O: the same function trains the language model (log-densities are summed
response log-probs) and computes the Gaussian toy of the variance experiment.
"""

from __future__ import annotations

import math

import torch

BASELINES = ("self_normalized", "none")
# The unnormalised ablation exponentiates log-ratios; float32 overflows past ~88 nats, and sequence
# log-ratios of a policy that has moved get there. Capped so that the run goes on (and shows the
# ablation's high variance) instead of turning every weight into inf and then nan.
MAX_LOG_RATIO = 80.0


def brain_loss(
    policy_logps: torch.Tensor,
    proposal_logps: torch.Tensor,
    target_logps: torch.Tensor,
    baseline: str = "self_normalized",
    self_normalize: bool = True,
    log_partition: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-prompt BRAIn loss over n samples y_1..y_n ~ q(.|x), and detached diagnostics.

    The target is the posterior p(y|x) = p_sft(y|x) L(x, y) / Z(x); `target_logps` is its unnormalised
    log-density log p_sft + log L. The policy is trained to minimise KL(p || pi_theta).

    BRAIn (self_normalize=True, baseline="self_normalized"), paper eq. 9-11:
      alpha_i = softmax_i(target_i - proposal_i)            self-normalised importance weights, detached
      beta_i  = softmax_i(policy_i - proposal_i)            self-normalised baseline
      loss    = -sum_i alpha_i log_softmax_i(policy - proposal)
    whose gradient is -sum_i (alpha_i - beta_i) grad log pi_theta(y_i|x): the cross-entropy between
    the two self-normalised distributions over the n samples. Its minimum over pi is the entropy of
    alpha, reached when beta = alpha.

    Ablations:
      baseline="none" (DPG-like): loss = -sum_i alpha_i log pi_theta(y_i), gradient -sum_i alpha_i grad.
      self_normalize=False (GDC++-like, Korbak et al. 2022): gradient
        -(1/n) sum_i (p(y_i)/q(y_i) - pi_theta(y_i)/q(y_i)) grad log pi_theta(y_i),
        i.e. weights w_i = exp(target_i - proposal_i - log Z) / n and the unnormalised baseline
        b_i = exp(policy_i - proposal_i) / n. The partition function Z(x) is `log_partition` when
        known (the toy's normalised Gaussian target: 0); otherwise it is estimated per prompt from
        the same n samples, log Z = logsumexp_i(target_i - proposal_i) - log n, as conditional GDC++
        (CDPG, Korbak et al. 2022) does, which makes w = alpha and leaves the unnormalised baseline
        as the only difference from BRAIn. With baseline="none" too: -sum_i w_i grad log pi_theta.
        Exponentiated log-ratios are capped at MAX_LOG_RATIO (80 nats) to stay finite in float32.

    Special case: n = 2, proposal = the SFT reference, alpha one-hot on the preferred sample, and
    policy/proposal log-probs scaled by beta: the loss is -log sigmoid(beta [(pi_w - ref_w) -
    (pi_l - ref_l)]), DPO's (eq. 7 of Rafailov et al. 2023).

    Args:
        policy_logps: (B, n) log pi_theta(y_i|x), with gradient.
        proposal_logps: (B, n) log q(y_i|x) of the model that drew y_i, detached.
        target_logps: (B, n) log p_sft(y_i|x) + log L(x, y_i); -inf excludes a sample (not all of a row's).
        baseline: "self_normalized" or "none".
        self_normalize: False for the GDC++-like ablation.
        log_partition: log Z(x), () or (B,); only with self_normalize=False.
    Returns:
        losses: (B,) per-prompt loss.
        diagnostics: detached (B, n) `alpha` (the weights used) and `beta` (the baseline used), and
            (B,) `ess` = 1 / sum alpha^2 of the self-normalised weights (1 to n), `alpha_entropy`.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if not policy_logps.shape == proposal_logps.shape == target_logps.shape or policy_logps.dim() != 2:
        raise ValueError(
            f"policy, proposal and target log-probs must share one (batch, n) shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(proposal_logps.shape)}, {tuple(target_logps.shape)}"
        )
    batch, n = policy_logps.shape
    if n < 2:
        raise ValueError(f"BRAIn needs n >= 2 samples per prompt (with one, every weight is 1), got {n}")
    if log_partition is not None and self_normalize:
        raise ValueError("log_partition only applies with self_normalize=False")
    proposal_logps, target_logps = proposal_logps.detach(), target_logps.detach()
    if torch.isneginf(target_logps).all(-1).any():
        raise ValueError("a prompt has target log-density -inf on all its samples: its weights are undefined")
    log_ratio_target = target_logps - proposal_logps  # log p~/q
    log_ratio_policy = policy_logps - proposal_logps  # log pi/q, carries the gradient

    alpha = torch.softmax(log_ratio_target, dim=-1)
    if self_normalize:
        weights = alpha
        if baseline == "self_normalized":
            losses = -(weights * torch.log_softmax(log_ratio_policy, dim=-1)).sum(-1)
            baseline_weights = torch.softmax(log_ratio_policy.detach(), dim=-1)
        else:
            losses = -(weights * policy_logps).sum(-1)
            baseline_weights = torch.zeros_like(weights)
    else:
        if log_partition is None:
            log_z = torch.logsumexp(log_ratio_target, dim=-1, keepdim=True) - math.log(n)
        else:
            log_z = torch.as_tensor(
                log_partition, dtype=log_ratio_target.dtype, device=log_ratio_target.device
            )
            if log_z.shape not in ((), (batch,)):
                raise ValueError(
                    f"log_partition must be a scalar or have shape ({batch},), got {tuple(log_z.shape)}"
                )
            log_z = log_z.reshape(-1, 1) if log_z.dim() else log_z
        weights = torch.exp((log_ratio_target - log_z).clamp(max=MAX_LOG_RATIO)) / n
        losses = -(weights * policy_logps).sum(-1)
        if baseline == "self_normalized":
            # + sum_i pi(y_i)/q(y_i) / n: its gradient is the baseline b_i grad log pi(y_i), and the
            # loss value is a meaningful number (not one that depends on the scale of log pi)
            ratios = torch.exp(log_ratio_policy.clamp(max=MAX_LOG_RATIO)) / n
            losses = losses + ratios.sum(-1)
            baseline_weights = ratios.detach()
        else:
            baseline_weights = torch.zeros_like(weights)

    alpha_entropy = -(alpha * torch.log(alpha.clamp_min(1e-30))).sum(-1)
    diagnostics = {
        "alpha": weights.detach(),
        "beta": baseline_weights.detach(),
        "ess": 1.0 / (alpha**2).sum(-1),
        "alpha_entropy": alpha_entropy,
    }
    return losses, diagnostics


def log_likelihood(
    rewards: torch.Tensor, reward_beta: float, form: str = "exp", baseline_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """log L(x, y) of BRAIn's posterior target from reward-model scores.

    form "exp": L = exp(r / beta_r), which makes the target the optimum of the KL-regularised
        objective E[r] - beta_r KL(pi || pi_sft) (the policy PPO aims at).
    form "bradley_terry": L = sigmoid((r - r(x, y_bar)) / beta_r), the probability that y beats a
        baseline response y_bar under the Bradley-Terry model (BRAIn, section 3.1).

    Args:
        rewards: (B, n) r(x, y_i). baseline_rewards: (B,) r(x, y_bar), for "bradley_terry".
    Returns:
        (B, n) log L.
    """
    if reward_beta <= 0:
        raise ValueError(f"reward_beta must be > 0, got {reward_beta}")
    if form == "exp":
        return rewards / reward_beta
    if form == "bradley_terry":
        if baseline_rewards is None:
            raise ValueError("the bradley_terry likelihood needs baseline_rewards r(x, y_bar)")
        return torch.nn.functional.logsigmoid((rewards - baseline_rewards.unsqueeze(-1)) / reward_beta)
    raise ValueError(f"unknown likelihood form {form!r}; expected 'exp' or 'bradley_terry'")
