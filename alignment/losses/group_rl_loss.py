"""Group-baseline online RL as pure functions: RLOO and GRPO advantages, the clipped surrogate, the losses.

Both methods draw k completions per prompt and use the other completions of the same prompt as the
baseline, so no value head is trained: RLOO (Ahmadian et al. 2024, after Kool et al. 2019) subtracts the
mean reward of the other k - 1; GRPO (Shao et al. 2024, DeepSeekMath) subtracts the group mean and divides
by the group's std. Semantics follow TRL's RLOOTrainer and GRPOTrainer (`_generate_and_score_completions`
for the advantages, `_compute_loss` for the loss).

No models, no config objects, no I/O. Rewards are (G, k): G prompts, k completions each. Flattened to
(B,) = (G * k,) they are group-major, row g * k + i is prompt g's i-th completion (TRL's layout). Every
(B, T) tensor is over completion positions with a float `mask`, 1 on real tokens; whatever sits at a
padded position (garbage log-probs, even inf) never reaches a result or a gradient.
"""

from __future__ import annotations

import torch

from alignment.losses.ppo_loss import kl_penalty, masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
STD_EPS = 1e-4  # TRL's, added to the group std before dividing

# --- Rewards and advantages ----------------------------------------------------------------------


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (G, k) with k >= 2, got shape {tuple(rewards.shape)}")


def sequence_kl(logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) of each completion: sum over its real tokens of log pi - log ref (k1).

    TRL's RLOO estimate, from the log-probs of the policy that drew the samples; per token it can be
    negative, its sum over a sampled sequence is an unbiased estimate of the sequence KL.

    Example: per-token log-ratios (0.5, 0.25, pad) -> 0.75.

    Args:
        logps, reference_logps: (B, T) sampled-token log-probs under the sampling policy and the reference.
        mask: (B, T) float, 1 on completion tokens.
    Returns:
        (B,) detached.
    """
    return torch.where(mask.bool(), logps.detach() - reference_logps.detach(), 0).sum(-1)


def kl_folded_rewards(scores: torch.Tensor, kl_per_sequence: torch.Tensor, beta: float) -> torch.Tensor:
    """R_i = r(x, y_i) - beta KL_i: RLOO's default, the KL penalty folded into the sequence reward.

    Ahmadian et al. 2024 (the RLHF reward r - beta log(pi / pi_ref)); TRL's RLOOTrainer
    subtracts beta * `sequence_kl` from the summed reward before the leave-one-out baseline.

    Example: score 2, KL 0.75, beta 0.1 -> 1.925.

    Args:
        scores: any shape, e.g. (B,) or (G, k), the reward of each completion.
        kl_per_sequence: the same shape, e.g. from `sequence_kl`.
        beta: KL coefficient >= 0.
    Returns:
        detached, the shape of `scores`.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return scores.detach() - beta * kl_per_sequence.detach()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j, per group.

    The RLOO estimator (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019):
    (1/k) sum_i A_i grad log pi(y_i|x). The baseline of y_i uses only the other, independent samples,
    so it is unbiased. Equivalently A_i = k / (k - 1) (r_i - mean(r)).

    Worked example, r = (1, 2, 6): baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5,
      A = (-3, -1.5, 4.5); also 3/2 (1 - 3, 2 - 3, 6 - 3). Equal rewards give A = 0.

    Args:
        rewards: (G, k), k >= 2, e.g. from `kl_folded_rewards`.
    Returns:
        (G, k) detached. TRL's optional `normalize_advantages` (batch whitening) is not applied.
    """
    _check_groups(rewards)
    rewards = rewards.detach()
    k = rewards.shape[1]
    baselines = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - baselines


def group_zero_std(rewards: torch.Tensor) -> torch.Tensor:
    """(G,) bool: the group's rewards are all equal (std ~ 0): advantages ~0, the group teaches nothing.

    Its mean is TRL's `frac_reward_zero_std`. TRL tests torch.isclose(std, 0) (within 1e-8); rounding
    can leave more than that on equal rewards (float32 (0.9, 0.9, 0.9): std 7.3e-8), so exactly
    equal rewards count too.
    """
    _check_groups(rewards)
    rewards = rewards.detach()
    std = rewards.std(dim=1)
    return torch.isclose(std, torch.zeros_like(std)) | (rewards == rewards[:, :1]).all(dim=1)


def grpo_advantages(
    rewards: torch.Tensor, scale_rewards: bool = True, eps: float = STD_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's outcome-supervision advantages A_i = (r_i - mean(r)) / (std(r) + eps) per group.

    Shao et al. 2024 (DeepSeekMath), section 4.1.2: every token of y_i gets A_i. As TRL: std is the
    unbiased (Bessel-corrected, k - 1) std of the group, eps = 1e-4. scale_rewards=False drops the
    division (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training": the std
    weights prompts by difficulty); then A = (k - 1) / k times the RLOO advantage.

    Worked example, r = (1, 2, 6): mean 3, deviations (-2, -1, 3), unbiased var (4 + 1 + 9) / 2 = 7;
      scaled: (-2, -1, 3) / (sqrt 7 + 1e-4) ~ (-0.755900, -0.377950, 1.133851); unscaled: (-2, -1, 3).

    Args:
        rewards: (G, k), k >= 2.
        scale_rewards: divide by the group std (TRL's scale_rewards="group") or not ("none").
        eps: added to the std.
    Returns:
        advantages: (G, k) detached.
        zero_std: (G,) bool, `group_zero_std`; those groups' advantages are 0 (up to rounding).
    """
    _check_groups(rewards)
    rewards = rewards.detach()
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)
    return advantages, group_zero_std(rewards)


