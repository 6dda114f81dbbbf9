"""PPO-RLHF as pure functions: KL-penalised rewards, GAE, the clipped policy and value losses.

The recipe of Ziegler et al. 2019, Stiennon et al. 2020 and Ouyang et al. 2022 (InstructGPT): the
reward of a response is the reward model's score minus a per-token KL penalty towards the SFT policy,
advantages come from GAE (Schulman et al. 2016), and the policy and value head are trained with
PPO's clipped objectives (Schulman et al. 2017). Semantics follow TRL's PPO trainer.

No models, no config objects, no I/O. Every (B, T) tensor is over *response* positions, with a float
`mask` (B, T): 1 on real response tokens, 0 on padding. Whatever sits at a padded position (garbage
log-probs, values, even inf) never reaches a result.
"""

from __future__ import annotations

import torch

from alignment.losses.logprobs import last_token_index, token_entropy

# --- Masked statistics ---------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions with mask 1, over all of them (dim=None) or along `dim`.

    torch.where rather than values * mask: 0 * inf is nan, and padding may hold anything.

    Example: values [[1, 2, 99]], mask [[1, 1, 0]] -> 1.5.
    """
    real = mask.bool()
    total = torch.where(real, values, 0)
    if dim is None:
        return total.sum() / mask.sum()
    return total.sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over positions with mask 1; Bessel-corrected (n / (n - 1)) if unbiased.

    Example: masked values (1, 2, 3, 4): mean 2.5, squared deviations sum to 5, unbiased var 5/3.
    """
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:  # a CPU-GPU sync point, once per call
            raise ValueError(f"unbiased variance needs at least 2 masked values, got {count.item()}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with mean and unbiased var over masked positions only.

    As TRL's masked_whiten; shift_mean=False adds the mean back (rewards keep their level, only
    their scale is normalised). Padded positions of the output are 0.

    Example: masked values (1, 2, 3, 4) -> (x - 2.5) / sqrt(5/3): about (-1.162, -0.387, 0.387, 1.162).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


# --- Rewards -------------------------------------------------------------------------------------
# Each estimator takes log_ratio = log pi(y_t) - log ref(y_t) with y_t ~ pi; see J. Schulman,
# "Approximating KL divergence" (2020). k1 is unbiased but can be negative; k3 is unbiased and >= 0.

