"""Loss functions against hand-worked values."""
import math

import torch

from alignment.losses import IGNORE_INDEX, sft_loss, token_logps


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
