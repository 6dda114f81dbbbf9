"""A seeded sweep's numbers: the grid, the points, means over seeds with 95% intervals, the reward-KL
frontier, comparisons at matched KL, and the papers' claims as a table. Pure functions of the points
(flows/sweep.py runs the grid as DVC experiments and calls these).

A point is one run of one method at one strength and one seed, as a flat dict: `method`, `value` (the
strength knob's value; the iteration for ReST, n for best-of-n; None without a knob), `seed`,
`experiment` (the DVC experiment) and the held-out metrics of the run (`objective/kl`, `gold/reward`,
`gold/reward_ci_low`, ...).

Two kinds of interval, kept apart:
  - over seeds (the `_low` / `_high` columns): Student's t on the per-seed values, 95%. This is the
    variation that flips a method ranking between machines: training order, the method's sampling.
  - over prompts (`_boot_halfwidth`): the mean half-width of each point's own percentile bootstrap over
    the held-out prompts (the stage computes it); the evaluation's sampling error alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
from scipy import stats

from alignment.plots import plt

# what a point carries from its stage's metrics (those present are kept)
METRICS = (
    "objective/kl",
    "gold/reward",
    "gold/sft_reward",
    "gold/win_rate_vs_sft",
    "rm/reward",
    "rm/win_rate_vs_sft",
    "length/mean_tokens",
    "length/sft_mean_tokens",
    "eval/accuracy",
)
BOOTSTRAPPED = ("gold/reward", "gold/win_rate_vs_sft", "rm/reward", "rm/win_rate_vs_sft")


# ------------------------------------------------------------------------------------------- grid
def grid(methods: dict[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One entry per DVC experiment: `method`, `value`, `seed`, `stages` and the params `settings` it
    runs with (the method's fixed `set`, its knob at `value`, its seed key at `seed`). `methods` maps a
    name to a `SweepMethodConfig`."""
    runs = []
    for (name, method), seed in product(methods.items(), seeds):
        for value in method.values or (None,):
            settings = dict(method.set)
            if method.knob is not None:
                settings[method.knob] = value
            settings[method.seed] = seed
            runs.append(
                {
                    "method": name,
                    "value": value,
                    "seed": seed,
                    "stages": list(method.stages),
                    "settings": settings,
                }
            )
    return runs