_KL_ESTIMATORS = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    # (r - 1) - log r with r = ref / pi = exp(-log_ratio); expm1 stays exact when r is near 1
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
    "abs": torch.abs,
}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled token's log-probs.

      k1 = log pi - log ref;  k2 = (log pi - log ref)^2 / 2;  k3 = (r - 1) - log r, r = pi_ref / pi;
      abs = |log pi - log ref|.

    Worked example: log pi - log ref = ln 2 (pi = 1/2, ref = 1/4): k1 = ln 2 ~ 0.693147,
    k2 = (ln 2)^2 / 2 ~ 0.240227, k3 = -1/2 + ln 2 ~ 0.193147.

    Args:
        logps, ref_logps: (B, T) log-probs of the sampled tokens under the policy and the reference.
        kind: "k1", "k2", "k3" or "abs".
    Returns:
        (B, T) per-token KL estimate.
    """
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logps - ref_logps)


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) long of each row's last real response token, from the mask alone.

    Any padding side; a row whose response fills the whole width (truncated, no EOS) gets T - 1.
    Raises ValueError on a row with no response token. See `losses.last_token_index`.
    """
    return last_token_index(mask)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every response token, plus the score on the last one.

    R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x)) (Ziegler et al. 2019, eq. 2; Stiennon et al.
    2020, eq. 1; Ouyang et al. 2022, eq. 2), the log-ratio spread over the tokens it sums.

    Worked example: mask [1, 1, 0], k1 = 0.5 per token, kl_coef 0.1, score 10:
      non_score_rewards [-0.05, -0.05, 0], rewards [-0.05, 9.95, 0].

    Args:
        scores: (B,) reward-model score of each full response.
        logps, ref_logps: (B, T) sampled-token log-probs under the policy and the reference.
        mask: (B, T) float, 1 on response tokens.
        kl_coef: beta >= 0.
        kind: KL estimator, as in `kl_penalty`.
    Returns:
        rewards: (B, T) non_score_rewards + the score at `last_response_index(mask)`; 0 on padding.
        non_score_rewards: (B, T) -kl_coef * kl.
        kl: (B, T) per-token KL estimate, 0 on padding.
        All detached: rewards are constants to PPO.
    """
    real = mask.bool()
    kl = torch.where(real, kl_penalty(logps.detach(), ref_logps.detach(), kind), 0)
    non_score_rewards = -kl_coef * kl
    last = last_response_index(mask).unsqueeze(1)
    rewards = non_score_rewards.scatter_add(1, last, scores.detach().to(kl.dtype).unsqueeze(1))
    return rewards, non_score_rewards, kl


# --- Advantages ----------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left over T.

      delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns_t = A_t + V_t,
    with V and A taken as 0 past the last real token: the episode ends there. gamma = lam = 1 with
    V = 0 gives the reward-to-go, A_t = sum_{s >= t} r_s.

    Worked example: r = (1, 3), V = (2, 1), gamma 0.9, lam 0.8:
      delta_1 = 3 + 0 - 1 = 2, delta_0 = 1 + 0.9 * 1 - 2 = -0.1;
      A = (-0.1 + 0.72 * 2, 2) = (1.34, 2), returns = (3.34, 3).

    Args:
        rewards, values: (B, T) per-token rewards and value estimates.
        mask: (B, T) float, 1 on response tokens; the real tokens of a row must be contiguous.
        gamma: discount in [0, 1]; lam: GAE lambda in [0, 1].
    Returns:
        advantages, returns: (B, T), detached, 0 on padding.
    """
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    real = mask.bool()
    rewards = torch.where(real, rewards.detach(), 0)
    values = torch.where(real, values.detach(), 0)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # zeroed on padding, so neither V nor A leaks from padding into the token before it
        next_advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, 0)
        next_value = values[:, t]
        reversed_advantages.append(next_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


# --- PPO losses ----------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated, mean over the batch's tokens.

      ratio_t = exp(logps_t - old_logps_t)
      loss    = masked mean of max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))
    The max is the pessimistic bound: a token whose ratio already moved past 1 +- eps in the
    direction its advantage favours gives no gradient; one that moved the other way keeps it.

    Worked example, eps = 0.2: A = 1, ratio = e^0.5 ~ 1.649 -> clipped, -1.2, no gradient;
      A = -1, ratio = e^-0.5 ~ 0.607 -> clipped, 0.8, no gradient; A = 2, ratio = e^0.1 -> -2 e^0.1,
      gradient w.r.t. logps -A ratio / N with N the number of real tokens. At ratio 1: -mean(A).

    Args:
        logps: (B, T) sampled-token log-probs under the current policy, with gradient.
        old_logps: (B, T) the same under the policy that drew the samples.
        advantages: (B, T), e.g. whitened GAE advantages.
        mask: (B, T) float, 1 on response tokens.
        clip_range: eps > 0.
    Returns:
        loss: () scalar.
        stats: python floats. approxkl = masked mean of (logps - old_logps)^2 / 2 (TRL's);
            clipfrac = fraction of tokens where the clipped term is the larger, i.e. chosen;
            ratio_mean.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    # padding log-probs may be anything; exp of a huge one is inf, and its gradient nan
    log_ratio = torch.where(mask.bool(), logps - old_logps.detach(), 0)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).item(),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, as in OpenAI's baselines PPO2 and TRL.

      v_clip = clip(v, v_old - eps_v, v_old + eps_v)
      loss   = 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2)
    A value that moved more than eps_v from v_old towards the return is held at the clipped loss
    (no gradient); one that moved away from it, or overshot it, keeps the unclipped loss.

    Worked example, eps_v = 0.2, v_old = 1, R = 2: v = 1.5 -> v_clip = 1.2, max(0.25, 0.64) = 0.64
      (clipped); v = 0.5 -> v_clip = 0.8, max(2.25, 1.44) = 2.25 (unclipped); v = 1.1 -> 0.81 (inside).

    Args:
        values: (B, T) the value head's predictions now, with gradient.
        old_values: (B, T) its predictions at rollout time.
        returns: (B, T) GAE returns.
        mask: (B, T) float, 1 on response tokens.
        clip_range_value: eps_v > 0.
    Returns:
        loss: () scalar.
        stats: python floats. clipfrac = fraction of tokens where the clipped term is the larger;
            mean = masked mean of the predicted values.
    """
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).item(),
            "mean": masked_mean(values, mask).item(),
        }
    return loss, stats


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence entropy of the policy: sum over real response tokens of H(softmax(logits_t)), a
    diagnostic (no gradient), the softmax taken a chunk of rows at a time (logprobs.token_entropy).

    Worked example: uniform logits over V tokens give log V per token; two real tokens, 2 log V.
    Logits (ln 3, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4) ~ 0.562335.

    Args:
        logits: (B, T, V), position t giving the distribution of response token t.
        mask: (B, T) float, 1 on response tokens.
    Returns:
        (B,) summed token entropy.
    """
    return torch.where(mask.bool(), token_entropy(logits), 0).sum(-1)


# --- KL coefficient controllers ------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient, with the interface of `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        # only the coefficient changes during training; target and horizon come from the config
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adapts beta so the observed KL tracks a target (Ziegler et al. 2019, section 2.2).

      e = clip(KL / target - 1, -0.2, 0.2),  beta <- beta (1 + e n_steps / horizon)

    Worked example: beta 0.2, target 6, horizon 10000, KL 12 (e = 1 clipped to 0.2), 256 steps:
      beta = 0.2 (1 + 0.2 * 256 / 10000) = 0.201024.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
