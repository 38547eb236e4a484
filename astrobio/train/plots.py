"""Figures of a run: ``plots/loss.png`` (training and validation loss, learning rate, from ``metrics.jsonl``)
and ``plots/step_timeline.png`` (where one step's time went, from astrobio.train.timeline)."""

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



PHASE_COLOURS = {"data": "#8C8C8C", "forward": "#4C72B0", "backward": "#DD8452", "pipeline_wait": "#E5E5E5",
                 "grad_reduce": "#CCB974", "norm_clip": "#C44E52", "norm_reduce": "#F2B6B8", "optimizer": "#55A868", "offload_end_step": "#8172B3"}


def plot_step_timeline(breakdowns: list, path: str | os.PathLike) -> Path:
    """plots/step_timeline.png: one optimizer step (the last logged one), one row per lane per rank
    (the host's main thread, the device, and any lane a component added), one bar per phase."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(b.stage, lane) for b in breakdowns for lane in dict.fromkeys(i.lane for i in b.intervals)]
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.5 * len(rows)), dpi=80)
    seen, first = set(), min(b.origin for b in breakdowns)
    for row, (stage, lane) in enumerate(rows):
        breakdown = next(b for b in breakdowns if b.stage == stage)
        shift = breakdown.origin - first
        for interval in (i for i in breakdown.intervals if i.lane == lane):
            colour = PHASE_COLOURS.get(interval.phase, "#937860")
            ax.broken_barh([((shift + interval.start) * 1e3, (interval.end - interval.start) * 1e3)], (row - 0.4, 0.8),
                           facecolors=colour, edgecolor="white", linewidth=0.3,
                           label=None if interval.phase in seen else interval.phase)
            seen.add(interval.phase)
    ax.set_yticks(range(len(rows)), [f"stage {stage} {lane}" for stage, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first rank began the step")
    busy = ", ".join(f"stage {b.stage} {b.step_s * 1e3:.0f} ms, device busy {b.busy_fraction:.0%}" for b in breakdowns)
    ax.set_title(f"one step: {busy}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
