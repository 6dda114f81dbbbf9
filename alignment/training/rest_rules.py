"""ReST (Gulcehre et al. 2023, "Reinforced Self-Training"): the pieces that decide, kept pure.

One iteration is a Grow step (N samples per prompt from the current policy, scored by the reward
model) followed by `steps` Improve steps; Improve step i fine-tunes (NLL) on the grown samples whose
reward lies strictly above its threshold tau_i, and tau rises with i. The thresholds are reward values
or percentiles of the iteration's grown rewards.

The guard: the proxy (the RM) is what ReST optimises, so it keeps rising; a held-out judge the policy
never trained against (the gold scorer on the IMDb task) is what we want to rise. When the held-out
score drops while the proxy rises, the iterations stop and the best iteration by the held-out judge
is kept. An optional ceiling on the held-out KL to SFT stops drift that both judges miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignment.config import GuardConfig, ThresholdConfig


def thresholds(rewards: Sequence[float], cfg: ThresholdConfig, steps: int) -> list[float]:
    """tau_0 < ... < tau_{steps-1}: `start + i * increment`, as a value or as a percentile of `rewards`."""
    levels = [cfg.start + i * cfg.increment for i in range(steps)]
    if cfg.kind == "value":
        return levels
    if len(rewards) == 0:
        raise ValueError("percentile thresholds need at least one grown reward")
    return [float(np.percentile(np.asarray(rewards, dtype=float), level)) for level in levels]


def above(rewards: Sequence[float], tau: float) -> np.ndarray:
    """Indices of the samples kept at threshold tau: reward strictly above it."""
    return np.flatnonzero(np.asarray(rewards, dtype=float) > tau)


def learning_rate(base: float, decay: float, iteration: int) -> float:
    """The learning rate of iteration k (1-based): base * decay ** (k - 1)."""
    if iteration < 1:
        raise ValueError(f"iterations count from 1, got {iteration}")
    return base * decay ** (iteration - 1)


def guard(history: Sequence[dict], cfg: GuardConfig) -> str | None:
    """Why to stop after the last iteration of `history` (records with `iteration`, the proxy, the
    held-out score and `objective/kl`), or None to go on: the held-out score fell by more than
    `tolerance` while the proxy rose, against the iteration before; or the last iteration's held-out
    KL to SFT exceeds `max_kl` (when set). Both reasons, when both hold, joined by "; "."""
    reasons = [hacking(history, cfg), kl_ceiling(history[-1:], cfg.max_kl)]
    return "; ".join(reason for reason in reasons if reason) or None


def hacking(history: Sequence[dict], cfg: GuardConfig) -> str | None:
    """The proxy rose while the held-out score fell by more than `tolerance`, last vs the one before."""
    if len(history) < 2:
        return None
    before, last = history[-2], history[-1]
    proxy_up = last[cfg.proxy] > before[cfg.proxy]
    held_out_down = last[cfg.held_out] < before[cfg.held_out] - cfg.tolerance
    if proxy_up and held_out_down:
        return (
            f"reward hacking suspected at iteration {last['iteration']}: the proxy {cfg.proxy} rose "
            f"{before[cfg.proxy]:.3f} -> {last[cfg.proxy]:.3f} while the held-out {cfg.held_out} fell "
            f"{before[cfg.held_out]:.3f} -> {last[cfg.held_out]:.3f}"
        )
    return None


def kl_ceiling(history: Sequence[dict], max_kl: float | None) -> str | None:
    """The last record's held-out KL to SFT is above `max_kl` (None: no ceiling)."""
    if max_kl is None or not history or history[-1]["objective/kl"] <= max_kl:
        return None
    last = history[-1]
    return (
        f"KL ceiling reached at iteration {last['iteration']}: held-out objective/kl "
        f"{last['objective/kl']:.2f} > rest.guard.max_kl {max_kl}"
    )


def best_iteration(history: Sequence[dict], held_out: str, max_kl: float | None = None) -> dict:
    """The record with the highest held-out score; the earliest wins a tie (fewer steps from the start).
    With `max_kl`, only records whose `objective/kl` is at most `max_kl` compete (the bag-of-words gold
    scorer rewards the RM's word salad too, so a high score far from SFT is not to be trusted); when
    none is within it, the record nearest SFT (lowest KL) is kept: the least drifted, never a crash."""
    if not history:
        raise ValueError("no iterations to choose from")
    within = [r for r in history if max_kl is None or r["objective/kl"] <= max_kl]
    candidates = within or [min(history, key=lambda record: (record["objective/kl"], record["iteration"]))]
    return max(candidates, key=lambda record: (record[held_out], -record["iteration"]))


def beats_champion(
    history: Sequence[dict],
    held_out: str,
    min_improvement: float,
    champion: str | None,
    max_kl: float | None = None,
) -> tuple[bool, str]:
    """Whether the best iteration of a run that started from `champion` (iteration 0 of `history`,
    scored on the same held-out prompts and seeds) should replace it, and why. Without a champion the
    best policy becomes the first one. `max_kl`: the guard's KL ceiling, as `best_iteration` applies it."""
    best, start = best_iteration(history, held_out, max_kl), history[0]
    if champion is None:
        return (
            True,
            f"no champion yet: iteration {best['iteration']} ({held_out} {best[held_out]:.3f}) "
            "becomes the first",
        )
    gain = best[held_out] - start[held_out]
    if best["iteration"] > 0 and gain > min_improvement:
        return True, (
            f"iteration {best['iteration']} beats champion {champion} on {held_out}: "
            f"{best[held_out]:.3f} vs {start[held_out]:.3f} (+{gain:.3f} > {min_improvement})"
        )
    return False, (
        f"champion {champion} stays: the best new iteration does not beat its {held_out} "
        f"{start[held_out]:.3f} by more than {min_improvement}"
    )
