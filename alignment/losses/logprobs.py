"""Pure loss functions: tensors in, per-example (or summed) losses and detached diagnostics out.

No models, no config objects, no I/O. Shapes: B = batch, T = sequence length, V = vocabulary.

Log-probabilities of chosen tokens never hold a full-vocabulary log-softmax: `selected_logps` takes the
softmax over the vocabulary a few rows at a time (CHUNK_ELEMENTS floats at once, whatever B, T and V),
keeps only each row's chosen entry, and recomputes a chunk's softmax in the backward pass instead of
keeping it. With a 152k vocabulary and 1,000-token rows, the old full log-softmax held 0.6 GB of float32
per row; a chunk is 64 MB. Each chunk runs the very kernels the full-vocabulary form ran (log_softmax,
gather, and log_softmax's own backward), so the values and gradients are bit for bit the old ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # floats per chunk of a vocabulary-wide softmax: 64 MB in float32


def chunk_rows(vocab: int) -> int:
    """Rows of a (rows, V) chunk of at most CHUNK_ELEMENTS floats (at least one row)."""
    return max(1, CHUNK_ELEMENTS // vocab)


def _chunks(logits: torch.Tensor, positions: int | None = None):
    """(b, slice) of every chunk of the first `positions` (default: all) of a (B, T, V) tensor:
    `logits[b, slice]` is a contiguous (rows, V) block whenever the last dimension is."""
    rows = chunk_rows(logits.shape[-1])
    for b in range(logits.shape[0]):
        for start in range(0, logits.shape[1] if positions is None else positions, rows):
            end = start + rows if positions is None else min(start + rows, positions)
            yield b, slice(start, end)


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A chunk in float32 at `temperature`: the float copy (and division) the old code made of the whole."""
    chunk = chunk.float()
    return chunk if temperature == 1.0 else chunk / temperature


class _SelectedLogSoftmax(torch.autograd.Function):
    """log_softmax(logits / temperature)[:, :T', index], chunk by chunk, for the first T' = index.shape[1]
    positions (a causal LM's last position predicts nothing: taking it here, not as a slice of the
    logits, spares the backward pass a second vocabulary-wide gradient); backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        for b, rows in _chunks(logits, index.shape[1]):
            logps = torch.log_softmax(_scaled(logits[b, rows], temperature), dim=-1)
            out[b, rows] = logps.gather(-1, index[b, rows].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, index)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, index = ctx.saved_tensors
        grad_logits = (
            torch.zeros_like(logits) if index.shape[1] < logits.shape[1] else torch.empty_like(logits)
        )
        for b, rows in _chunks(logits, index.shape[1]):
            logps = torch.log_softmax(_scaled(logits[b, rows], ctx.temperature), dim=-1)
            # the gradient the gather hands log_softmax: the chosen entry's, 0 elsewhere
            picked = index[b, rows].unsqueeze(-1)
            grad_logps = torch.zeros_like(logps).scatter_(-1, picked, grad[b, rows, None])
            chunk = torch._log_softmax_backward_data(grad_logps, logps, -1, logps.dtype)
            if ctx.temperature != 1.0:
                chunk = chunk / ctx.temperature
            grad_logits[b, rows] = chunk
        return grad_logits, None, None


def selected_logps(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `index`, in float32, without a full-vocabulary log-softmax.

    Args:
        logits: (B, T, V) or (N, V), any float dtype (a chunk at a time is taken to float32).
        index: (B, T') or (N,) long, the chosen token of each of the first T' <= T positions (any valid id
            where the position is unused).
        temperature: the sampler's; 1 leaves the logits as they are.
    Returns:
        (B, T') or (N,) float32 log-probabilities, with gradient to `logits`.
    """
    if logits.dim() == 2:
        return _SelectedLogSoftmax.apply(logits.unsqueeze(0), index.unsqueeze(0), temperature).squeeze(0)
    return _SelectedLogSoftmax.apply(logits, index, temperature)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H(softmax(logits / temperature)) of every row, a chunk at a time (no gradient).

    Args:
        logits: (B, T, V) or (N, V).
    Returns:
        (B, T) or (N,) float32.
    """
    if logits.dim() == 2:
        return token_entropy(logits.unsqueeze(0), temperature).squeeze(0)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for b, rows in _chunks(logits):
        logps = torch.log_softmax(_scaled(logits[b, rows], temperature), dim=-1)
        out[b, rows] = -(logps.exp() * logps).sum(-1)
    return out


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and which positions count.

    Args:
        logits: (B, T, V) causal-LM outputs; position t predicts token t + 1.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken (prompt, padding).
        temperature: the distribution the log-probs are of, softmax(logits / temperature).
    Returns:
        logps: (B, T - 1) log p(labels[:, t + 1] | tokens up to t), 0 where masked.
        mask: (B, T - 1) float, 1 where labels[:, t + 1] counts.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logps = selected_logps(logits, labels.masked_fill(~mask, 0), temperature)  # positions 0 .. T - 2
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
    ignored = labels == IGNORE_INDEX
    logps = selected_logps(logits, labels.masked_fill(ignored, 0))  # positions 0 .. T - 2
    # nll_loss over one class sums the chosen log-probs in the order F.cross_entropy summed them over the
    # whole vocabulary (the reduction depends on the row count alone): the loss is bit for bit the old one
    targets = torch.zeros_like(labels).masked_fill(ignored, IGNORE_INDEX)
    nll_sum = F.nll_loss(logps.reshape(-1, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll_sum, (~ignored).sum()


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