def points_of(run: dict[str, Any], metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The points one experiment gives, from its metrics files ({path: metrics}): one for an ordinary
    stage (its value the knob's); one per n for best_of_n (`best_of_<n>/...`); one per iteration for
    ReST (`metrics/rest_iter_<k>.json`), with the SFT start as iteration 0."""
    base = {"method": run["method"], "seed": run["seed"], "experiment": run.get("experiment")}
    stages = run["stages"]
    if stages == ["best_of_n"]:
        found = metrics.get("metrics/best_of_n.json", {})
        ns = sorted(
            {int(k.split("/")[0].removeprefix("best_of_")) for k in found if k.startswith("best_of_")}
        )
        return [
            base
            | {"value": n}
            | _pick({k.split("/", 1)[1]: v for k, v in found.items() if k.startswith(f"best_of_{n}/")})
            for n in ns
        ]
    if all(s.startswith("rest_iter@") for s in stages):
        out = []
        for stage in stages:
            k = int(stage.split("@")[1])
            found = metrics.get(f"metrics/rest_iter_{k}.json")
            if found:
                out.append(base | {"value": k} | _pick(found))
        first = metrics.get(f"metrics/rest_iter_{out[0]['value']}.json", {}) if out else {}
        if "gold/sft_reward" in first:  # iteration 0: the SFT start, measured in iteration 1's comparison
            start = {"objective/kl": 0.0, "gold/win_rate_vs_sft": 0.5, "rm/win_rate_vs_sft": 0.5}
            for key, source in (
                ("gold/reward", "gold/sft_reward"),
                ("rm/reward", "rm/sft_reward"),
                ("length/mean_tokens", "length/sft_mean_tokens"),
            ):
                if source in first:
                    start[key] = float(first[source])
            out.insert(0, base | {"value": 0} | start)
        return out
    found = metrics.get(f"metrics/{stages[-1].replace('@', '_')}.json")
    return [base | {"value": run["value"]} | _pick(found)] if found else []


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    keys = [*METRICS, *(f"{m}_ci_{side}" for m in BOOTSTRAPPED for side in ("low", "high"))]
    return {k: float(metrics[k]) for k in keys if k in metrics and metrics[k] is not None}


# -------------------------------------------------------------------------------------- intervals
def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of `values` (NaNs dropped); the interval is
    NaN with fewer than two values. Worked example: [1, 2, 3] -> mean 2, sd 1, t(0.975, 2) = 4.303,
    half-width 4.303 / sqrt(3) = 2.484."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def difference_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, paired: bool = False
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high). Unpaired: Welch's interval (unequal variances, Welch-Satterthwaite
    degrees of freedom); paired (a[i] and b[i] from one seed): the t interval of the differences."""
    if paired:
        return t_interval([x - y for x, y in zip(a, b)], level)
    a = np.asarray([x for x in a if math.isfinite(x)], dtype=float)
    b = np.asarray([x for x in b if math.isfinite(x)], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df) * se)
    return diff, diff - half, diff + half


def verdict(low: float, high: float) -> str:
    """`holds` when the whole interval of (claimed better - other) is above 0, `does not hold` when it
    is below, `inconclusive` when it straddles 0 or could not be computed."""
    if math.isfinite(low) and low > 0:
        return "holds"
    if math.isfinite(high) and high < 0:
        return "does not hold"
    return "inconclusive"


# -------------------------------------------------------------------------------------- aggregates
def aggregate(points: list[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """One row per (method, value): each metric's mean over seeds with its t interval (`<m>_low`,
    `<m>_high`), the number of seeds, and for the bootstrapped judges the mean half-width of the
    per-point bootstrap over prompts (`<m>_boot_halfwidth`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[(p["method"], p["value"])].append(p)
    rows = []
    for (method, value), members in groups.items():
        row: dict[str, Any] = {"method": method, "value": value, "seeds": len(members)}
        for metric in METRICS:
            values = [p[metric] for p in members if metric in p]
            if values:
                row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = t_interval(values, level)
        for metric in BOOTSTRAPPED:
            halves = [
                (p[f"{metric}_ci_high"] - p[f"{metric}_ci_low"]) / 2
                for p in members
                if f"{metric}_ci_low" in p
            ]
            if halves:
                row[f"{metric}_boot_halfwidth"] = float(np.mean(halves))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], _order(r["value"])))


def _order(value: Any) -> tuple:
    return (0, float(value)) if isinstance(value, int | float) else (1, str(value))


def interpolate(kls: Sequence[float], values: Sequence[float], target: float) -> float:
    """`values` linearly interpolated at KL `target` on the curve (kls, values) sorted by KL; NaN when
    `target` lies outside the curve's KL range (no extrapolation)."""
    pairs = sorted((k, v) for k, v in zip(kls, values) if math.isfinite(k) and math.isfinite(v))
    if not pairs or not pairs[0][0] <= target <= pairs[-1][0]:
        return math.nan
    xs, ys = zip(*pairs)
    return float(np.interp(target, xs, ys))


def at_matched_kl(points: list[dict[str, Any]], method: str, metric: str, target: float) -> list[float]:
    """Per seed, `metric` of `method` interpolated at KL `target` along that seed's curve over the
    strengths; seeds whose curve does not reach `target` are left out."""
    by_seed: dict[int, list[dict]] = defaultdict(list)
    for p in points:
        if p["method"] == method and metric in p and "objective/kl" in p:
            by_seed[p["seed"]].append(p)
    values = []
    for seed in sorted(by_seed):
        curve = by_seed[seed]
        value = interpolate([p["objective/kl"] for p in curve], [p[metric] for p in curve], target)
        if math.isfinite(value):
            values.append(value)
    return values


def matched_kl_table(
    points: list[dict[str, Any]], targets: Sequence[float], metrics: Sequence[str], level: float = 0.95
) -> list[dict[str, Any]]:
    """For each method, target KL and metric: the mean over seeds at that KL with its t interval."""
    rows = []
    for method in sorted({p["method"] for p in points if "objective/kl" in p}):
        for target, metric in product(targets, metrics):
            values = at_matched_kl(points, method, metric, target)
            mean, low, high = t_interval(values, level)
            rows.append(
                {"method": method, "kl": target, "metric": metric, "seeds": len(values), "mean": mean}
                | {"low": low, "high": high}
            )
    return rows


# ------------------------------------------------------------------------------------------ claims
def claims(
    points: list[dict[str, Any]],
    targets: Sequence[float],
    brain_value: Any = None,
    level: float = 0.95,
    metric: str = "gold/win_rate_vs_sft",
) -> list[dict[str, Any]]:
    """The papers' claims against this sweep, one row per claim (and matched KL): the difference
    (claimed better - other) with its interval and `verdict`. A claim whose methods are not all in the
    sweep is left out."""
    methods = {p["method"] for p in points}
    rows = []

    def row(claim: str, source: str, diff: tuple[float, float, float], evidence: str) -> None:
        rows.append(
            {
                "claim": claim,
                "source": source,
                "difference": diff[0],
                "low": diff[1],
                "high": diff[2],
                "evidence": evidence,
                "verdict": verdict(diff[1], diff[2]),
            }
        )

    def matched(a: str, b: str, kl: float, what: str = metric) -> tuple[tuple, str]:
        va, vb = at_matched_kl(points, a, what, kl), at_matched_kl(points, b, what, kl)
        evidence = f"{what} at KL {kl:g}: {a} {_fmt(va)} vs {b} {_fmt(vb)}"
        return difference_interval(va, vb, level), evidence

    for kl in targets:
        for other in ("dpo", "ppo"):
            if {"brain", other} <= methods:
                diff, evidence = matched("brain", other, kl)
                row(
                    f"BRAIn ahead of {other.upper()} at matched KL ({kl:g} nats)",
                    "Pandey et al. 2024",
                    diff,
                    evidence,
                )
        if {"dpo", "ppo"} <= methods:
            diff, evidence = matched("dpo", "ppo", kl, "gold/reward")
            row(f"DPO's frontier above PPO's ({kl:g} nats)", "Rafailov et al. 2023, Fig. 2", diff, evidence)

    def at_value(method: str, value: Any) -> list[float]:
        return [p[metric] for p in points if p["method"] == method and p["value"] == value and metric in p]

    for ablation, label in (
        ("brain_no_baseline", "no baseline (DPG-like)"),
        ("brain_no_self_normalize", "no self-normalisation (GDC++-like)"),
    ):
        if {"brain", ablation} <= methods:
            a, b = at_value("brain", brain_value), at_value(ablation, None)
            row(
                f"BRAIn ahead of its ablation: {label}",
                "Pandey et al. 2024, Table 3",
                difference_interval(a, b, level),
                f"{metric} at reward_beta {brain_value}: brain {_fmt(a)} vs {ablation} {_fmt(b)}",
            )

    rest = [p for p in points if p["method"] == "rest"]
    iterations = sorted({p["value"] for p in rest})
    for judge in ("rm/reward", "gold/reward"):
        for before, after in zip(iterations, iterations[1:]):
            pairs = [
                (a[judge], b[judge])
                for a in rest
                for b in rest
                if a["value"] == after
                and b["value"] == before
                and a["seed"] == b["seed"]
                and judge in a
                and judge in b
            ]
            if pairs:
                diff = difference_interval([a for a, _ in pairs], [b for _, b in pairs], level, paired=True)
                row(
                    f"ReST: {judge} rises from iteration {before} to {after}",
                    "Gulcehre et al. 2023",
                    diff,
                    f"paired over {len(pairs)} seeds: {_fmt([a - b for a, b in pairs])}",
                )

    bon = [p for p in points if p["method"] == "best_of_n" and "objective/kl" in p]
    if bon:
        top = max(p["value"] for p in bon)
        kl = float(np.mean([p["objective/kl"] for p in bon if p["value"] == top]))
        best = [p[metric] for p in bon if p["value"] == top and metric in p]
        for other in ("dpo", "ppo", "brain", "rest"):
            if other in methods:
                values = at_matched_kl(points, other, metric, kl)
                label = {"brain": "BRAIn", "rest": "ReST"}.get(other, other.upper())
                row(
                    f"Best-of-{top} ahead of {label} at its KL ({kl:.2f} nats)",
                    "Gao et al. 2023",
                    difference_interval(best, values, level),
                    f"{metric}: best-of-{top} {_fmt(best)} vs {other} {_fmt(values)}",
                )
    return rows


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "n/a (no seed reaches it)"
    mean, low, high = t_interval(values)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}] (n={len(values)})" if len(values) > 1 else f"{mean:.3f} (n=1)"


# ---------------------------------------------------------------------------------- presentation
def claims_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| claim | source | difference [95% CI] | evidence | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ci = (
            f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
            if math.isfinite(r["low"])
            else (f"{r['difference']:+.3f}" if math.isfinite(r["difference"]) else "n/a")
        )
        lines.append(f"| {r['claim']} | {r['source']} | {ci} | {r['evidence']} | **{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def frontier_markdown(rows: list[dict[str, Any]]) -> str:
    """The aggregated points: mean over seeds [95% t interval], ± the mean bootstrap half-width over
    prompts, and the response length."""
    lines = [
        "| method | value | seeds | KL (nats) | gold reward | ± prompts | gold win rate vs SFT | RM reward "
        "| length (tokens) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "objective/kl" not in r:
            continue
        lines.append(
            f"| {r['method']} | {r['value']} | {r['seeds']} | {_cell(r, 'objective/kl', 2)} "
            f"| {_cell(r, 'gold/reward')} "
            f"| {r.get('gold/reward_boot_halfwidth', math.nan):.3f} | {_cell(r, 'gold/win_rate_vs_sft')} "
            f"| {_cell(r, 'rm/reward')} | {_cell(r, 'length/mean_tokens', 1)} |"
        )
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], metric: str, digits: int = 3) -> str:
    if metric not in row:
        return "n/a"
    mean, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if not math.isfinite(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def frontier_figure(rows: list[dict[str, Any]]):
    """Gold and RM reward against KL to SFT, per method: each point the mean over seeds with 95%
    intervals over seeds on both axes, joined in the order of the method's knob."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, judge in zip(axes, ("gold/reward", "rm/reward")):
        for method in sorted({r["method"] for r in rows}):
            curve = [r for r in rows if r["method"] == method and judge in r and "objective/kl" in r]
            if not curve:
                continue
            curve.sort(key=lambda r: r["objective/kl"])
            x = np.array([r["objective/kl"] for r in curve])
            y = np.array([r[judge] for r in curve])
            xerr = np.nan_to_num(
                np.array(
                    [
                        [
                            r["objective/kl"] - r["objective/kl_low"],
                            r["objective/kl_high"] - r["objective/kl"],
                        ]
                        for r in curve
                    ]
                ).T
            )
            yerr = np.nan_to_num(
                np.array([[r[judge] - r[f"{judge}_low"], r[f"{judge}_high"] - r[judge]] for r in curve]).T
            )
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=method)
        ax.set_xlabel("KL(policy || SFT), nats")
        ax.set_ylabel(f"mean {judge.split('/')[0]} reward (held-out prompts)")
        ax.set_title(f"{judge.split('/')[0]} reward vs KL: mean over seeds, 95% CI")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure
