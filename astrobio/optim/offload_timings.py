"""Where the offload engine's time went in one optimizer step (``OffloadEngine.last_timings``).

A record covers one step: from ``begin_step`` to the next ``begin_step`` (so the waits of the next
step's forward for this step's new weights fall into the next record, the step whose wall time they
add to). Fields are seconds unless named otherwise; two kinds:

Main thread (each adds to the step's wall time; the training loop's own clock includes them):

- ``grad_hooks_s``: inside the gradient hooks: enqueueing copies or device-side accumulation, and
  waiting for a free staging buffer.
- ``staging_wait_s``: the part of ``grad_hooks_s`` blocked on a free host staging buffer (host
  accumulation only: the backward stalls while the workers catch up).
- ``norm_wait_s``: ``end_step`` waiting for the accumulators and the global gradient norm (including
  ``sum_across``, the norm's all-reduce over pipeline ranks; with device accumulation on a GPU it also
  waits for the last backward to finish on the device, since the norms are computed there).
- ``weight_wait_s``: forward pre-hooks and ``synchronize`` waiting for new weights: the optimizer time
  the step could not hide.
- ``stream_stall_s``: the device's compute stream blocked on the engine's events (the uploads of new
  weights the forward pre-hooks and ``synchronize`` wait for, and at ``begin_step`` the copies out of
  device accumulators): on a GPU the elapsed time of CUDA events recorded on the compute stream just
  before and after each ``wait_event``, read once per step when the record closes; on the CPU, where
  there are no streams, the host's wait for the weights (``weight_wait_s``). Device time that is no
  work: a step breakdown subtracts it from the device's busy time.

Worker threads (they run beside the main thread; sums over buckets and lanes; work is counted in the
record open when it finishes, so a step's optimizer work that overlaps the next step's forward lands in
the next record):

- ``transfer_wait_s``: waiting for device-to-host gradient copies to land.
- ``host_accumulate_s`` / ``host_accumulate_bytes``: adding micro-batch gradients into the host
  accumulators, and the bytes that moved (staged gradient read + accumulator read and write);
  ``host_accumulate_gbps`` is their ratio.
- ``norm_s``: squared norms of the host accumulators.
- ``optimizer_s``: the fused 8-bit AdamW over the host buffers.
- ``upload_s``: copying new weights to the device (on a GPU only the enqueueing; the copy runs on a
  side stream).
- ``collective_s``: with replicas, the replicas thread's reduce-scatters of the summed gradients (with
  their squared norms) and all-gathers of the new weights (with their uploads), waits for peers included.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

import torch


@dataclass
class OffloadTimings:
    location: str = "host"  # where the gradients were accumulated: "device" or "host"
    grad_hooks_s: float = 0.0
    staging_wait_s: float = 0.0
    norm_wait_s: float = 0.0
    weight_wait_s: float = 0.0
    stream_stall_s: float = 0.0
    transfer_wait_s: float = 0.0
    host_accumulate_s: float = 0.0
    host_accumulate_bytes: int = 0
    norm_s: float = 0.0
    optimizer_s: float = 0.0
    upload_s: float = 0.0
    collective_s: float = 0.0

    @property
    def host_accumulate_gbps(self) -> float | None:
        """Host accumulation throughput in GB/s (None when nothing was accumulated on the host)."""
        if self.host_accumulate_s <= 0:
            return None
        return self.host_accumulate_bytes / self.host_accumulate_s / 1e9

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["host_accumulate_gbps"] = self.host_accumulate_gbps
        return out


class TimingsRecorder:
    """The open step's ``OffloadTimings``, added to from the main thread and the workers under a lock."""

    def __init__(self, location: str, cuda: bool = False):
        self.location, self.cuda = location, cuda
        self.current = OffloadTimings(location)
        self._lock = threading.Lock()
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def add_stall(self, marks: tuple[torch.cuda.Event, torch.cuda.Event] | None) -> None:
        """Main thread: CUDA events around one wait of the compute stream, read when the record closes."""
        if marks is not None:
            self._stalls.append(marks)

    def add(self, name: str, amount: float) -> None:
        with self._lock:
            setattr(self.current, name, getattr(self.current, name) + amount)

    def roll(self) -> OffloadTimings:
        """Close the current record and open a new one; returns the closed record. Reads the stall
        events once: by now the step's forwards and backwards have run (``end_step`` waited for the
        accumulated gradients that follow them), so waiting for the last one costs nothing."""
        stalls, self._stalls = self._stalls, []
        if stalls:
            stalls[-1][1].synchronize()
        with self._lock:
            closed, self.current = self.current, OffloadTimings(self.location)
        closed.stream_stall_s = (sum(a.elapsed_time(b) for a, b in stalls) / 1e3 if self.cuda
                                 else closed.weight_wait_s)
        return closed
