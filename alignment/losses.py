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
    logps = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, safe_labels.unsqueeze(-1)).squeeze(-1)
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
