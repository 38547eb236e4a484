"""Figures from ``metrics.jsonl``: ``plots/loss.png`` (training and validation loss, learning rate)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_loss(records: list[dict], path: str | os.PathLike) -> Path:
    """Training loss per logged step, validation loss where evaluated, learning rate on a second axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr), color="tab:gray", linewidth=0.8, linestyle="--", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper right", frameon=False)
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

