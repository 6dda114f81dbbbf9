"""Curves as DVC plot files (csv) and as matplotlib figures for MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402


def write_csv(path: Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def loss_curve(
    train: list[dict[str, float]],
    evals: list[dict[str, float]],
    title: str,
    ylabel: str = "loss (nats / response token)",
):
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure
