"""Measured traces of pipeline steps: what each computation cost and how long it waited, and the bubble
they show, measured or replayed through the simulator with the measured costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from astrobio.parallel.schedules import Schedule
from astrobio.parallel.simulate import Costs, simulate


@dataclass
class TraceEvent:
    """One computation: perf_counter seconds (one clock for all processes on a Linux host), and the
    seconds it waited for its data before starting."""

    op: str
    micro_batch: int
    start: float
    end: float
    wait: float = 0.0


def gather_traces(trace: list[TraceEvent], group=None) -> list[list[TraceEvent]]:
    """Every rank's trace, on every rank (a collective: call it on all ranks)."""
    traces: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(traces, trace, group=group)
    return traces


def measured_bubble(traces: list[list[TraceEvent]]) -> float:
    """Idle share of stage-time between the first computation's start and the last one's end."""
    start = min(e.start for t in traces for e in t)
    span = max(e.end for t in traces for e in t) - start
    busy = sum(e.end - e.start for t in traces for e in t)
    return 1.0 - busy / (len(traces) * span) if span > 0 else 0.0


def measured_costs(traces: list[list[TraceEvent]], comm_s: float = 0.0, per_action: bool = True) -> Costs:
    """Seconds per computation from the traces, for replaying the same schedule: each action's own
    measured duration (``per_action``), or the mean per (stage, op), which irons out the variation
    between micro-batches. Either way every (stage, op) also gets its mean, for actions the trace
    lacks. ``comm_s`` is the transfer time of one activation or gradient (e.g. ``p2p_latency``)."""
    per_stage, each = {}, {}
    for stage, trace in enumerate(traces):
        for op in ("F", "B", "W"):
            durations = [e.end - e.start for e in trace if e.op == op]
            per_stage[(stage, op)] = sum(durations) / len(durations) if durations else 0.0
        if per_action:
            each.update({(stage, e.op, e.micro_batch): e.end - e.start for e in trace})
    return Costs(comm=comm_s, per_stage=per_stage, per_action=each)


def simulated_bubble(sched: Schedule, traces: list[list[TraceEvent]], comm_s: float = 0.0,
                     per_action: bool = True) -> float:
    """The bubble of ``sched`` replayed with the measured compute costs (each action's own duration, or
    with ``per_action=False`` each (stage, op)'s mean) and ``comm_s`` per message: what the step
    would idle if messages took ``comm_s`` and the executor cost nothing between computations."""
    return simulate(sched, measured_costs(traces, comm_s, per_action)).bubble
