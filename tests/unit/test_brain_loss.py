"""BRAIn's loss against hand-worked values, its gradient's closed forms, and its reduction to DPO."""

import math

import pytest
import torch

from alignment.losses.brain_loss import brain_loss, log_likelihood
from alignment.losses.preference_loss import dpo_loss

LN2, LN3 = math.log(2.0), math.log(3.0)
MODES = [  # (self_normalize, baseline)
    (True, "self_normalized"),
    (True, "none"),
    (False, "self_normalized"),
    (False, "none"),
]


def random_logps(
    batch: int = 3, n: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy, proposal, target) log-densities, float64, on the scale of short sequences."""
    g = torch.Generator().manual_seed(seed)
    return tuple(-5.0 * torch.rand(batch, n, generator=g, dtype=torch.float64) for _ in range(3))


def policy_gradient(policy, proposal, target, **kwargs) -> tuple[torch.Tensor, dict]:
    policy = policy.clone().requires_grad_(True)
    losses, diagnostics = brain_loss(policy, proposal, target, **kwargs)
    losses.sum().backward()
    return policy.grad, diagnostics


# --- hand-worked values ---------------------------------------------------------------------------


def test_brain_hand_worked():
    # n = 2, proposal uniform (log q = 0): alpha = softmax(0, 0) = (1/2, 1/2);
    # policy log-ratios (ln 3, 0): beta = (3/4, 1/4);
    # loss = -(1/2) [ln(3/4) + ln(1/4)] = (1/2) ln(16/3); gradient -(alpha - beta) = (1/4, -1/4)
    policy = torch.tensor([[LN3, 0.0]], requires_grad=True)
    losses, diag = brain_loss(policy, torch.zeros(1, 2), torch.zeros(1, 2))
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.5 * math.log(16 / 3))
    assert torch.allclose(diag["alpha"], torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(diag["beta"], torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(policy.grad, torch.tensor([[0.25, -0.25]]))
    assert diag["ess"].item() == pytest.approx(2.0)
    assert diag["alpha_entropy"].item() == pytest.approx(LN2)


def test_no_self_normalization_hand_worked():
    # n = 2, log q = 0, target (ln 3, 0), policy (0, ln 2), log Z = ln 2:
    #   w = exp(target - q - ln Z) / n = (3/2, 1/2) / 2 = (3/4, 1/4)
    #   b = exp(policy - q) / n = (1, 2) / 2 = (1/2, 1)
    #   gradient -(w - b) = (-1/4, 3/4)
    # The per-prompt estimate log Z = logsumexp(ln 3, 0) - ln 2 = ln 4 - ln 2 = ln 2: the same weights.
    policy, proposal, target = torch.tensor([[0.0, LN2]]), torch.zeros(1, 2), torch.tensor([[LN3, 0.0]])
    for log_partition in (LN2, torch.tensor([LN2]), None):
        grad, diag = policy_gradient(
            policy, proposal, target, self_normalize=False, log_partition=log_partition
        )
        assert torch.allclose(diag["alpha"], torch.tensor([[0.75, 0.25]]))
        assert torch.allclose(diag["beta"], torch.tensor([[0.5, 1.0]]))
        assert torch.allclose(grad, torch.tensor([[-0.25, 0.75]]))


# --- the special case: DPO -------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduces_to_dpo(beta, seed):
    """n = 2, proposal = reference, alpha one-hot on the chosen response (target -inf on the rejected),
    policy and reference log-probs scaled by beta: -log softmax_chosen(beta (pi - ref)) is DPO's
    -log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)]). Values and gradients agree."""
    g = torch.Generator().manual_seed(seed)
    pi_c, pi_r, ref_c, ref_r = (-40.0 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    pi_c.requires_grad_(True), pi_r.requires_grad_(True)

    expected, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type="sigmoid")
    expected_grads = torch.autograd.grad(expected.sum(), (pi_c, pi_r))
    target = torch.tensor([0.0, -math.inf], dtype=torch.float64).expand(6, 2)
    losses, diag = brain_loss(
        beta * torch.stack([pi_c, pi_r], -1), beta * torch.stack([ref_c, ref_r], -1), target
    )
    grads = torch.autograd.grad(losses.sum(), (pi_c, pi_r))

    assert torch.equal(diag["alpha"], torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(6, 2))
    assert torch.allclose(losses, expected, atol=1e-6, rtol=0)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["self_normalized", "none"])
def test_gradient_matches_finite_differences(baseline):
    # only the self-normalised losses are functions of policy_logps whose gradient is the estimator;
    # the self_normalize=False loss is a surrogate (its baseline is a detached function of
    # policy_logps), so its value's finite differences are not its gradient: see the closed-form test
    policy, proposal, target = random_logps()
    grad, _ = policy_gradient(policy, proposal, target, baseline=baseline)
    eps, numeric = 1e-6, torch.zeros_like(policy)
    for index in torch.cartesian_prod(torch.arange(policy.shape[0]), torch.arange(policy.shape[1])):
        i, j = index.tolist()
        step = torch.zeros_like(policy)
        step[i, j] = eps
        up = brain_loss(policy + step, proposal, target, baseline=baseline)[0].sum()
        down = brain_loss(policy - step, proposal, target, baseline=baseline)[0].sum()
        numeric[i, j] = (up - down) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-7, rtol=0)


@pytest.mark.parametrize("self_normalize,baseline", MODES)
@pytest.mark.parametrize("log_partition", [None, -1.5])
def test_gradient_closed_forms(self_normalize, baseline, log_partition):
    """d loss / d policy_logps = -(alpha - beta) (BRAIn), -alpha (no baseline), -(w - b) (GDC++)."""
    if self_normalize and log_partition is not None:
        pytest.skip("log_partition is rejected with self_normalize=True (tested below)")
    policy, proposal, target = random_logps(seed=3)
    grad, diag = policy_gradient(
        policy,
        proposal,
        target,
        self_normalize=self_normalize,
        baseline=baseline,
        log_partition=log_partition,
    )
    if self_normalize:
        weights = torch.softmax(target - proposal, -1)
        base = (
            torch.softmax(policy - proposal, -1)
            if baseline == "self_normalized"
            else torch.zeros_like(policy)
        )
    else:
        n = policy.shape[-1]
        log_z = log_partition
        if log_z is None:
            log_z = torch.logsumexp(target - proposal, -1, keepdim=True) - math.log(n)
        weights = torch.exp(target - proposal - log_z) / n
        base = torch.exp(policy - proposal) / n if baseline == "self_normalized" else torch.zeros_like(policy)
    assert torch.allclose(diag["alpha"], weights)
    assert torch.allclose(diag["beta"], base)
    assert torch.allclose(grad, -(weights - base))


def test_proposal_and_target_get_no_gradient():
    policy, proposal, target = (x.clone().requires_grad_(True) for x in random_logps())
    brain_loss(policy, proposal, target)[0].sum().backward()
    assert proposal.grad is None and target.grad is None and policy.grad is not None


# --- weights and invariants -----------------------------------------------------------------------


def test_brain_weights_are_distributions():
    policy, proposal, target = random_logps(batch=5, n=6)
    _, diag = brain_loss(policy, proposal, target)
    for key in ("alpha", "beta"):
        assert torch.allclose(diag[key].sum(-1), torch.ones(5, dtype=torch.float64))
        assert (diag[key] >= 0).all()


def test_weights_ignore_per_prompt_constants():
    """The target need not be normalised: a per-prompt log Z(x) cancels in alpha (and in w, whose
    per-prompt log Z estimate absorbs it); the policy's per-prompt constant cancels in beta and in the
    BRAIn loss, which sees only the n samples' relative policy weights."""
    policy, proposal, target = random_logps()
    shift = torch.tensor([[3.0], [-7.0], [0.5]], dtype=torch.float64)  # (B, 1)
    for self_normalize in (True, False):
        _, diag = brain_loss(policy, proposal, target, self_normalize=self_normalize)
        _, shifted = brain_loss(policy, proposal, target + shift, self_normalize=self_normalize)
        assert torch.allclose(diag["alpha"], shifted["alpha"])
    losses, diag = brain_loss(policy, proposal, target)
    shifted_losses, shifted = brain_loss(policy + shift, proposal, target)
    assert torch.allclose(losses, shifted_losses)
    assert torch.allclose(diag["beta"], shifted["beta"])


