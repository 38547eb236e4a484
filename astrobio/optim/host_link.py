"""The offload engine's copies between the device and the host, and its pool of host staging buffers.

On a CUDA device every copy runs on a side stream (one each way) and is tracked by an event; host buffers
are pinned so that the copies are asynchronous. On the CPU the "device" is the host: copies are plain
copies, events are None and nothing is pinned, so the engine runs the same code path in CI.
"""

from __future__ import annotations

import threading

import torch


class HostLink:
    """Copies between the device and the host. On a CUDA device: a side stream each way and events; on
    the CPU the copies are plain host copies and every event is None."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Main thread: enqueue ``dst <- src`` after the work enqueued so far; ``src`` may be freed right after."""
        if not self.cuda:
            dst.copy_(src)
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.d2h)  # the allocator keeps src's memory until the copy has run

    def host_copies_done(self) -> torch.cuda.Event | None:
        return self.d2h.record_event() if self.cuda else None

    def compute_done(self) -> torch.cuda.Event | None:
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    @staticmethod
    def wait_host(event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()

    def to_device(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                  after: torch.cuda.Event | None) -> torch.cuda.Event | None:
        """Worker thread: copy each (device dst, host src) once the device has passed ``after``."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        with torch.cuda.stream(self.h2d):
            if after is not None:
                self.h2d.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            return self.h2d.record_event()

    def finish_uploads(self) -> None:
        """Host waits until every host-to-device copy has run (before host buffers are rewritten)."""
        if self.cuda:
            self.h2d.synchronize()

    def wait_device(self, event: torch.cuda.Event | None) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
        """Order the device's current stream after ``event`` (the host does not wait). Returns two timing
        events recorded on that stream just before and just after the wait: their elapsed time is how
        long the stream stalled on ``event`` (None when there was no event)."""
        if event is None:
            return None
        stream = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        return before, after


class StagingPool:
    """Host staging buffers for gradients in flight, shared by all buckets, allocated up front (pinning
    memory synchronizes the device, so it must not happen inside a backward pass). A buffer goes out to an
    open fill (main thread) and comes back when a worker has accumulated it. When every buffer sits in an
    open fill, none can come back, so the pool grows instead of waiting forever."""

    def __init__(self, nbytes: int, count: int, pin: bool):
        self.nbytes, self.pin = nbytes, pin
        self.allocated = count  # buffers made so far
        self._free = [self._new() for _ in range(count)]
        self._in_workers = 0
        self._cond = threading.Condition()

    def _new(self) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def acquire(self) -> torch.Tensor:
        with self._cond:
            while not self._free and self._in_workers > 0:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return self._new()

    def handed_to_worker(self) -> None:
        with self._cond:
            self._in_workers += 1

    def release(self, buffer: torch.Tensor) -> None:
        """A worker is done with ``buffer``."""
        with self._cond:
            self._free.append(buffer)
            self._in_workers -= 1
            self._cond.notify()

    def put_back(self, buffer: torch.Tensor) -> None:
        """The main thread returns a buffer it never handed to a worker."""
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()