# --- Per-token terms -----------------------------------------------------------------------------


def k3_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - pi) - (ref - pi) - 1 >= 0, 0 where they agree.

    Schulman, "Approximating KL divergence" (2020); GRPO's eq. 4 (Shao et al. 2024). Unbiased for
    tokens drawn from pi; its gradient w.r.t. log pi is 1 - pi_ref / pi.

    Worked example: pi = 1/2, ref = 1/4: ref - pi = -ln 2, k3 = 1/2 + ln 2 - 1 ~ 0.193147.

    Args:
        policy_logps, reference_logps: (B, T) sampled-token log-probs.
    Returns:
        (B, T), with the gradient of `policy_logps`.
    """
    return kl_penalty(policy_logps, reference_logps, "k3")


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A), ratio = pi / pi_old.

    GRPO's eq. 3 (Shao et al. 2024), PPO's surrogate with the sequence's advantage on each of its tokens;
    eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025, section 3.1), letting unlikely tokens grow.
    A token that moved past the bound its advantage favours gives no gradient; one that moved against
    it keeps its gradient. At ratio 1 (one iteration per batch) the gradient is -A grad log pi.

    Worked example, eps_low 0.2, eps_high 0.28: A = 1, ratio e^0.3 ~ 1.35 -> -1.28, no gradient (high
      clipped); A = 1, ratio e^0.2 ~ 1.22 (clipped were eps_high 0.2) -> -e^0.2; A = -1, ratio e^-0.3
      ~ 0.74 -> 0.8, no gradient (low clipped); A = -1, ratio e^0.3 -> e^0.3, gradient kept.

    Args:
        logps: (B, T) sampled-token log-probs under the current policy, with gradient.
        old_logps: (B, T) the same under the policy that drew the samples.
        advantages: (B,) one per completion.
        mask: (B, T) float, 1 on completion tokens.
        epsilon_low, epsilon_high: > 0; epsilon_high None means epsilon_low (TRL's epsilon, epsilon_high).
    Returns:
        per_token_loss: (B, T), 0 on padding.
        stats: python floats, token fractions over real tokens as TRL reports them:
            `clip_ratio/low_mean` (ratio < 1 - eps_low and A < 0), `clip_ratio/high_mean` (ratio >
            1 + eps_high and A > 0), `clip_ratio/region_mean` (either).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_low <= 0 or epsilon_high <= 0:
        raise ValueError(f"epsilon_low and epsilon_high must be > 0, got {epsilon_low}, {epsilon_high}")
    real = mask.bool()
    # padding log-probs may be anything; exp of a huge one is inf, and its gradient nan
    ratio = torch.exp(torch.where(real, logps - old_logps.detach(), 0))
    advantages = advantages.detach().unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)

    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        stats = {
            "clip_ratio/low_mean": masked_mean(low.float(), mask).item(),
            "clip_ratio/high_mean": masked_mean(high.float(), mask).item(),
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask).item(),
        }
    return torch.where(real, per_token_loss, 0), stats


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (B, T) per-token losses to the scalar loss, as TRL's GRPOTrainer `loss_type`.

      "grpo":    mean over completions of each one's token mean (GRPO's eq. 3: 1/G sum_i 1/|o_i| sum_t);
                 a long completion's tokens weigh less, the length bias Dr. GRPO points out.
      "bnpo":    sum over the batch's real tokens / their count (token mean of the local batch).
      "dapo":    sum / num_items_in_batch, the real-token count of the whole accumulated batch (DAPO's
                 token-level loss, Yu et al. 2025, section 3.3); by default this batch's count, = "bnpo".
                 Pass the global count when a batch is split into micro-batches: their losses then sum
                 to the whole batch's token mean, where bnpo's would average per-micro-batch means.
                 (Across P data-parallel ranks TRL passes count / P: DDP averages the ranks' gradients.)
      "dr_grpo": sum / (B * max_completion_length), a constant (Dr. GRPO, Liu et al. 2025).
    TRL clamps each count to >= 1, so an all-padding row or batch gives 0, not nan.

    Worked example, losses [[1, 2, 3, 4], [5, pad, pad, pad]], max_completion_length 5:
      grpo (2.5 + 5) / 2 = 3.75; bnpo = dapo 15 / 5 = 3; dr_grpo 15 / (2 * 5) = 1.5.

    Args:
        per_token_loss: (B, T); padding may hold anything.
        mask: (B, T) float, 1 on completion tokens.
        loss_type: one of LOSS_TYPES.
        max_completion_length: the generation limit; required for "dr_grpo".
        num_items_in_batch: "dapo" only, see above.
    Returns:
        () scalar.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    total = torch.where(mask.bool(), per_token_loss, 0)
    if loss_type == "grpo":
        return (total.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        return total.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dapo":
        return total.sum() / torch.as_tensor(num_items_in_batch, dtype=total.dtype).clamp(min=1.0)
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(f"dr_grpo needs max_completion_length >= 1, got {max_completion_length}")
    return total.sum() / (per_token_loss.shape[0] * max_completion_length)


# --- Losses --------------------------------------------------------------------------------------


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss (Shao et al. 2024, eq. 3, negated): per token, clipped surrogate + beta k3 KL, aggregated.

      loss = aggregate(-min(ratio_t A, clip(ratio_t) A) + beta k3_t, loss_type)
    as TRL's GRPOTrainer `_compute_loss` with importance_sampling_level="token" (its defaults: beta 0,
    epsilon 0.2, loss_type "dapo"). With one iteration per batch (old_logps = logps.detach()) and beta 0,
    loss_type "grpo" is REINFORCE with the group baseline on the token-mean log-prob:
    grad = -(1/B) sum_i A_i grad (1/|y_i|) sum_t log pi(y_i,t).

    Worked example, one iteration, loss_type "grpo", one completion of two tokens with A = 2 and
      log pi - log ref = ln 2 on both, beta 0.1: -2 + 0.1 (ln 2 - 1/2) ~ -1.980685; kl ~ 0.193147.

    Args:
        logps: (B, T) sampled-token log-probs under the current policy, with gradient.
        old_logps: (B, T) under the policy that drew the samples (logps.detach() for one iteration).
        reference_logps: (B, T) under the reference; may be None when beta is 0.
        advantages: (B,) e.g. `grpo_advantages(...)[0].flatten()`.
        mask: (B, T) float, 1 on completion tokens.
        beta: KL coefficient >= 0.
        epsilon_low, epsilon_high, loss_type, max_completion_length, num_items_in_batch:
            as `clipped_surrogate` and `aggregate`.
    Returns:
        loss: () scalar.
        stats: python floats, the `clip_ratio/*` of `clipped_surrogate`, and `kl`, the token mean of k3
            (only when reference_logps is given).
    """
    if beta < 0 or (beta > 0 and reference_logps is None):
        raise ValueError(f"beta must be >= 0, and reference_logps given when it is > 0; got beta {beta}")
    per_token_loss, stats = clipped_surrogate(logps, old_logps, advantages, mask, epsilon_low, epsilon_high)
    if reference_logps is not None:
        real = mask.bool()
        kl = k3_kl(torch.where(real, logps, 0), torch.where(real, reference_logps.detach(), 0))
        per_token_loss = per_token_loss + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    loss = aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)
    return loss, stats


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    reference_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_in_reward: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's loss as TRL's RLOOTrainer: the clipped surrogate on the *sequence* ratio, mean over completions.

      ratio_i = exp(sum_t log pi(y_i,t) - sum_t log pi_old(y_i,t))
      loss    = (1/B) sum_i -min(ratio_i A_i, clip(ratio_i, 1 - eps_low, 1 + eps_high) A_i)
    With one iteration per batch (old_logps = logps.detach()) this is REINFORCE with the leave-one-out
    baseline on the sequence log-prob (Ahmadian et al. 2024): grad = -(1/B) sum_i A_i grad log pi(y_i).

    KL: kl_in_reward=True (TRL's only mode, the paper's) expects beta KL already folded into the rewards
    behind `advantages` (`kl_folded_rewards` with `sequence_kl`); nothing is added here. kl_in_reward=False
    adds beta (1/B) sum_i sum_t k3_t instead, GRPO's per-token penalty summed over the sequence (k1 would
    give a gradient of zero mean, hence k3).

    Worked example, one iteration, one completion of two tokens, A = 2, log pi - log ref = ln 2 on both,
      beta 0.1: kl_in_reward -> -2, kl = ln 2 (k1); not -> -2 + 0.1 * 2 (ln 2 - 1/2), kl = ln 2 - 1/2 (k3).

    Args:
        logps: (B, T) sampled-token log-probs under the current policy, with gradient.
        old_logps: (B, T) under the policy that drew the samples.
        advantages: (B,) e.g. `rloo_advantages(rewards).flatten()`.
        mask: (B, T) float, 1 on completion tokens.
        epsilon_low, epsilon_high: as `clipped_surrogate`, applied to the sequence ratio.
        reference_logps: (B, T) under the reference; required when kl_in_reward is False and beta > 0.
        beta: KL coefficient >= 0 of the loss term (unused when kl_in_reward).
        kl_in_reward: see above.
    Returns:
        loss: () scalar.
        stats: python floats, `clip_ratio/*` as fractions of completions (TRL's RLOO), and `kl`, the token
            mean of the KL estimate in use, k1 or k3 (only when reference_logps is given).
    """
    if beta < 0 or (beta > 0 and not kl_in_reward and reference_logps is None):
        raise ValueError(f"beta must be >= 0, and reference_logps given for a KL loss term; got beta {beta}")
    real = mask.bool()
    sequence_logps = torch.where(real, logps, 0).sum(-1, keepdim=True)
    old_sequence_logps = torch.where(real, old_logps, 0).sum(-1, keepdim=True)
    whole = torch.ones_like(sequence_logps)  # each completion is one "token" of the surrogate
    per_sequence_loss, stats = clipped_surrogate(
        sequence_logps, old_sequence_logps, advantages, whole, epsilon_low, epsilon_high
    )
    loss = per_sequence_loss.mean()
    if reference_logps is not None:
        masked_logps, masked_reference = torch.where(real, logps, 0), torch.where(real, reference_logps, 0)
        if kl_in_reward:
            kl = (masked_logps - masked_reference).detach()
        else:
            kl = k3_kl(masked_logps, masked_reference.detach())
            loss = loss + beta * kl.sum(-1).mean()
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    return loss, stats
