"""Preference losses as pure functions: the reward model's Bradley-Terry loss, DPO and its siblings (IPO,
hinge / SLiC, conservative DPO) and the DPO paper's unlikelihood baseline.

No models, no config objects, no I/O. Shapes: B = batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- Direct preference optimisation and its siblings ------------------------------------------
# Each takes delta = (pi_c - ref_c) - (pi_r - ref_r), the difference of policy/reference log-ratios.


def _sigmoid_dpo(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # logsigmoid, not log(sigmoid(.)): stays finite when beta * delta is large and negative
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def _ipo(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (delta - 1 / (2 * beta)) ** 2


def _hinge(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return F.relu(1 - beta * delta)


_DPO_LOSSES = {"sigmoid": _sigmoid_dpo, "ipo": _ipo, "hinge": _hinge}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss on policy/reference log-ratios, and the implicit rewards.

    With delta = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing:
      "sigmoid": -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta).
                 eps = 0 is DPO (Rafailov et al. 2023, eq. 7); eps > 0 is conservative DPO (cDPO,
                 Mitchell 2023), which assumes each label is flipped with probability eps.
      "ipo":     (delta - 1 / (2 beta))^2 (IPO, Azar et al. 2023, eq. 17; their tau is our beta), on
                 summed log-probs or, as in the IPO paper's experiments and TRL, on per-token averages:
                 the caller chooses by what it passes (`dpo.ipo_length_normalize` in the DPO stage).
      "hinge":   relu(1 - beta delta) (SLiC-HF calibration loss, Zhao et al. 2023, margin 1/beta,
                 on reference-normalised log-ratios).
    label_smoothing only has a meaning for "sigmoid"; any other type rejects eps != 0.

    Worked example (pi_c, ref_c, pi_r, ref_r) = (-1, -2, -4, -2), so delta = 1 - (-2) = 3:
      sigmoid, beta = ln(3)/3: beta delta = ln 3, sigmoid(ln 3) = 3/4, loss = ln(4/3) ~ 0.287682;
               with eps = 1/4: (3/4) ln(4/3) + (1/4) ln 4 ~ 0.562336.
      ipo,     beta = 1/2: (3 - 1)^2 = 4. Read the four numbers as per-token averages of a 4-token
               chosen and a 2-token rejected response: their sums (-4, -8, -8, -4) give delta
               4 - (-4) = 8 and summed IPO (8 - 1)^2 = 49.
      hinge,   beta = 1/10: relu(1 - 0.3) = 0.7.
      rewards: chosen beta * (-1 + 2) = beta, rejected beta * (-4 + 2) = -2 beta.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs under the policy
            (for length-normalised IPO, their per-token averages).
        reference_chosen_logps, reference_rejected_logps: (B,) the same under the frozen reference.
        beta: > 0, strength of the KL regularisation towards the reference.
        label_smoothing: eps in [0, 0.5), assumed label-noise rate (cDPO).
        loss_type: "sigmoid", "ipo" or "hinge".
    Returns:
        losses: (B,) per-pair loss.
        chosen_rewards, rejected_rewards: (B,) beta * (policy - reference) log-probs, detached.
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(_DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies only to loss_type 'sigmoid', not {loss_type!r}")

    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = _DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --- Reward modelling ----------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss, optionally with a margin and reward centering.

    loss = -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2, per pair:
      the Bradley-Terry (1952) likelihood as in Ouyang et al. 2022, eq. 1; the margin m as in
      Llama 2 (Touvron et al. 2023, eq. 2); the centering term c (r_c + r_r)^2 from Eisenstein et
      al. 2023, which pins the otherwise free offset of the rewards near zero. So
      losses.mean() = mean BT loss + c * mean((r_c + r_r)^2).

    Worked example: r_c - r_r = 0 gives ln 2; r_c - r_r = ln 3 gives -ln(3/4) = ln(4/3).

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of each pair's two responses.
        margin: (B,) per-pair margin, a float for all pairs, or None for no margin.
        center_coefficient: c >= 0.
    Returns:
        losses: (B,) per-pair loss.
        metrics: python floats, detached. accuracy = fraction of pairs with r_c > r_r, a tie
            counting 0.5 (a coin flip: an untrained model with constant rewards scores 0.5, not 0);
            margin = mean(r_c - r_r); chosen_mean; rejected_mean.
    """
    if center_coefficient < 0:
        raise ValueError(f"center_coefficient must be >= 0, got {center_coefficient}")
    reward_gap = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(reward_gap - (0.0 if margin is None else margin))
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2

    reward_gap = reward_gap.detach()
    accuracy = (reward_gap > 0).float() + 0.5 * (reward_gap == 0).float()
    metrics = {
        "accuracy": accuracy.mean().item(),
        "margin": reward_gap.mean().item(),
        "chosen_mean": chosen_rewards.detach().mean().item(),
        "rejected_mean": rejected_rewards.detach().mean().item(),
    }
    return losses, metrics


