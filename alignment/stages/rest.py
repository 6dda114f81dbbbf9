"""rest: after the last ReST iteration, keep the best one by the held-out judge and say why.

Reads the last iteration's record (every iteration's held-out numbers, iteration 0 being the start
policy, and the guard's verdict), copies the best iteration's policy to `outputs/rest_best/` (what
the leaderboard evaluates and the registry gets), writes `selection.json`, the per-iteration table
as a DVC plot (proxy reward vs held-out reward per iteration) and the same plot to MLflow.
"""

from __future__ import annotations

import json
import logging
import shutil

from alignment.config import RestConfig
from alignment.paths import Paths
from alignment.plots import plt
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training.rest_rules import best_iteration

logger = logging.getLogger(__name__)

COLUMNS = [
    "iteration",
    "grow/rm_reward",
    "rm/reward",
    "gold/reward",
    "gold/win_rate_vs_sft",
    "objective/kl",
    "improve/tau_0",
    "improve/kept_fraction_0",
]


def proxy_vs_held_out(history: list[dict], proxy: str, held_out: str, best: int, stopped: str | None):
    """Per iteration: rewards on the left axis (the RM on the grown and on the held-out samples, gold on
    the held-out ones), win rates vs SFT on the right; the proxy and the held-out judge named as such,
    and the kept iteration marked."""
    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    right = ax.twinx()
    steps = [r["iteration"] for r in history]
    role = {proxy: " (proxy)", held_out: " (held-out judge)"}
    for kind in ("rm", "code"):  # what Grow scored by
        grown = [(r["iteration"], r[f"grow/{kind}_reward"]) for r in history if f"grow/{kind}_reward" in r]
        if grown:
            ax.plot(*zip(*grown), "s:", color="tab:orange", label=f"{kind} reward, grown samples")
    # every judge the iterations were compared with SFT by: gold (IMDb), rm, and rewards computed by code
    for key in [k for k in history[0] if k.endswith(("/reward", "/win_rate_vs_sft"))]:
        axis, style = (ax, "o-") if key.endswith("/reward") else (right, "d--")
        label = f"{key}, held-out{role.get(key, '')}"
        axis.plot(steps, [r[key] for r in history], style, label=label)
    ax.set(xlabel="ReST iteration (0: start policy)", ylabel="mean reward", xticks=steps)
    right.set_ylabel("win rate vs SFT")
    ax.axvline(best, color="grey", alpha=0.4, linewidth=6, label=f"kept: iteration {best}")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    ax.set_title(
        "ReST: proxy vs held-out reward" + (" (stopped by the guard)" if stopped else ""), fontsize=10
    )
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def run(cfg: RestConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    last = max(int(k) for k in cfg.iterations)
    report = json.loads((paths.rest(last) / "report.json").read_text())
    history, stopped = report["history"], report["stopped"]
    best = best_iteration(history, cfg.guard.held_out, cfg.guard.max_kl)
    start = history[0]
    source = (
        paths.resolve(cfg.iterations["1"])
        if best["iteration"] == 0
        else paths.rest(best["iteration"]) / "policy"
    )
    why = (
        f"iteration {best['iteration']} has the highest held-out {cfg.guard.held_out} "
        f"({best[cfg.guard.held_out]:.3f}; the start policy {start[cfg.guard.held_out]:.3f})"
    )
    if cfg.guard.max_kl is not None:
        within = best["objective/kl"] <= cfg.guard.max_kl
        why += (
            f"; only iterations with held-out objective/kl <= {cfg.guard.max_kl} competed"
            if within
            else f"; none has held-out objective/kl <= {cfg.guard.max_kl}: the one nearest SFT is kept"
        )
    if stopped:
        why += f"; the run stopped early: {stopped}"

    if paths.rest_best.exists():
        shutil.rmtree(paths.rest_best)
    shutil.copytree(source, paths.rest_best)
    selection = {
        "best_iteration": best["iteration"],
        "why": why,
        "stopped": stopped,
        "skipped": report.get("skipped", []),
        "held_out_judge": cfg.guard.held_out,
        "proxy": cfg.guard.proxy,
        "history": history,
    }
    (paths.rest_best / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    metrics = {
        "best_iteration": best["iteration"],
        "iterations_trained": len(history) - 1,
        "guard/stopped": int(bool(stopped)),
        "improved": int(best["iteration"] > 0),
    }
    judged = [k for k in best if k.endswith(("/reward", "/win_rate_vs_sft"))]  # gold, rm, code rewards
    metrics |= {k: best[k] for k in [*judged, "objective/kl"]}
    metrics |= {f"start/{k}": start[k] for k in judged}
    logger.info("kept %s: %s", source, why)
    for r in history:
        logger.info(
            "  iteration %d: reward grown %s, held-out %s, kept %s at tau %s",
            r["iteration"],
            next((f"{r[k]:.3f}" for k in ("grow/rm_reward", "grow/code_reward") if k in r), "-"),
            ", ".join(f"{k} {r[k]:.3f}" for k in judged),
            f"{r['improve/kept_fraction_0']:.2f}" if "improve/kept_fraction_0" in r else "-",
            f"{r['improve/tau_0']:.3f}" if "improve/tau_0" in r else "-",
        )
    if log is not None:
        for r in history:  # one point per iteration: the MLflow UI draws them as curves over `step`
            log.metrics(
                {
                    f"iteration/{k}": v
                    for k, v in r.items()
                    if isinstance(v, (int, float)) and k != "iteration"
                },
                step=r["iteration"],
            )
        log.artifact(paths.rest_best / "selection.json")
        log.tags({"best_iteration": str(best["iteration"]), "selection": why[:5000]})
    figure = proxy_vs_held_out(history, cfg.guard.proxy, cfg.guard.held_out, best["iteration"], stopped)
    return finish(
        "rest",
        paths,
        log,
        metrics,
        csvs={
            "iterations.csv": (
                history,
                COLUMNS + [k for k in ["grow/code_reward", *judged] if k not in COLUMNS],
            )
        },
        figures={"plots/rest_proxy_vs_held_out.png": figure},
        model=paths.rest_best,
        register_as=cfg.register_as,
    )