@pytest.mark.parametrize("self_normalize", [True, False])
def test_common_per_sample_shift_cancels(self_normalize):
    # adding d_i to policy, proposal and target alike changes only the base measure: both log-ratios,
    # and so the weights, the baseline and the gradient, stay the same
    policy, proposal, target = random_logps()
    d = torch.randn(3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grad, diag = policy_gradient(policy, proposal, target, self_normalize=self_normalize)
    shifted_grad, shifted = policy_gradient(
        policy + d, proposal + d, target + d, self_normalize=self_normalize
    )
    assert torch.allclose(diag["alpha"], shifted["alpha"])
    assert torch.allclose(diag["beta"], shifted["beta"])
    assert torch.allclose(grad, shifted_grad)


def test_self_normalize_false_without_partition_uses_alpha():
    """With log_partition=None, Z(x) is estimated from the same n samples,
    log Z = logsumexp_i(target_i - proposal_i) - log n, so w_i = exp(target_i - proposal_i - log Z) / n
    = softmax_i(target - proposal) = alpha_i: only the unnormalised baseline differs from BRAIn."""
    policy, proposal, target = random_logps()
    _, brain = brain_loss(policy, proposal, target)
    _, gdc = brain_loss(policy, proposal, target, self_normalize=False)
    assert torch.allclose(gdc["alpha"], brain["alpha"])
    assert torch.allclose(gdc["beta"], torch.exp(policy - proposal) / 4)


def test_ess_bounds_and_extremes():
    policy, proposal, target = random_logps(batch=8, n=5)
    ess = brain_loss(policy, proposal, target)[1]["ess"]
    assert ((ess >= 1 - 1e-12) & (ess <= 5 + 1e-12)).all()
    # uniform weights (target = proposal + const): ess = n; one sample left (-inf elsewhere): ess = 1
    uniform = brain_loss(policy, proposal, proposal + 2.0)[1]
    assert torch.allclose(uniform["ess"], torch.full((8,), 5.0, dtype=torch.float64))
    one_hot = torch.full_like(target, -math.inf)
    one_hot[:, 2] = 0.0
    diag = brain_loss(policy, proposal, one_hot)[1]
    assert torch.allclose(diag["ess"], torch.ones(8, dtype=torch.float64))
    assert torch.allclose(diag["alpha_entropy"], torch.zeros(8, dtype=torch.float64))


def test_minimum_is_alpha_entropy():
    """The BRAIn loss is the cross-entropy H(alpha, beta) >= H(alpha) (Gibbs), with equality, and zero
    gradient, when the policy's log-ratios equal the target's (up to a per-prompt constant): beta = alpha."""
    policy, proposal, target = random_logps()
    at_target = target + torch.tensor([[1.0], [-2.0], [0.0]], dtype=torch.float64)
    grad, diag = policy_gradient(at_target, proposal, target)
    losses = brain_loss(at_target, proposal, target)[0]
    assert torch.allclose(diag["beta"], diag["alpha"])
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)
    assert torch.allclose(losses, diag["alpha_entropy"])
    elsewhere, diag = brain_loss(policy, proposal, target)
    assert (elsewhere > diag["alpha_entropy"]).all()


