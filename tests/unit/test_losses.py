"""Loss functions against hand-worked values."""

import math

import pytest
import torch

from alignment.losses.logprobs import (
    IGNORE_INDEX,
    gather_last,
    last_token_index,
    sequence_logps,
    sft_loss,
    token_logps,
)
from alignment.losses.preference_loss import bradley_terry_loss, dpo_loss, simpo_loss, unlikelihood_loss

LN2 = math.log(2.0)


def test_token_logps_hand_worked():
    # vocabulary of 2; uniform logits at t=0 and logits (ln 3, 0) at t=1, i.e. p = (3/4, 1/4)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])  # token 0 is prompt: never predicted
    logps, mask = token_logps(logits, labels)
    assert torch.allclose(logps, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    assert mask.tolist() == [[1.0, 1.0]]


def test_sft_loss_counts_response_tokens_only():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[5, IGNORE_INDEX, 0]])  # t=1 masked (prompt), t=2 -> token 0 with p = 3/4
    nll_sum, n = sft_loss(logits, labels)
    assert n.item() == 1
    assert math.isclose(nll_sum.item(), -math.log(0.75), rel_tol=1e-6)


def test_sft_loss_equals_summed_token_logps():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    logps, mask = token_logps(logits, labels)
    nll_sum, n = sft_loss(logits, labels)
    assert torch.allclose(nll_sum, -logps.sum()) and n == mask.sum()


def test_sequence_logps_sums_response_tokens():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    assert math.isclose(sequence_logps(logits, labels).item(), math.log(0.5) + math.log(0.75), rel_tol=1e-6)


# --- dpo_loss ------------------------------------------------------------------------------------


def _pair(pi_c, ref_c, pi_r, ref_r, dtype=torch.float32):
    """The four (B,) log-prob tensors dpo_loss takes, in its argument order."""
    return [torch.tensor(v, dtype=dtype) for v in (pi_c, pi_r, ref_c, ref_r)]


# the docstring's worked example: (pi_c, ref_c, pi_r, ref_r) = (-1, -2, -4, -2), delta = 3
WORKED = _pair([-1.0], [-2.0], [-4.0], [-2.0])


@pytest.mark.parametrize(
    "loss_type, beta, eps, expected",
    [
        ("sigmoid", math.log(3) / 3, 0.0, math.log(4 / 3)),
        ("sigmoid", math.log(3) / 3, 0.25, 0.75 * math.log(4 / 3) + 0.25 * math.log(4)),
        ("ipo", 0.5, 0.0, 4.0),
        ("hinge", 0.1, 0.0, 0.7),
    ],
)
def test_dpo_loss_hand_worked(loss_type, beta, eps, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*WORKED, beta, eps, loss_type)
    assert losses.shape == (1,)
    assert math.isclose(losses.item(), expected, abs_tol=1e-6)
    assert math.isclose(chosen_rewards.item(), beta, abs_tol=1e-6)
    assert math.isclose(rejected_rewards.item(), -2 * beta, abs_tol=1e-6)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_dpo_sigmoid_is_ln2_when_policy_equals_reference(beta, eps):
    torch.manual_seed(0)
    chosen, rejected = -10 * torch.rand(4), -10 * torch.rand(4)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected, beta, eps)
    assert torch.allclose(losses, torch.full((4,), LN2), rtol=0, atol=1e-6)
    assert torch.equal(chosen_rewards, torch.zeros(4)) and torch.equal(rejected_rewards, torch.zeros(4))


def test_dpo_sigmoid_beta_to_zero_tends_to_ln2():
    torch.manual_seed(0)
    logps = [-20 * torch.rand(5) for _ in range(4)]
    losses, _, _ = dpo_loss(*logps, beta=1e-8)
    assert torch.allclose(losses, torch.full((5,), LN2), rtol=0, atol=1e-6)


