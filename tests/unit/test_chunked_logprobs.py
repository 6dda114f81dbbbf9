"""Log-probs of chosen tokens a chunk of rows at a time (alignment/losses/logprobs.py): the values and
gradients of the full-vocabulary log-softmax, bit for bit, without keeping one for the backward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from alignment.losses import logprobs
from alignment.losses.logprobs import IGNORE_INDEX, selected_logps, sft_loss, token_entropy, token_logps


def full_token_logps(logits, labels):
    """The former token_logps: a (B, T - 1, V) float32 log-softmax, then the chosen entries."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logps, 2, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1) * mask


def full_sft_loss(logits, labels):
    """The former sft_loss: cross-entropy fused over the whole vocabulary."""
    flat = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(flat, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 9, 50) * 3, torch.randint(0, 50, (3, 9))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    return logits, labels


def test_selected_logps_hand_worked():
    # logits (ln 3, 0): p = (3/4, 1/4); at temperature 2, (ln 3 / 2, 0): p = (sqrt 3, 1) / (sqrt 3 + 1)
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assert torch.allclose(selected_logps(logits, torch.tensor([0, 1])), torch.log(torch.tensor([0.75, 0.25])))
    at_two = selected_logps(logits, torch.tensor([0, 1]), temperature=2.0)
    root = math.sqrt(3.0)
    assert torch.allclose(at_two, torch.log(torch.tensor([root, 1.0]) / (root + 1)))


@pytest.mark.parametrize("chunk", [1 << 24, 50 * 4, 50])  # one chunk; 4 rows; one row at a time
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_are_the_full_log_softmax_bit_for_bit(monkeypatch, batch, chunk, temperature):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk)
    logits, labels = batch
    full_input, chunked_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    full = full_token_logps(full_input / temperature if temperature != 1.0 else full_input, labels)
    chunked, mask = token_logps(chunked_input, labels, temperature)
    weights = torch.randn(full.shape)
    (full * weights).sum().backward()
    (chunked * weights).sum().backward()
    assert torch.equal(full, chunked) and torch.equal(full_input.grad, chunked_input.grad)
    assert mask.tolist() == (labels[:, 1:] != IGNORE_INDEX).float().tolist()


@pytest.mark.parametrize("chunk", [1 << 24, 50 * 5])
def test_sft_loss_is_the_fused_cross_entropy_bit_for_bit(monkeypatch, batch, chunk):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk)
    logits, labels = batch
    full_input, chunked_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    full = full_sft_loss(full_input, labels)
    chunked, tokens = sft_loss(chunked_input, labels)
    (full * 0.37).backward()
    (chunked * 0.37).backward()
    assert torch.equal(full, chunked) and torch.equal(full_input.grad, chunked_input.grad)
    assert tokens == (labels[:, 1:] != IGNORE_INDEX).sum()


def test_bfloat16_logits_give_the_same_values_and_gradient_dtype(batch):
    logits, labels = batch
    low = logits.bfloat16().requires_grad_()
    full = full_token_logps(low, labels)
    chunked, _ = token_logps(low, labels)
    (gradient,) = torch.autograd.grad(chunked.sum(), low)
    assert torch.equal(full, chunked) and gradient.dtype == torch.bfloat16
    assert torch.equal(gradient, torch.autograd.grad(full.sum(), low)[0])


class Outputs(TorchDispatchMode):
    """The size of every new tensor an op makes (not a view of its input), by op."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.numel()))
        return out


def test_no_op_makes_a_vocabulary_wide_tensor_but_the_logits_gradient(monkeypatch, batch):
    """Forward and backward, every tensor the log-probs make is a chunk of rows, but one: the gradient of
    the logits. The full form made a float32 log-softmax as large as the logits, and its gradient, and the
    scattered gradient of the chosen entries."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 50 * 2)
    logits, labels = batch
    vocabulary_wide = logits[:, :-1].numel()

    def made(fn) -> list[str]:
        leaf = logits.clone().requires_grad_()
        with Outputs() as seen:
            fn(leaf, labels).sum().backward()
        return sorted(op for op, size in seen.sizes if size >= vocabulary_wide)

    assert len(made(full_token_logps)) >= 3
    assert made(lambda x, y: token_logps(x, y)[0]) == ["aten.zeros_like.default"]  # the logits' gradient


def test_token_entropy_hand_worked_and_chunked(monkeypatch, batch):
    # uniform over V: ln V; logits (ln 3, 0): H = -(3/4 ln 3/4 + 1/4 ln 1/4) ~ 0.562335
    assert token_entropy(torch.zeros(1, 2, 5))[0].tolist() == pytest.approx([math.log(5)] * 2)
    assert token_entropy(torch.tensor([[math.log(3.0), 0.0]])).item() == pytest.approx(0.562335, abs=1e-6)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 50 * 2)
    logits, _ = batch
    full = F.log_softmax(logits / 0.7, dim=-1)
    assert torch.equal(token_entropy(logits, 0.7), -(full.exp() * full).sum(-1))
