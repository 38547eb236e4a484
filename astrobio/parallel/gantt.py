"""Renders measured pipeline traces as a Gantt chart: one row per rank, one bar per F, B or W."""

from __future__ import annotations

from pathlib import Path

from astrobio.parallel.trace import TraceEvent, measured_bubble

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}


def render_gantt(traces: list[list[TraceEvent]], path: str | Path, title: str = "pipeline step",
                 simulated_bubble: float | None = None) -> float:
    """Writes the chart to ``path`` (PNG) and returns the measured bubble fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bubble = measured_bubble(traces)
    origin = min(e.start for trace in traces for e in trace)
    fig, ax = plt.subplots(figsize=(12, 0.8 + 0.7 * len(traces)), dpi=80)
    for rank, trace in enumerate(traces):
        for op in COLOURS:
            bars = [((e.start - origin) * 1e3, (e.end - e.start) * 1e3) for e in trace if e.op == op]
            ax.broken_barh(bars, (rank - 0.4, 0.8), facecolors=COLOURS[op], edgecolor="white", linewidth=0.3,
                           label=op if rank == 0 else None)
    ax.set_yticks(range(len(traces)), [f"stage {r}" for r in range(len(traces))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first computation")
    note = f"measured bubble {bubble:.1%}"
    if simulated_bubble is not None:
        note += f", simulated {simulated_bubble:.1%}"
    ax.set_title(f"{title}: {note}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return bubble
