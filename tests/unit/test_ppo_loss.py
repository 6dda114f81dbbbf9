"""PPO-RLHF functions against hand-worked values, masking invariants and special cases."""

import math

import pytest
import torch
from torch.testing import assert_close

from alignment.losses.ppo_loss import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    kl_penalty,
    last_response_index,
    masked_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

LN2 = math.log(2.0)


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- GAE -----------------------------------------------------------------------------------------


def test_gae_hand_worked():
    """r = (0, 1, 0, 2), V = (1, 2, 1, 1), gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.

    deltas, V_4 = 0 (the episode ends):
      delta_3 = 2 + 0.9 * 0 - 1 = 1
      delta_2 = 0 + 0.9 * 1 - 1 = -0.1
      delta_1 = 1 + 0.9 * 1 - 2 = -0.1
      delta_0 = 0 + 0.9 * 2 - 1 = 0.8
    advantages:
      A_3 = 1
      A_2 = -0.1 + 0.72 * 1      = 0.62
      A_1 = -0.1 + 0.72 * 0.62   = 0.3464
      A_0 = 0.8 + 0.72 * 0.3464  = 1.049408
    returns = A + V = (2.049408, 2.3464, 1.62, 2)
    """
    rewards, values = f64([[0, 1, 0, 2]]), f64([[1, 2, 1, 1]])
    advantages, returns = gae(rewards, values, torch.ones_like(rewards), gamma=0.9, lam=0.8)
    assert_close(advantages, f64([[1.049408, 0.3464, 0.62, 1.0]]))
    assert_close(returns, f64([[2.049408, 2.3464, 1.62, 2.0]]))


