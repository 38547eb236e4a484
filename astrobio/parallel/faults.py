"""Waiting on communication that may never complete, and stopping every rank when one fails.

Every rank of a pipeline job runs a ``FaultGuard``: a thread that beats a heartbeat counter in the job's
store and watches the other ranks' counters and failure notes. A rank that raises writes its error to
the store (``note_failure``); one that is killed stops beating (and, when the launcher spawned it, the
launcher notices the exit at once and writes the note for it). The others notice within a fraction of
a second (a note) or ``timeout_s`` (a silent peer) and raise ``PeerFailure`` naming the failed stage.

Communication waits go through ``FaultGuard.wait``, which polls instead of blocking, so a rank stuck in
a receive from a dead peer still stops. A ``WorkWaiter`` is what makes that possible: it blocks on
torch.distributed Work objects on a background thread, and the caller waits on an Event it can time.
astrobio.parallel.launch starts the guards; astrobio.parallel.transport waits through them.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch.distributed as dist

PREFIX = "astrobio/guard"  # the store keys of heartbeats and failure notes


def pipeline_rank_name(rank: int) -> str:
    """How a message names a rank of a job whose ranks are its pipeline's stages."""
    return f"stage {rank} (rank {rank})"


def failure_key(rank: int) -> str:
    return f"{PREFIX}/failed/{rank}"


def note_failure(store: dist.Store, rank: int, message: str) -> None:
    """Tells the other ranks that ``rank`` failed (best effort: the store may be gone)."""
    try:
        store.set(failure_key(rank), message)
    except RuntimeError:
        pass


class PeerFailure(RuntimeError):
    """Another rank failed; this one stopped because of it. ``stage`` is the failed one's rank (its stage
    in a job of one pipeline)."""

    def __init__(self, message: str, stage: int):
        super().__init__(message)
        self.stage = stage


class Pending:
    """One submitted Work (or the function that posts it): ``done`` is set when its wait returned (and
    its ``then`` ran); ``result()`` re-raises the error of any of them."""

    __slots__ = ("work", "start", "then", "done", "error")

    def __init__(self, work: dist.Work | None, start: Callable[[], dist.Work] | None = None,
                 then: Callable[[], None] | None = None):
        self.work, self.start, self.then = work, start, then
        self.done, self.error = threading.Event(), None

    def result(self) -> None:
        if self.error is not None:
            raise self.error


class WorkWaiter:
    """Blocks on torch.distributed Work objects on a background thread, in the order submitted.

    NOTE: gloo's point-to-point Work never reports ``is_completed()`` and a ``wait(timeout)`` that
    times out closes the connection, so neither polling nor timed waits can watch for faults; a
    blocking wait on another thread, with the caller waiting on an Event, can."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, work: dist.Work, then: Callable[[], None] | None = None) -> Pending:
        """Queues ``work``; ``then`` runs on this waiter's thread as soon as it is done (e.g. posting the
        receive that a header announces, without waiting for the caller to look)."""
        pending = Pending(work, then=then)
        self._queue.put(pending)
        return pending

    def post(self, start: Callable[[], dist.Work]) -> Pending:
        """Queues a communication that ``start()`` posts on this waiter's thread, then waits for it.
        NOTE: a gloo send whose receive is already posted copies its data into the socket inside the
        call (milliseconds for a megabyte on a busy machine); posted here, that stays off the caller."""
        pending = Pending(None, start=start)
        self._queue.put(pending)
        return pending

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (pending := self._queue.get()) is not None:
            try:
                if pending.start is not None:
                    pending.work = pending.start()
                pending.work.wait()
                if pending.then is not None:
                    pending.then()
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on it
                pending.error = err
            pending.done.set()


class FaultGuard:
    """Heartbeats and failure notes for one rank, through the job's store."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float = 60.0,
                 name_rank: Callable[[int], str] = pipeline_rank_name):
        if timeout_s <= 0:
            raise ValueError(f"fault timeout must be positive seconds, got {timeout_s}")
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.name_rank = name_rank  # e.g. "rank 3 (replica 1, stage 1)"
        self.interval_s = min(0.5, timeout_s / 10)
        self.failure: PeerFailure | None = None
        self._stop = threading.Event()
        self._waiter = WorkWaiter(f"fault-guard-wait-{rank}")
        self._thread = threading.Thread(target=self._watch, name=f"fault-guard-{rank}", daemon=True)
        self._thread.start()

    def report(self, message: str) -> None:
        """Tells the other ranks this one failed (best effort: the store may be gone)."""
        note_failure(self.store, self.rank, message)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait(self, work: dist.Work) -> None:
        """Waits for a communication, raising PeerFailure as soon as another rank fails."""
        self.check()
        self.wait_pending(self._waiter.submit(work))

    def wait_pending(self, pending: Pending) -> None:
        while not pending.done.wait(self.interval_s):
            self.check()
        if pending.error is not None:
            # a peer's death usually surfaces first as a connection error here; name the peer if it can be
            raise self.cause_of(pending.error) or pending.error from pending.error

    def cause_of(self, err: BaseException) -> PeerFailure | None:
        """The failure note of another rank, waiting briefly for it (a launcher writes it for a killed
        rank a moment after its connections break)."""
        deadline = time.monotonic() + min(self.timeout_s, 5.0)
        while True:
            for r in range(self.world_size):
                key = failure_key(r)
                if r != self.rank and self.store.check([key]):
                    return PeerFailure(f"{self.name_rank(r)} failed: {self.store.get(key).decode()}", r)
            if self.failure is not None or time.monotonic() > deadline:
                return self.failure
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._waiter.close()
        self._thread.join(timeout=2 * self.interval_s + 1)

    def _watch(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in peers}
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"{PREFIX}/beat/{self.rank}", 1)
                for r in peers:
                    self._check_peer(r, seen)
            except PeerFailure as failure:
                self.failure = failure
                return
            except RuntimeError as err:  # the store itself is gone: whoever hosted it died
                self.failure = PeerFailure(f"lost the job's store ({err}); another rank or the launcher died", -1)
                return

    def _check_peer(self, r: int, seen: dict) -> None:
        key = failure_key(r)
        if self.store.check([key]):
            raise PeerFailure(f"{self.name_rank(r)} failed: {self.store.get(key).decode()}", r)
        beats = self.store.add(f"{PREFIX}/beat/{r}", 0)
        last, since = seen[r]
        now = time.monotonic()
        if beats != last:
            seen[r] = (beats, now)
        elif beats > 0 and now - since > self.timeout_s:
            raise PeerFailure(f"{self.name_rank(r)} sent no heartbeat for {now - since:.0f} s "
                              f"(fault timeout {self.timeout_s:g} s); it hung or was killed", r)
