"""Best-of-N (the DPO paper's inference-time baseline): sample N continuations per prompt from a
policy and keep the one a scorer (the reward model) ranks highest."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from alignment.generation import generate

Scorer = Callable[[list[str], list[str]], "torch.Tensor | np.ndarray"]


def best_of_n(
    policy, tokenizer, score: Scorer, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0
) -> tuple[list[str], np.ndarray]:
    """Per prompt, the highest-scoring of `n` samples and its score, shape (len(prompts),)."""
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    expanded = [p for p in prompts for _ in range(n)]  # sample j of prompt i sits at i*n + j
    responses = generate(policy, tokenizer, expanded, max_new_tokens, temperature)
    scores = np.asarray(torch.as_tensor(score(expanded, responses)).float()).reshape(len(prompts), n)
    best = scores.argmax(axis=1)
    return [responses[i * n + j] for i, j in enumerate(best)], scores[np.arange(len(prompts)), best]
