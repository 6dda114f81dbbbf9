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
