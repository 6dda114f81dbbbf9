"""The reward functions the project ships, called as TRL calls its reward functions: keyword arguments
`prompts`, `completions` (the response texts), `completion_ids` (the sampled ids, EOS included where the
model emitted it) and every extra column of the prompts' dataset rows as a list (e.g. `answer`), plus
the keyword arguments params bind (`kwargs`); one float per completion, or None where the function does
not apply. Name them in params as `alignment.rewards.functions:<name>`, or by the bare name.
"""

from __future__ import annotations

import re
from decimal import Decimal

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
# the whole completion: reasoning without tags, then one answer tag holding a number, then nothing
FORMAT = re.compile(r"[^<>]*<answer>\s*[+-]?\d+(?:\.\d+)?\s*</answer>\s*", re.DOTALL)


def final_answer(completion: str) -> str | None:
    """The content of the completion's last `<answer>...</answer>` tag, stripped; None without one."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


def as_number(text: str | None) -> Decimal | None:
    """`text` as an exact number when it is one (thousands separators allowed: 1,200), else None."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "")
    return Decimal(cleaned) if NUMBER.fullmatch(cleaned) else None


def exact_match(completions: list[str], answer: list | None = None, **kwargs) -> list[float | None]:
    """1.0 when the number in the completion's last `<answer>` tag equals the row's reference `answer`
    (as numbers: 12 = 12.0 = 12.00), 0.0 when it differs, is not a number, or there is no tag; None
    for a row without a reference answer (left out of the mean, as in TRL).

    Worked, reference 14: "7 + 7 = 14. <answer>14</answer>" -> 1.0; "<answer>14.0</answer>" -> 1.0;
    "<answer>15</answer>" -> 0.0; "<answer>fourteen</answer>" -> 0.0; "the answer is 14" -> 0.0.
    """
    answers = answer if answer is not None else [None] * len(completions)
    scores: list[float | None] = []
    for completion, reference in zip(completions, answers):
        expected = as_number(None if reference is None else str(reference))
        if expected is None:
            scores.append(None)
            continue
        given = as_number(final_answer(completion))
        scores.append(1.0 if given is not None and given == expected else 0.0)
    return scores


def answer_format(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is reasoning free of tags followed by exactly one `<answer>NUMBER</answer>`
    and nothing after it but whitespace; else 0.0 (a missing, repeated, unclosed or non-numeric tag, or
    text after it).

    Worked: "3 + 4 = 7. <answer>7</answer>" -> 1.0; "<answer>7</answer> and more" -> 0.0;
    "<answer>seven</answer>" -> 0.0; "<answer>7" -> 0.0; "7" -> 0.0.
    """
    return [1.0 if FORMAT.fullmatch(completion) else 0.0 for completion in completions]


def length_penalty(
    completion_ids: list[list[int]], max_tokens: int = 48, cache_tokens: int = 16, **kwargs
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's `get_soft_overlong_punishment`):
    0 for a completion of at most max_tokens - cache_tokens tokens, then falling linearly to -1 at
    max_tokens, and -1 beyond. Short answers are not rewarded, long ones are pushed back.

    Worked, max_tokens 48, cache_tokens 16: 20 tokens -> 0.0; 32 -> 0.0; 40 -> (32 - 40) / 16 = -0.5;
    48 -> -1.0; 50 -> -1.0.
    """
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"need 0 < cache_tokens <= max_tokens, got {cache_tokens} and {max_tokens}")
    free = max_tokens - cache_tokens
    return [
        0.0 if len(ids) <= free else (free - len(ids)) / cache_tokens if len(ids) <= max_tokens else -1.0
        for ids in completion_ids
    ]
