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


def curves(history: list[dict[str, float]], title: str, panels: list[list[str]], xlabel: str):
    """One panel per list of columns of `history` (rows with a `step`), each column a curve; columns a
    row lacks (a KL without a reference) are left out."""
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    steps = [row["step"] for row in history]
    for ax, columns in zip(axes[0], panels):
        for column in columns:
            if column in history[-1]:
                ax.plot(steps, [row[column] for row in history], label=column)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure
