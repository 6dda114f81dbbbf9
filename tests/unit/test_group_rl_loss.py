"""RLOO and GRPO functions against hand-worked values, their reductions to REINFORCE, and a bandit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from alignment.losses.group_rl_loss import (
    aggregate,
    clipped_surrogate,
    group_zero_std,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    kl_folded_rewards,
    rloo_advantages,
    rloo_loss,
    sequence_kl,
)

LN2 = math.log(2.0)
K3_LN2 = LN2 - 0.5  # k3 at log pi - log ref = ln 2: exp(-ln 2) + ln 2 - 1


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).double()


# --- advantages ----------------------------------------------------------------------------------


def test_rloo_advantages_hand_worked():
    # r = (1, 2, 6): leave-one-out baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5
    rewards = f64([[1, 2, 6]]).requires_grad_(True)
    advantages = rloo_advantages(rewards)
    assert_close(advantages, f64([[-3, -1.5, 4.5]]))
    assert not advantages.requires_grad


def test_grpo_advantages_hand_worked_with_and_without_std():
    # r = (1, 2, 6): mean 3, deviations (-2, -1, 3), unbiased var (4 + 1 + 9) / 2 = 7 (TRL's nanstd)
    rewards = f64([[1, 2, 6]])
    scaled, zero_std = grpo_advantages(rewards, scale_rewards=True)
    assert_close(scaled, f64([[-2, -1, 3]]) / (math.sqrt(7) + 1e-4))
    assert_close(scaled, f64([[-0.755900, -0.377950, 1.133851]]), atol=1e-6, rtol=0)
    unscaled, _ = grpo_advantages(rewards, scale_rewards=False)
    assert_close(unscaled, f64([[-2, -1, 3]]))
    assert_close(unscaled, (3 - 1) / 3 * rloo_advantages(rewards))  # Dr. GRPO = (k - 1) / k RLOO
    assert zero_std.tolist() == [False]


def test_equal_rewards_give_zero_advantage_and_count_as_zero_std():
    rewards = f64([[2, 2, 2], [1, 2, 6]])
    assert_close(rloo_advantages(rewards)[0], torch.zeros(3, dtype=torch.float64))
    for scale_rewards in (True, False):
        advantages, zero_std = grpo_advantages(rewards, scale_rewards=scale_rewards)
        assert_close(advantages[0], torch.zeros(3, dtype=torch.float64))
        assert zero_std.tolist() == [True, False]
    assert group_zero_std(rewards).float().mean().item() == 0.5  # frac_reward_zero_std
    # float32 rounding leaves std 7.3e-8 on (0.9, 0.9, 0.9), past TRL's isclose(std, 0); still zero-std
    equal32 = torch.full((1, 3), 0.9)
    assert equal32.std().item() > 1e-8 and group_zero_std(equal32).tolist() == [True]
    assert group_zero_std(f64([[1.0, 1.0 + 1e-9]])).tolist() == [True]  # as TRL: within 1e-8


def test_group_shapes_are_checked():
    for bad in (torch.zeros(2, 1), torch.zeros(4)):
        for function in (rloo_advantages, grpo_advantages, group_zero_std):
            with pytest.raises(ValueError, match="k >= 2"):
                function(bad)


def test_sequence_kl_and_kl_folded_rewards_hand_worked():
    # log-ratios (0.5, 0.25) on real tokens, garbage on padding: KL 0.75; 2 - 0.1 * 0.75 = 1.925
    reference_logps = f64([[-1.0, -2.0, -math.inf], [-1.0, -1.0, 3.0]])
    logps = reference_logps + f64([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]])
    mask = f64([[1, 1, 0], [1, 1, 0]])
    kl = sequence_kl(logps, reference_logps, mask)
    assert_close(kl, f64([0.75, 0.0]))
    assert_close(kl_folded_rewards(f64([2.0, 1.0]), kl, beta=0.1), f64([1.925, 1.0]))
    with pytest.raises(ValueError):
        kl_folded_rewards(f64([2.0]), f64([0.0]), beta=-1.0)


def test_rloo_baseline_is_unbiased_monte_carlo():
    """A softmax policy over 4 arms with known rewards; grad J = pi * (r - E_pi[r]) exactly.

    The mean over many draws of A_i grad log pi(y_i), grad_theta log pi(a) = e_a - pi, matches it
    within 4 standard errors per component; and it is minus the gradient of rloo_loss at ratio 1.
    """
    logits = f64([0.5, -0.2, 0.1, 0.0])
    arm_rewards = f64([1.0, 3.0, -2.0, 0.5])
    probs = torch.softmax(logits, -1)
    exact = probs * (arm_rewards - (probs * arm_rewards).sum())
    groups, k = 20000, 4
    arms = torch.multinomial(probs, groups * k, replacement=True, generator=torch.Generator().manual_seed(0))
    arms = arms.view(groups, k)
    advantages = rloo_advantages(arm_rewards[arms])
    score_function = F.one_hot(arms, 4).double() - probs  # (G, k, 4)
    per_group = (advantages.unsqueeze(-1) * score_function).mean(1)
    estimate, standard_error = per_group.mean(0), per_group.std(0) / math.sqrt(groups)
    assert ((estimate - exact).abs() < 4 * standard_error).all(), (estimate, exact, standard_error)
    # the test has the power to see a bias: the group mean including y_i itself (Dr. GRPO's unscaled
    # advantage, (k - 1) / k of RLOO's) estimates 3/4 of the gradient, off by tens of standard errors
    assert ((0.75 * estimate - exact).abs() > 10 * standard_error).any()

    theta = logits.clone().requires_grad_(True)
    logps = torch.log_softmax(theta, -1)[arms.flatten()].unsqueeze(1)
    loss, _ = rloo_loss(logps, logps.detach(), advantages.flatten(), torch.ones_like(logps))
    loss.backward()
    assert_close(-theta.grad, estimate)


# --- per-token terms -----------------------------------------------------------------------------


def test_k3_hand_worked_nonnegative_and_zero_at_equality():
    # pi = 1/2, ref = 1/4: exp(-ln 2) + ln 2 - 1 ~ 0.193147; gradient 1 - ref / pi = 1/2
    logps = f64([math.log(0.5)]).requires_grad_(True)
    kl = k3_kl(logps, f64([math.log(0.25)]))
    kl.sum().backward()
    assert kl.item() == pytest.approx(K3_LN2) and kl.item() == pytest.approx(0.193147, abs=1e-6)
    assert logps.grad.item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    a, b = -5 * torch.rand(4, 9, generator=g), -5 * torch.rand(4, 9, generator=g)
    assert (k3_kl(a, b) >= 0).all()
    assert (k3_kl(a, a) == 0).all()


def test_asymmetric_clip_hand_worked():
    """eps_low 0.2, eps_high 0.28; five real tokens, one padded with a garbage log-ratio.

      row 0, A = 1:  ratio e^0.3 ~ 1.350 > 1.28: high clipped, -1.28, gradient 0
                     ratio e^0.2 ~ 1.221, inside [0.8, 1.28]: -e^0.2, gradient -e^0.2
      row 1, A = -1: ratio e^-0.3 ~ 0.741 < 0.8: low clipped, 0.8, gradient 0
                     ratio e^0.1 inside: e^0.1, gradient e^0.1
      row 2, A = -1: ratio e^0.3 > 1.28 but against A: not clipped, e^0.3, gradient e^0.3
    clip_ratio/low 1/5, high 1/5, region 2/5. (Gradients of the summed per-token loss, -A ratio.)
    """
    old_logps = torch.full((3, 2), -1.0, dtype=torch.float64)
    logps = (old_logps + f64([[0.3, 0.2], [-0.3, 0.1], [0.3, 500.0]])).requires_grad_(True)
    advantages, mask = f64([1, -1, -1]), f64([[1, 1], [1, 1], [1, 0]])
    per_token, stats = clipped_surrogate(logps, old_logps, advantages, mask, 0.2, epsilon_high=0.28)
    per_token.sum().backward()
    e1, e2, e3 = math.exp(0.1), math.exp(0.2), math.exp(0.3)
    assert_close(per_token, f64([[-1.28, -e2], [0.8, e1], [e3, 0]]))
    assert_close(logps.grad, f64([[0, -e2], [0, e1], [e3, 0]]))
    assert stats == pytest.approx(
        {"clip_ratio/low_mean": 0.2, "clip_ratio/high_mean": 0.2, "clip_ratio/region_mean": 0.4}
    )
    # symmetric eps 0.2: row 0's ratio e^0.2 > 1.2 is clipped as well
    per_token, stats = clipped_surrogate(logps, old_logps, advantages, mask, epsilon_low=0.2)
    assert per_token[0, 1].item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high_mean"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        clipped_surrogate(logps, old_logps, advantages, mask, epsilon_low=0.0)


# --- aggregation ---------------------------------------------------------------------------------


def test_aggregate_loss_types_hand_worked():
    # grpo (2.5 + 5) / 2 = 3.75; bnpo = dapo 15 / 5 = 3; dr_grpo 15 / (2 * 5) = 1.5
    per_token = f64([[1, 2, 3, 4], [5, math.inf, -math.inf, 7]])
    mask = f64([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.75)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=5).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate(per_token, mask, "gspo")


def test_dapo_micro_batches_sum_to_the_whole_batch():
    per_token = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = right_padded_mask([5, 1, 3, 2], 5)
    whole = aggregate(per_token, mask, "dapo")
    halves = [
        aggregate(per_token[rows], mask[rows], "dapo", num_items_in_batch=mask.sum())
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert_close(halves[0] + halves[1], whole)


# --- losses --------------------------------------------------------------------------------------


def test_grpo_loss_with_kl_hand_worked():
    """One completion, two real tokens and a garbage pad; A = 2, log pi - log ref = ln 2, beta 0.1.

    Ratio 1, loss_type grpo: -2 + 0.1 k3 = -2 + 0.1 (ln 2 - 1/2) ~ -1.980685; per-token gradient
    (-A + beta (1 - ref / pi)) / 2 = (-2 + 0.05) / 2 = -0.975.
    """
    logps = f64([[math.log(0.5), math.log(0.5), 500.0]]).requires_grad_(True)
    reference_logps = f64([[math.log(0.25), math.log(0.25), -math.inf]])
    mask = f64([[1, 1, 0]])
    loss, stats = grpo_loss(
        logps, logps.detach(), reference_logps, f64([2.0]), mask, beta=0.1, loss_type="grpo"
    )
    loss.backward()
    assert loss.item() == pytest.approx(-2 + 0.1 * K3_LN2)
    assert loss.item() == pytest.approx(-1.980685, abs=1e-6)
    assert_close(logps.grad, f64([[-0.975, -0.975, 0.0]]))
    assert stats["kl"] == pytest.approx(K3_LN2)
    assert stats["clip_ratio/region_mean"] == 0.0


def test_grpo_loss_beta_zero_needs_no_reference():
    logps, mask = f64([[-1.0, -2.0]]), f64([[1, 1]])
    loss, stats = grpo_loss(logps, logps, None, f64([1.0]), mask)
    assert loss.item() == pytest.approx(-1.0) and "kl" not in stats
    with pytest.raises(ValueError, match="reference_logps"):
        grpo_loss(logps, logps, None, f64([1.0]), mask, beta=0.1)


def random_rollout(seed: int = 0, groups: int = 2, k: int = 3, width: int = 4, vocab: int = 5):
    """Logits (B, T, V) to differentiate, sampled tokens, a right-padded mask and (G, k) rewards."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups * k, width, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(vocab, (groups * k, width), generator=g)
    mask = right_padded_mask([4, 2, 3, 1, 4, 2], width)
    rewards = torch.randn(groups, k, generator=g, dtype=torch.float64)
    return logits, tokens, mask, rewards


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_one_iteration_is_reinforce_with_group_baseline(loss_type):
    """ratio = 1, beta = 0: the gradient is -sum_i A_i grad(sum_t w_it log pi(y_it)), w by loss_type:

    grpo 1 / (B |y_i|) (the token-mean log-prob, batch mean); bnpo 1 / N; dr_grpo 1 / (B L).
    """
    logits, tokens, mask, rewards = random_rollout()
    advantages = grpo_advantages(rewards)[0].flatten()
    logps = token_logps(logits, tokens)
    loss, stats = grpo_loss(
        logps, logps.detach(), None, advantages, mask, loss_type=loss_type, max_completion_length=6
    )
    (grad,) = torch.autograd.grad(loss, logits)

    batch, lengths = mask.shape[0], mask.sum(-1)
    weights = {"grpo": 1 / (batch * lengths), "bnpo": 1 / lengths.sum(), "dr_grpo": 1 / (batch * 6.0)}
    summed_logps = (token_logps(logits, tokens) * mask).sum(-1)
    reinforce = -(advantages * weights[loss_type] * summed_logps).sum()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected)
    assert stats["clip_ratio/region_mean"] == 0.0


def test_rloo_one_iteration_is_reinforce_with_leave_one_out_baseline():
    logits, tokens, mask, rewards = random_rollout(seed=1)
    advantages = rloo_advantages(rewards).flatten()
    logps = token_logps(logits, tokens)
    loss, stats = rloo_loss(logps, logps.detach(), advantages, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    reinforce = -(advantages * (token_logps(logits, tokens) * mask).sum(-1)).mean()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # -mean(A), and LOO advantages sum to 0 per group


def test_rloo_loss_clips_the_sequence_ratio():
    """eps 0.2, A = 1 on both rows. Row 0's token ratios e^0.1, e^0.2 are each inside, but the sequence
    ratio e^0.3 ~ 1.35 > 1.2 is clipped: -1.2, no gradient. Row 1: e^0.1, -e^0.1, gradient -e^0.1 / 2.
    clip_ratio/high_mean is over completions: 1/2.
    """
    old_logps = torch.full((2, 2), -1.0, dtype=torch.float64)
    logps = (old_logps + f64([[0.1, 0.2], [0.1, 9.0]])).requires_grad_(True)
    loss, stats = rloo_loss(logps, old_logps, f64([1.0, 1.0]), f64([[1, 1], [1, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - math.exp(0.1)) / 2)
    assert_close(logps.grad, f64([[0, 0], [-math.exp(0.1) / 2, 0]]))
    assert stats["clip_ratio/high_mean"] == 0.5 and stats["clip_ratio/low_mean"] == 0.0


def test_rloo_loss_kl_in_reward_or_as_a_loss_term_hand_worked():
    """One completion, two tokens, A = 2, log pi - log ref = ln 2 on both, beta 0.1, ratio 1.

    kl_in_reward: loss -2 (the KL is already in A), kl = ln 2 (k1), gradient -A = -2 per token.
    as a loss term: -2 + 0.1 * 2 k3 = -2 + 0.2 (ln 2 - 1/2), gradient -2 + 0.1 (1 - 1/2) = -1.95.
    """
    reference_logps, mask = f64([[math.log(0.25), math.log(0.25), -math.inf]]), f64([[1, 1, 0]])
    expected = {True: (-2.0, LN2, -2.0), False: (-2 + 0.2 * K3_LN2, K3_LN2, -1.95)}
    for kl_in_reward, (value, kl, gradient) in expected.items():
        logps = f64([[math.log(0.5), math.log(0.5), 500.0]]).requires_grad_(True)
        loss, stats = rloo_loss(
            logps,
            logps.detach(),
            f64([2.0]),
            mask,
            reference_logps=reference_logps,
            beta=0.1,
            kl_in_reward=kl_in_reward,
        )
        loss.backward()
        assert loss.item() == pytest.approx(value)
        assert stats["kl"] == pytest.approx(kl)
        assert_close(logps.grad, f64([[gradient, gradient, 0.0]]))
    with pytest.raises(ValueError, match="reference_logps"):
        rloo_loss(logps, logps.detach(), f64([2.0]), mask, beta=0.1, kl_in_reward=False)


# --- a bandit ------------------------------------------------------------------------------------


def train_bandit(method: str, steps: int = 50, prompts: int = 8, k: int = 4, beta: float = 0.04) -> float:
    """A one-token softmax policy over 4 tokens, reward 1 for token 2; returns pi(2) after training."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    reference = torch.log_softmax(logits.detach(), -1)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(steps):
        # step 1. sample k completions for each prompt and score them
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, -1), prompts * k, True, generator=generator)
        scores = (tokens == 2).double().view(prompts, k)
        logps = torch.log_softmax(logits, -1)[tokens].unsqueeze(1)
        reference_logps, mask = reference[tokens].unsqueeze(1), torch.ones_like(logps)
        # step 2. advantages and the loss, one iteration per batch
        if method == "grpo":
            advantages, _ = grpo_advantages(scores)
            loss, _ = grpo_loss(
                logps,
                logps.detach(),
                reference_logps,
                advantages.flatten(),
                mask,
                beta=beta,
                loss_type="grpo",
            )
        else:
            kl = sequence_kl(logps, reference_logps, mask).view(prompts, k)
            advantages = rloo_advantages(kl_folded_rewards(scores, kl, beta))
            loss, _ = rloo_loss(logps, logps.detach(), advantages.flatten(), mask)
        # step 3. one optimisation step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits, -1)[2].item()


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_bandit_learns_the_rewarded_token(method):
    assert train_bandit(method) > 0.9