def test_gae_right_padding_gets_zero_and_does_not_leak():
    """Row 1 has two real tokens, r = (1, 3), V = (2, 1), and garbage in its padding.

    delta_1 = 3 + 0.9 * 0 - 1 = 2 (padding's V = 50 is not V_2), delta_0 = 1 + 0.9 * 1 - 2 = -0.1;
    A = (-0.1 + 0.72 * 2, 2) = (1.34, 2); returns = (3.34, 3).
    """
    rewards = f64([[0, 1, 0, 2], [1, 3, 99, 99]])
    values = f64([[1, 2, 1, 1], [2, 1, 50, 50]])
    mask = f64([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values.requires_grad_(True), mask, gamma=0.9, lam=0.8)
    assert_close(advantages[1], f64([1.34, 2.0, 0.0, 0.0]))
    assert_close(returns[1], f64([3.34, 3.0, 0.0, 0.0]))
    assert_close(advantages[0], f64([1.049408, 0.3464, 0.62, 1.0]))  # the full row is unaffected
    # the same row on its own, unpadded
    alone, _ = gae(rewards[1:, :2], values[1:, :2], mask[1:, :2], gamma=0.9, lam=0.8)
    assert_close(advantages[1:, :2], alone)
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_gamma_lam_one_zero_values_is_reward_to_go():
    rewards = f64([[1, 2, 3, 4], [5, 6, 7, 7]])
    mask = f64([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    assert_close(advantages, f64([[10, 9, 7, 4], [11, 6, 0, 0]]))
    assert_close(returns, advantages)


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_and_var_hand_worked():
    # masked values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    values, mask = f64([[1, 2, 3, 7], [4, 9, 9, 9]]), f64([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    assert_close(masked_mean(values, mask, dim=1), f64([2.0, 4.0]))
    assert masked_var(values, mask).item() == pytest.approx(5 / 3)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(5 / 4)
    with pytest.raises(ValueError):
        masked_var(values, f64([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten_ignores_padding():
    mask = f64([[1, 1, 1, 0], [1, 0, 0, 0]])
    values = f64([[1, 2, 3, 0], [4, 0, 0, 0]])
    huge = values.masked_fill(mask == 0, 1e30)
    whitened = masked_whiten(values, mask)
    assert_close(masked_whiten(huge, mask), whitened)
    assert_close(masked_whiten(values.masked_fill(mask == 0, math.inf), mask), whitened)
    # (x - 2.5) / sqrt(5/3 + 1e-8)
    expected = (f64([1, 2, 3, 4]) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    assert_close(whitened[mask.bool()], expected)
    assert (whitened[~mask.bool()] == 0).all()
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-7)  # eps: 1 - 6e-9


def test_masked_whiten_shift_mean_false_keeps_mean():
    mask = f64([[1, 1, 1, 0], [1, 0, 0, 0]])
    values = f64([[1, 2, 3, 5e20], [4, 0, 0, 0]])
    whitened = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(whitened, mask).item() == pytest.approx(2.5)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-7)
    assert whitened[0, 3] == 0


# --- KL penalty and rewards ----------------------------------------------------------------------


def test_kl_estimators_hand_worked():
    # log pi - log ref = ln 2: r = ref / pi = 1/2; and -ln 2: r = 2
    logps, ref_logps = f64([math.log(0.5), math.log(0.25)]), f64([math.log(0.25), math.log(0.5)])
    assert_close(kl_penalty(logps, ref_logps, "k1"), f64([LN2, -LN2]))
    assert_close(kl_penalty(logps, ref_logps, "k2"), f64([0.5 * LN2**2, 0.5 * LN2**2]))
    # (r - 1) - ln r: -1/2 + ln 2 ~ 0.193147 and 1 - ln 2 ~ 0.306853
    assert_close(kl_penalty(logps, ref_logps, "k3"), f64([LN2 - 0.5, 1 - LN2]))
    assert_close(kl_penalty(logps, ref_logps, "abs"), f64([LN2, LN2]))
    with pytest.raises(ValueError, match="unknown kind"):
        kl_penalty(logps, ref_logps, "k4")


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logps, ref_logps = -5 * torch.rand(4, 9, generator=g), -5 * torch.rand(4, 9, generator=g)
    assert (kl_penalty(logps, ref_logps, "k3") >= 0).all()
    assert (kl_penalty(logps, logps, "k3") == 0).all()


def test_kl_penalized_rewards_score_on_last_real_token():
    # log-ratio 0.5 everywhere (k1 = 0.5), kl_coef 0.1: non-score reward -0.05 on real tokens.
    # Row 0 right-padded (last token 1), row 1 fills the width (truncated, no EOS: last 3),
    # row 2 left-padded (last 3), row 3 left- and right-padded (last 2).
    mask = f64([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]])
    ref_logps = torch.full((4, 4), -2.0, dtype=torch.float64)
    logps = ref_logps + 0.5
    scores = f64([10, 20, 30, 40])
    assert last_response_index(mask).tolist() == [1, 3, 3, 2]
    rewards, non_score_rewards, kl = kl_penalized_rewards(scores, logps, ref_logps, mask, kl_coef=0.1)
    assert_close(kl, 0.5 * mask)
    assert_close(non_score_rewards, -0.1 * kl)
    assert_close(
        rewards,
        f64(
            [
                [-0.05, 9.95, 0, 0],
                [-0.05, -0.05, -0.05, 19.95],
                [0, 0, -0.05, 29.95],
                [0, -0.05, 39.95, 0],
            ]
        ),
    )


def test_last_response_index_rejects_empty_row():
    with pytest.raises(ValueError):
        last_response_index(f64([[1, 0], [0, 0]]))


# --- PPO policy loss -----------------------------------------------------------------------------


def test_ppo_policy_loss_clipping_and_gradients():
    """eps = 0.2, four real tokens (N = 4) and one padded with garbage log-probs.

      t0: A = 1,  ratio e^0.5  ~ 1.6487 > 1.2: clipped, term -1.2, gradient 0
      t1: A = -1, ratio e^-0.5 ~ 0.6065 < 0.8: clipped, term 0.8, gradient 0
      t2: A = 2,  ratio e^0.1 inside: term -2 e^0.1, gradient -2 e^0.1 / 4
      t3: A = 1,  ratio e^-0.5 < 0.8 but moved against A: max(-0.6065, -0.8) keeps -e^-0.5, gradient
          -e^-0.5 / 4
    loss = (-1.2 + 0.8 - 2 e^0.1 - e^-0.5) / 4; clipfrac = 2/4;
    approxkl = 0.5 * (0.25 + 0.25 + 0.01 + 0.25) / 4 = 0.095.
    """
    old_logps = torch.full((1, 5), -1.0, dtype=torch.float64)
    log_ratio = f64([[0.5, -0.5, 0.1, -0.5, 500.0]])
    logps = (old_logps + log_ratio).requires_grad_(True)
    advantages = f64([[1, -1, 2, 1, 7]])
    mask = f64([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=0.2)
    loss.backward()
    e01, em05 = math.exp(0.1), math.exp(-0.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2 * e01 - em05) / 4)
    assert_close(logps.grad, f64([[0, 0, -2 * e01 / 4, -em05 / 4, 0]]))
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approxkl"] == pytest.approx(0.095)
    assert stats["ratio_mean"] == pytest.approx((math.exp(0.5) + 2 * em05 + e01) / 4)


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logps = f64([[-1, -2, -3], [-1, -2, -3]]).requires_grad_(True)
    advantages, mask = f64([[1, 2, 3], [4, 5, 6]]), f64([[1, 1, 1], [1, 0, 0]])
    loss, stats = ppo_policy_loss(logps, logps.detach(), advantages, mask, clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    assert_close(logps.grad, -advantages * mask / 4)  # -A * ratio / N with ratio 1
    assert stats == {"approxkl": 0.0, "clipfrac": 0.0, "ratio_mean": 1.0}


# --- PPO value loss ------------------------------------------------------------------------------


def test_ppo_value_loss_hand_worked():
    """eps_v = 0.2, v_old = 1, R = 2 on three real tokens (N = 3), one padded.

      t0: v = 1.5, moved 0.5 towards R: v_clip = 1.2, max(0.25, 0.64) = 0.64, clipped, gradient 0
      t1: v = 0.5, moved 0.5 away from R: v_clip = 0.8, max(2.25, 1.44) = 2.25, unclipped,
          gradient 0.5 * 2 (0.5 - 2) / 3 = -0.5
      t2: v = 1.1, inside: 0.81, gradient 0.5 * 2 (1.1 - 2) / 3 = -0.3
    loss = 0.5 (0.64 + 2.25 + 0.81) / 3 = 3.7 / 6; clipfrac = 1/3; mean = (1.5 + 0.5 + 1.1) / 3.
    """
    values = f64([[1.5, 0.5, 1.1, 40.0]]).requires_grad_(True)
    old_values, returns = f64([[1, 1, 1, 1]]), f64([[2, 2, 2, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, f64([[1, 1, 1, 0]]), clip_range_value=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(3.7 / 6)
    assert_close(values.grad, f64([[0, -0.5, -0.3, 0]]))
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    assert stats["mean"] == pytest.approx(3.1 / 3)


# --- entropy -------------------------------------------------------------------------------------


def test_masked_entropy_uniform_and_padding_excluded():
    # uniform over V = 5: ln 5 per real token; row 1's padding has peaked logits that must not count
    logits = torch.zeros(2, 3, 5)
    logits[1, 2] = torch.tensor([9.0, -4.0, 0.0, 3.0, 1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert_close(masked_entropy(logits, mask), torch.tensor([3 * math.log(5), 2 * math.log(5)]))
    # logits (ln 3, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4) ~ 0.562335
    two = torch.tensor([[[math.log(3.0), 0.0]]])
    assert masked_entropy(two, torch.ones(1, 1)).item() == pytest.approx(0.562335, abs=1e-6)


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_worked_and_state_round_trip():
    # KL 12 vs target 6: error 12/6 - 1 = 1, clipped to 0.2; beta = 0.2 (1 + 0.2 * 256 / 10000)
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=256)
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    # KL 3: error -0.5, clipped to -0.2
    before = controller.value
    controller.update(current_kl=3.0, n_steps=256)
    assert controller.value == pytest.approx(before * (1 - 0.2 * 256 / 10000))

    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value
    resumed.update(7.5, 64)  # error 0.25 -> 0.2
    controller.update(7.5, 64)
    assert resumed.value == controller.value


def test_fixed_kl_controller_never_changes():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=256)
    assert controller.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05