# --- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [
        [(2, 3), (2, 3), (2, 4)],
        [(2, 3), (3, 3), (2, 3)],
        [(3,), (3,), (3,)],
        [(1, 2, 3)] * 3,
    ],
)
def test_shape_errors(shapes):
    with pytest.raises(ValueError, match="shape"):
        brain_loss(*(torch.zeros(s) for s in shapes))


def test_unknown_baseline():
    with pytest.raises(ValueError, match="baseline"):
        brain_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), baseline="mean")


# --- log_likelihood -------------------------------------------------------------------------------


def test_log_likelihood_exp():
    # log L = r / beta_r: (1, -2) / 0.5 = (2, -4)
    rewards = torch.tensor([[1.0, -2.0]])
    assert torch.allclose(log_likelihood(rewards, 0.5, "exp"), torch.tensor([[2.0, -4.0]]))


def test_log_likelihood_bradley_terry():
    # r = (1, 1 + 2 ln 3), r_bar = 1, beta_r = 2: (r - r_bar) / beta_r = (0, ln 3),
    # log sigmoid = (ln 1/2, ln 3/4)
    rewards = torch.tensor([[1.0, 1.0 + 2 * LN3]])
    got = log_likelihood(rewards, 2.0, "bradley_terry", baseline_rewards=torch.tensor([1.0]))
    assert torch.allclose(got, torch.tensor([[-LN2, math.log(0.75)]]))
    # and against the formula on a random batch: the baseline is per prompt, broadcast over samples
    rewards, baseline = torch.randn(4, 3), torch.randn(4)
    expected = torch.log(torch.sigmoid((rewards - baseline[:, None]) / 0.7))
    assert torch.allclose(log_likelihood(rewards, 0.7, "bradley_terry", baseline), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reward_beta": 0.0}, "reward_beta"),
        ({"reward_beta": -1.0}, "reward_beta"),
        ({"reward_beta": 1.0, "form": "linear"}, "form"),
        ({"reward_beta": 1.0, "form": "bradley_terry"}, "baseline_rewards"),
    ],
)
def test_log_likelihood_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(torch.zeros(2, 3), **kwargs)


def test_invalid_ablation_arguments_are_rejected():
    policy, proposal, target = random_logps()
    with pytest.raises(ValueError, match="log_partition only applies"):
        brain_loss(policy, proposal, target, log_partition=0.0)
    with pytest.raises(ValueError, match="log_partition must be"):
        brain_loss(
            policy, proposal, target, self_normalize=False, log_partition=torch.zeros(policy.shape[0] + 1)
        )
    with pytest.raises(ValueError, match="n >= 2"):
        brain_loss(policy[:, :1], proposal[:, :1], target[:, :1])
    with pytest.raises(ValueError, match="-inf on all"):
        brain_loss(policy, proposal, torch.full_like(target, -math.inf))


def test_unnormalised_ablation_survives_large_log_ratios():
    """Sequence log-ratios of ~100 nats overflow float32 exp; the ablation caps them and stays finite."""
    policy = torch.tensor([[-10.0, -200.0]], requires_grad=True)
    proposal = torch.tensor([[-150.0, -120.0]])
    losses, diagnostics = brain_loss(policy, proposal, torch.tensor([[-100.0, -130.0]]), self_normalize=False)
    assert torch.isfinite(losses).all() and torch.isfinite(diagnostics["beta"]).all()
    losses.sum().backward()
    assert torch.isfinite(policy.grad).all()
