"""Pure loss functions: tensors in, per-example (or summed) losses and detached diagnostics out.

No models, no config objects, no I/O. Shapes: B = batch, T = sequence length, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and which positions count.

    Args:
        logits: (B, T, V) causal-LM outputs; position t predicts token t + 1.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken (prompt, padding).
    Returns:
        logps: (B, T - 1) log p(labels[:, t + 1] | tokens up to t), 0 where masked.
        mask: (B, T - 1) float, 1 where labels[:, t + 1] counts.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    logps = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, safe_labels.unsqueeze(-1)).squeeze(
        -1
    )
    return logps * mask, mask.float()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens, and how many tokens it sums over.

    Returning the sum (not the mean) lets the training loop divide by the token count of the whole
    accumulation window, so batch 8 x accumulation 1 and batch 1 x accumulation 8 give one update.

    Args:
        logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on prompt and padding tokens.
    Returns:
        nll_sum: () scalar, -sum of response-token log-probs.
        num_tokens: () scalar, the number of response tokens.
    """
    labels = labels[:, 1:]
    # cross_entropy fuses log-softmax and gather: the same value as -token_logps(...).sum(), with
    # less memory traffic on the (B, T, V) logits, the biggest tensor of a small model's step
    nll_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll_sum, (labels != IGNORE_INDEX).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's response tokens: log pi(y | x) in the DPO paper.

    Args:
        logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on prompt and padding tokens.
    Returns:
        logps: (B,) sum over response tokens of log p(token | prefix).
    """
    logps, _ = token_logps(logits, labels)  # already 0 where masked
    return logps.sum(-1)


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


# --- Reading a value at the last real token ------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whatever the padding side.

    Positions come from the mask only, never from token ids: when the pad id equals the EOS id a
    sequence's own trailing EOS tokens and its padding look the same.

    Args:
        attention_mask: (B, T) 1 (or True) on real tokens, 0 on padding (left, right or none).
    Returns:
        index: (B,) long, the largest t with attention_mask[b, t] = 1.
    Raises:
        ValueError: if a row has no real token (there is nothing to read).
    """
    real = attention_mask.bool()
    if not real.any(-1).all():
        raise ValueError("attention_mask has a row with no real tokens")
    positions = torch.arange(real.shape[-1], device=real.device)
    # largest real position; -1 on padding so it never wins
    return torch.where(real, positions, -1).amax(-1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's value at its last real token, e.g. a reward model's score of the full sequence.

    Args:
        values: (B, T) per-position values; attention_mask: (B, T) as in `last_token_index`.
    Returns:
        (B,) values[b, last_token_index(attention_mask)[b]].
    """
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)
