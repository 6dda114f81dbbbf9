"""Several rewards computed by code, combined: pure functions on plain numbers (no torch, no models).

Each reward function gives one value per completion, or None where it does not apply (a row without a
reference answer). As TRL's GRPOTrainer (`reward_funcs` + `reward_weights`):
- the completion's reward is the weighted sum of the values that are not None (a None adds nothing;
  a completion that every function skips gets 0);
- each function's `rewards/<name>/mean` and `rewards/<name>/std` are over its values that are not None,
  the std with Bessel's correction (n - 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Value = float | None


def weighted_sum(values: Mapping[str, Sequence[Value]], weights: Mapping[str, float]) -> list[float]:
    """Per completion i: sum over functions f of weights[f] * values[f][i], the None values left out.

    Worked: values {a: [1, None, 0], b: [0.5, 0.5, None]}, weights {a: 1, b: -2}:
    [1 - 1, 0 - 1, 0 + 0] = [0.0, -1.0, 0.0].
    """
    lengths = {name: len(column) for name, column in values.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward functions gave different numbers of values: {lengths}")
    n = next(iter(lengths.values()), 0)
    return [
        float(sum(weights[name] * column[i] for name, column in values.items() if column[i] is not None))
        for i in range(n)
    ]


def mean_std(values: Sequence[Value]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1) of the values that are not None: nan for the
    mean of none, and for the std of fewer than two.

    Worked: [1, None, 0, 0, 1] -> mean 0.5, std sqrt(((0.5^2) * 4) / 3) = sqrt(1/3) = 0.57735.
    """
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


@dataclass
class RewardBatch:
    """A batch of completions scored by several functions: `totals` (the weighted sums, what is trained
    on), each function's `values` and which rows of each were `skipped` (the call failed on them and
    `on_error: skip` left them out; their value is None)."""

    totals: list[float]
    values: dict[str, list[Value]]
    skipped: dict[str, list[bool]]

    def rows(self) -> list[dict[str, tuple[Value, bool]]]:
        """Per completion, {function: (value, skipped)}: what travels with a sample (gathered from
        several processes) until `reward_metrics` reads the whole batch."""
        return [
            {name: (column[i], self.skipped[name][i]) for name, column in self.values.items()}
            for i in range(len(self.totals))
        ]


def reward_metrics(rows: Sequence[Mapping[str, tuple[Value, bool]]]) -> dict[str, float]:
    """`rewards/<name>/mean`, `rewards/<name>/std` (TRL's names) and `rewards/<name>/skipped` (a count)
    of every function over a batch of `RewardBatch.rows()`; {} for rows without functions (a reward
    model alone)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    metrics: dict[str, float] = {}
    for name in names:
        mean, std = mean_std([row[name][0] for row in rows if name in row])
        metrics |= {f"rewards/{name}/mean": mean, f"rewards/{name}/std": std}
        metrics[f"rewards/{name}/skipped"] = float(sum(row[name][1] for row in rows if name in row))
    return metrics