# --- Unlikelihood baseline -----------------------------------------------------------------------


def unlikelihood_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """The DPO paper's Unlikelihood baseline: raise log p(chosen), push down each rejected token.

    loss = -log pi(y_c | x) + alpha * sum_t mask_t * -log(1 - p_t), p_t the policy's probability of
    the t-th rejected-response token (the unlikelihood loss of Welleck et al. 2019, applied to the
    rejected response as in Rafailov et al. 2023, section 6).

    log(1 - p) is computed as log(-expm1(log p)), exact for p near 1 where 1 - exp(log p) would round
    to 0. 1 - p is clamped at 1e-5, as in Welleck et al.'s code: a token the policy is already sure
    of costs at most ln(1e5) ~ 11.5 and gives no gradient instead of an infinite one. The clamp also
    keeps masked positions (log p = 0 from `token_logps`) finite before the mask zeroes them.

    Worked example: log pi(y_c) = -2, rejected p = (1/2, 1/4, masked), alpha = 2:
      2 + 2 * (ln 2 + ln(4/3)) = 2 + 2 ln(8/3) ~ 3.961658.

    Args:
        policy_chosen_logps: (B,) summed chosen-response log-probs under the policy.
        policy_rejected_token_logps: (B, T) per-token rejected-response log-probs under the policy.
        rejected_mask: (B, T) 1 (or True) on rejected response tokens, 0 elsewhere.
        alpha: weight of the unlikelihood term.
    Returns:
        losses: (B,) per-pair loss.
    """
    one_minus_p = (-torch.expm1(policy_rejected_token_logps)).clamp(min=1e-5)
    unlikelihood = -(torch.log(one_minus_p) * rejected_mask.to(one_minus_p.dtype)).sum(-1)
    return -policy_chosen_logps + alpha * unlikelihood


# --- Reference-free -----------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): a reference-free preference loss on length-normalised log-probs.

    The implicit reward of a response is beta times its average log-prob per token,
    r(x, y) = beta / |y| log pi(y | x), and the chosen response must beat the rejected one by a target
    margin gamma:
        loss = -log sigmoid(r_c - r_r - gamma)
    (with eps = label_smoothing, as conservative DPO: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)).
    No reference model enters, so nothing anchors the policy but the data: SimPO trades DPO's KL
    regularisation for a margin and length normalisation.

    Worked example: average log-probs chosen -1, rejected -2 (per token), beta = 2, gamma = 1:
      r_c = -2, r_r = -4, z = -2 + 4 - 1 = 1, loss = -log sigmoid(1) = log(1 + e^-1) ~ 0.313262;
      with eps = 1/4: (3/4) log(1 + e^-1) + (1/4) log(1 + e) ~ 0.563262.
    gamma = 0 and equal lengths: the sigmoid-DPO loss of a reference that scores both responses alike,
    at beta / |y|.

    Args:
        policy_chosen_avg_logps, policy_rejected_avg_logps: (B,) response log-probs averaged over the
            response's tokens.
        beta: > 0, the reward scale. gamma: >= 0, the target margin. label_smoothing: eps in [0, 0.5).
    Returns:
        losses: (B,) per-pair loss.
        chosen_rewards, rejected_rewards: (B,) beta * average log-probs, detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
