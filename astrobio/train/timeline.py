"""Where a step's time goes, measured on every step of every rank (docs/TRAINING.md, "Step breakdown").

The parts of a step mark their phases on one ``StepTimeline``: the loop (``data``), the step runner
(``forward``, ``backward``, and in a pipeline the ``pipeline_wait`` between its computations), the
optimizer (``grad_reduce`` for the wait for data parallel's gradient all-reduces, ``norm_clip`` and
``optimizer`` on the device, ``norm_reduce`` for the all-reduce of the stages' norms; ``offload_end_step`` for the offload engine's ``end_step``). Phases on the ``host`` lane are wall-clock intervals of the process's main thread and do
not overlap, so they add up to the step's wall time (less the loop's own bookkeeping).

Phases marked as device work also go on the ``device`` lane: on a GPU as CUDA events around the work
(read back once, at the end of the step), on the CPU as the same wall-clock interval. The device's
busy fraction is that lane's time over the step's wall time: the share of the step the device spent
computing rather than waiting for the host, the data or other ranks.

A device lane's interval can include time the device's compute stream spent blocked rather than
computing: the offload engine makes it wait for each bucket's upload of new weights (which waits for
the CPU optimizer). The engine reports each such wait (``add_stall``: CUDA events recorded on the
compute stream just before and after the wait, read with the others at the end of the step; on the CPU
the host's wall-clock wait for the weights) as the phase ``waits_for_weights`` on the ``device_stall``
lane, and the busy fraction is the device lane's time less the stalls, over the step's wall time.

Other components may add intervals on lanes of their own (``add``), e.g. the offload engine's worker
threads; they are drawn and summed per lane, and only the ``host`` lane is held to add up.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

HOST, DEVICE, STALL = "host", "device", "device_stall"
WEIGHT_WAIT = "waits_for_weights"


@dataclass
class Interval:
    """One phase on one lane, in seconds since the step began."""

    lane: str
    phase: str
    start: float
    end: float


@dataclass
class StepBreakdown:
    """One step of one rank: its wall time, the seconds of each phase per lane, the device's busy
    fraction, and the intervals themselves (for plots/step_timeline.png)."""

    stage: int
    step_s: float
    phases_s: dict[str, dict[str, float]]
    busy_fraction: float
    intervals: list[Interval] = field(default_factory=list)
    origin: float = 0.0  # time.perf_counter() when the step began (one clock for the processes of a host)

    def record(self) -> dict:
        """The metrics.jsonl form (no intervals)."""
        return {"stage": self.stage, "step_s": round(self.step_s, 6), "busy_fraction": round(self.busy_fraction, 4),
                "phases_s": {lane: {k: round(v, 6) for k, v in phases.items()} for lane, phases in self.phases_s.items()}}


class StepTimeline:
    """The current step's intervals; ``start`` and ``finish`` bracket a step."""

    def __init__(self, device: torch.device, stage: int = 0):
        self.cuda, self.stage = device.type == "cuda", stage
        self.start()

    def start(self) -> None:
        self.origin = time.perf_counter()
        self.intervals: list[Interval] = []
        self.device_marks: list[tuple[str, object, object]] = []
        self.stall_marks: list[tuple[object, object]] = []
        if self.cuda:
            self.reference = self.device_mark()

    def device_mark(self):
        """A point on the device's timeline: a recorded CUDA event, or the wall clock on the CPU."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def phase(self, name: str, device_work: bool = False):
        """Times the block as ``name`` on the host lane (and, with ``device_work``, on the device lane)."""
        start = time.perf_counter()
        if device_work:
            mark = self.device_mark()
        try:
            yield
        finally:
            if device_work:
                self.device_marks.append((name, mark, self.device_mark()))
            self.intervals.append(Interval(HOST, name, start - self.origin, time.perf_counter() - self.origin))

    def add_stall(self, start, end) -> None:
        """The compute stream blocked between two device marks (CUDA events, or wall clocks on the CPU)."""
        self.stall_marks.append((start, end))

    def add(self, lane: str, phase: str, start: float, end: float) -> None:
        """An interval measured elsewhere, in ``time.perf_counter`` seconds."""
        self.intervals.append(Interval(lane, phase, start - self.origin, end - self.origin))

    def device_intervals(self) -> list[Interval]:
        marks = [(DEVICE, name, a, b) for name, a, b in self.device_marks]
        marks += [(STALL, WEIGHT_WAIT, a, b) for a, b in self.stall_marks]
        if not self.cuda:
            return [Interval(lane, name, a - self.origin, b - self.origin) for lane, name, a, b in marks]
        if not marks:
            return []
        for _, _, _, end in marks:  # the reference event was recorded when the step began
            end.synchronize()  # all but the latest are done already: one wait per step
        return [Interval(lane, name, self.reference.elapsed_time(a) / 1e3, self.reference.elapsed_time(b) / 1e3)
                for lane, name, a, b in marks]

    def finish(self) -> StepBreakdown:
        """The step's breakdown; the next step starts afresh."""
        step_s = time.perf_counter() - self.origin
        intervals = self.intervals + self.device_intervals()
        phases: dict[str, dict[str, float]] = {}
        for interval in intervals:
            lane = phases.setdefault(interval.lane, {})
            lane[interval.phase] = lane.get(interval.phase, 0.0) + interval.end - interval.start
        busy = max(0.0, sum(phases.get(DEVICE, {}).values()) - sum(phases.get(STALL, {}).values()))
        breakdown = StepBreakdown(self.stage, step_s, phases, min(1.0, busy / step_s) if step_s > 0 else 0.0,
                                  intervals, self.origin)
        self.start()
        return breakdown
