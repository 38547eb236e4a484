"""Figures: ``plots/loss.png`` (training and validation loss, learning rate, from ``metrics.jsonl``) and
``plots/pipeline.png`` (a pipeline step's Gantt chart, from the executor's traces)."""

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


def plot_pipeline(traces: list[list], path: str | os.PathLike, schedule: str) -> Path:
    """Gantt chart of one step: a row per stage, a bar per F/B/W computation (labelled with its
    micro-batch), from the executor's traces; the measured bubble in the title."""
    from astrobio.parallel.executor import measured_bubble
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = min(e.start for trace in traces for e in trace)
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 1 + 0.8 * len(traces)), dpi=120)
    for stage, trace in enumerate(traces):
        for e in trace:
            left, width = (e.start - start) * 1e3, (e.end - e.start) * 1e3
            ax.barh(stage, width, left=left, color=colors.get(e.op, "tab:gray"), edgecolor="black", linewidth=0.4)
            ax.text(left + width / 2, stage, f"{e.op}{e.micro_batch}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(traces)), [f"stage {s}" for s in range(len(traces))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step's first computation")
    ax.set_title(f"{schedule}: one step, measured bubble {measured_bubble(traces):.1%}")
    split = any(e.op == "W" for trace in traces for e in trace)
    labels = {"F": "forward", "B": "backward (input)" if split else "backward", "W": "backward (weights)"}
    shown = [op for op in colors if op != "W" or split]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=colors[op]) for op in shown], [labels[op] for op in shown],
              loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(shown), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