def test_cdpo_is_the_label_flip_mixture_and_eps0_is_dpo():
    torch.manual_seed(0)
    logps = [-10 * torch.rand(6, dtype=torch.float64) for _ in range(4)]
    beta, eps = 0.3, 0.2
    delta = (logps[0] - logps[2]) - (logps[1] - logps[3])
    dpo = -torch.log(torch.sigmoid(beta * delta))  # the textbook form of eq. 7
    dpo_flipped = -torch.log(torch.sigmoid(-beta * delta))  # chosen and rejected swapped
    assert torch.allclose(dpo_loss(*logps, beta)[0], dpo, rtol=0, atol=1e-12)
    assert torch.allclose(dpo_loss(*logps, beta, label_smoothing=0.0)[0], dpo, rtol=0, atol=1e-12)
    cdpo = dpo_loss(*logps, beta, label_smoothing=eps)[0]
    assert torch.allclose(cdpo, (1 - eps) * dpo + eps * dpo_flipped, rtol=0, atol=1e-12)


def test_dpo_rewards_are_detached_beta_logratios():
    torch.manual_seed(0)
    pi_c, pi_r = (-5 * torch.rand(3)).requires_grad_(), (-5 * torch.rand(3)).requires_grad_()
    ref_c, ref_r = -5 * torch.rand(3), -5 * torch.rand(3)
    _, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.25)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert torch.allclose(chosen_rewards, 0.25 * (pi_c - ref_c), rtol=0, atol=1e-6)
    assert torch.allclose(rejected_rewards, 0.25 * (pi_r - ref_r), rtol=0, atol=1e-6)


def test_dpo_sigmoid_gradient_matches_closed_form():
    # d/d pi_c of -log sigmoid(beta delta) = -beta sigmoid(-beta delta)
    torch.manual_seed(0)
    pi_c, pi_r, ref_c, ref_r = (-10 * torch.rand(5, dtype=torch.float64) for _ in range(4))
    pi_c.requires_grad_()
    beta = 0.7
    losses, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    losses.sum().backward()
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    assert torch.allclose(pi_c.grad, -beta * torch.sigmoid(-beta * delta.detach()), rtol=0, atol=1e-12)


def test_ipo_summed_and_length_normalised_worked_example():
    """The docstring's numbers as per-token averages of a 4-token chosen and a 2-token rejected
    response: averaged, delta = 3 and (3 - 1)^2 = 4; summed (-4, -8, -8, -4), delta = 8 and (8 - 1)^2 = 49."""
    averaged, _, _ = dpo_loss(*WORKED, beta=0.5, loss_type="ipo")
    summed, _, _ = dpo_loss(*_pair([-4.0], [-8.0], [-8.0], [-4.0]), beta=0.5, loss_type="ipo")
    assert averaged.item() == 4.0 and summed.item() == 49.0


def test_ipo_minimum_is_at_delta_one_over_two_beta():
    beta = 0.25  # target delta = 2
    deltas = torch.tensor([1.5, 1.9, 2.0, 2.1, 2.5], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(5, dtype=torch.float64)
    losses, _, _ = dpo_loss(deltas, zeros, zeros, zeros, beta, loss_type="ipo")
    assert losses.argmin().item() == 2 and losses[2].item() == 0.0
    losses.sum().backward()
    assert deltas.grad[2].item() == 0.0


def test_hinge_is_zero_once_beta_delta_reaches_one():
    beta = 0.5  # beta delta >= 1 from delta = 2 on
    deltas = torch.tensor([1.0, 1.9, 2.0, 3.0, 100.0], requires_grad=True)
    zeros = torch.zeros(5)
    losses, _, _ = dpo_loss(deltas, zeros, zeros, zeros, beta, loss_type="hinge")
    assert torch.allclose(losses, torch.tensor([0.5, 0.05, 0.0, 0.0, 0.0]), rtol=0, atol=1e-6)
    losses.sum().backward()
    assert deltas.grad[2:].eq(0).all()


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_are_independent_across_the_batch(loss_type, eps):
    torch.manual_seed(0)
    logps = [-10 * torch.rand(6) for _ in range(4)]
    batched, _, _ = dpo_loss(*logps, 0.2, eps, loss_type)
    rows = [[x[i : i + 1] for x in logps] for i in range(6)]
    one_by_one = torch.cat([dpo_loss(*row, 0.2, eps, loss_type)[0] for row in rows])
    assert torch.allclose(batched, one_by_one, rtol=0, atol=1e-6)
    # changing the other rows leaves row 0 alone
    changed = [torch.cat([x[:1], -10 * torch.rand(5)]) for x in logps]
    assert dpo_loss(*changed, 0.2, eps, loss_type)[0][0] == batched[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.1, "loss_type": "kto"}, "'hinge', 'ipo', 'sigmoid'"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": 0.1, "loss_type": "ipo"}, "only to loss_type 'sigmoid'"),
    ],
)
def test_dpo_loss_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(*WORKED, **kwargs)


# --- bradley_terry_loss --------------------------------------------------------------------------


def test_bradley_terry_hand_worked():
    chosen = torch.tensor([0.7, math.log(3.0), 1.0])
    rejected = torch.tensor([0.7, 0.0, 1.0 + math.log(3.0)])
    losses, _ = bradley_terry_loss(chosen, rejected)
    expected = [LN2, math.log(4 / 3), math.log(4.0)]  # gaps 0, ln 3, -ln 3: -log sigmoid(-ln 3) = ln 4
    assert torch.allclose(losses, torch.tensor(expected), rtol=0, atol=1e-6)


def test_bradley_terry_margin_shifts_the_gap():
    chosen, rejected = torch.tensor([1 + math.log(3.0), 2.0]), torch.tensor([0.0, 0.0])
    # gap - margin: ln 3 -> ln(4/3); 2 - 2 = 0 -> ln 2
    expected = torch.tensor([math.log(4 / 3), LN2])
    losses, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 2.0]))
    assert torch.allclose(losses, expected, rtol=0, atol=1e-6)
    # a float margin is the same margin for every pair
    losses, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    # 2 - 1 = 1 -> -log sigmoid(1) = ln(1 + 1/e)
    assert torch.allclose(losses, torch.tensor([math.log(4 / 3), math.log1p(1 / math.e)]), rtol=0, atol=1e-6)


def test_bradley_terry_centering_term():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([2.0, -0.5])
    c = 0.01
    losses, _ = bradley_terry_loss(chosen, rejected, center_coefficient=c)
    # pair 0: -log sigmoid(-1) = ln(1 + e), (1 + 2)^2 = 9; pair 1: -log sigmoid(1) = ln(1 + 1/e), (0)^2 = 0
    expected = torch.tensor([math.log1p(math.e) + 0.09, math.log1p(1 / math.e)])
    assert torch.allclose(losses, expected, rtol=0, atol=1e-6)
    bt_only, _ = bradley_terry_loss(chosen, rejected)
    assert math.isclose(losses.mean().item(), bt_only.mean().item() + c * (9 + 0) / 2, abs_tol=1e-6)


def test_bradley_terry_metrics_with_a_tie():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])
    _, metrics = bradley_terry_loss(chosen, rejected)
    # right, tie, wrong, right: (1 + 0.5 + 0 + 1) / 4; gaps (1, 0, -1, 1)
    assert metrics == {"accuracy": 0.625, "margin": 0.25, "chosen_mean": 1.5, "rejected_mean": 1.25}
    assert all(type(v) is float for v in metrics.values())


def test_bradley_terry_shift_leaves_bt_alone_but_moves_centering():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    shift, c = 3.0, 0.1
    bt, _ = bradley_terry_loss(chosen, rejected)
    bt_shifted, _ = bradley_terry_loss(chosen + shift, rejected + shift)
    assert torch.allclose(bt, bt_shifted, rtol=0, atol=1e-12)
    centered, _ = bradley_terry_loss(chosen, rejected, center_coefficient=c)
    centered_shifted, _ = bradley_terry_loss(chosen + shift, rejected + shift, center_coefficient=c)
    total = chosen + rejected
    expected_change = c * ((total + 2 * shift) ** 2 - total**2)
    assert torch.allclose(centered_shifted - centered, expected_change, rtol=0, atol=1e-12)


def test_bradley_terry_rejects_negative_center_coefficient():
    with pytest.raises(ValueError, match="center_coefficient"):
        bradley_terry_loss(torch.zeros(1), torch.zeros(1), center_coefficient=-0.1)


# --- unlikelihood_loss ---------------------------------------------------------------------------


def test_unlikelihood_hand_worked():
    chosen = torch.tensor([-2.0, -1.0])
    # row 0: p = 1/2, 1/4, then a masked position holding 0 as token_logps leaves it; row 1: nothing rejected
    rejected = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    losses = unlikelihood_loss(chosen, rejected, mask, alpha=2.0)
    # row 0: 2 + 2 (-ln(1/2) - ln(3/4)) = 2 + 2 ln(8/3); row 1: just -log p(chosen) = 1
    assert torch.allclose(losses, torch.tensor([2 + 2 * math.log(8 / 3), 1.0]), rtol=0, atol=1e-6)
    losses.sum().backward()
    # d/d log p of -alpha log(1 - p) = alpha p / (1 - p): 2 * 1 and 2 * 1/3; masked positions get 0
    expected_grad = torch.tensor([[2.0, 2 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(rejected.grad, expected_grad, rtol=0, atol=1e-6)


def test_unlikelihood_is_finite_for_near_certain_tokens():
    rejected = torch.tensor([[-1e-12, -1e-3]])
    losses = unlikelihood_loss(torch.tensor([0.0]), rejected, torch.ones(1, 2), alpha=1.0)
    # -log(1e-5) from the clamp, plus -log(1 - e^-0.001), which needs expm1: 1 - exp(-0.001) loses digits
    expected = math.log(1e5) - math.log(-math.expm1(-1e-3))
    assert math.isclose(losses.item(), expected, rel_tol=1e-6)


# --- last_token_index / gather_last --------------------------------------------------------------


def test_last_token_index_any_padding_side():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1],  # no padding
            [0, 1, 0, 0, 0],  # a single real token
        ]
    )
    index = last_token_index(mask)
    assert index.dtype == torch.long and index.tolist() == [2, 4, 4, 1]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 1]


def test_gather_last_when_pad_id_equals_eos_id():
    eos = pad = 2
    input_ids = torch.tensor(
        [
            [5, eos, 7, eos, eos, pad, pad],  # ends in two real EOS tokens, then padding with the same id
            [pad, pad, 5, 7, eos, eos, eos],  # left padded, same trouble
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    values = torch.arange(14.0).reshape(2, 7)  # value = 7 * row + position
    assert last_token_index(mask).tolist() == [4, 6]
    assert gather_last(values, mask).tolist() == [4.0, 13.0]
    # any rule based on the ids would disagree: the first EOS, or the last non-pad token
    assert (input_ids[0] == eos).nonzero()[0].item() == 1 and (input_ids[0] != pad).nonzero()[-1].item() == 2


def test_last_token_index_rejects_an_empty_row():
    with pytest.raises(ValueError, match="no real tokens"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


# --- SimPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, expected", [(0.0, 0.313262), (0.25, 0.563262)])
def test_simpo_loss_hand_worked(eps, expected):
    """Average log-probs chosen -1, rejected -2, beta 2, gamma 1: z = -2 + 4 - 1 = 1, loss = log(1 + e^-1);
    with eps = 1/4: (3/4) log(1 + e^-1) + (1/4) log(1 + e) (the docstring's numbers)."""
    losses, chosen, rejected = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 1.0, eps)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (chosen.item(), rejected.item()) == (-2.0, -4.0)


def test_simpo_without_margin_is_dpo_against_a_reference_that_scores_both_alike():
    """gamma = 0: SimPO on average log-probs is sigmoid DPO on the same numbers with a reference that
    gives chosen and rejected the same log-prob (any value), at the same beta."""
    chosen, rejected = torch.tensor([-1.3, -0.2, -2.0]), torch.tensor([-0.7, -0.9, -2.5])
    simpo, _, _ = simpo_loss(chosen, rejected, beta=1.5, gamma=0.0)
    same = torch.full((3,), -4.0)
    dpo, _, _ = dpo_loss(chosen, rejected, same, same, beta=1.5)
    torch.testing.assert_close(simpo, dpo)


def test_simpo_margin_and_gradient_direction():
    """The margin gamma raises the loss of a pair already ranked right; the gradient raises the chosen
    average log-prob and lowers the rejected one."""
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.5], requires_grad=True)
    loose, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)
    tight, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=2.0)
    assert tight.item() > loose.item()
    tight.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent moves chosen up, rejected down


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"gamma": -1.0}, "gamma must be >= 0"),
        ({"label_smoothing": 0.5}, ""),
    ],
)
def test_simpo_loss_rejects_invalid_arguments(kwargs, message):
    arguments = {"beta": 2.0, "gamma": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), **arguments)
