"""Starting the ranks of a multi-process job, and stopping all of them when one fails.

``launch(fn, world_size, args)`` runs ``fn(ctx, *args)`` on every rank and returns ``{rank: result}``:

- started plainly (``python -m astrobio.train --pipeline-stages 2``), it spawns ``world_size`` child
  processes on this machine, hosts their rendezvous store itself and watches them;
- under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) it runs this one rank in the current
  process and returns ``{rank: result}`` for it alone; torchrun starts and watches the others.

Faults. Every rank runs a ``FaultGuard`` (astrobio.parallel.faults), handed to ``fn`` in its
``RankContext`` for the executor's waits. A rank that raises notes its error in the store and exits;
one that is killed is noted by the launcher, which sees its exit at once. The other ranks raise
``PeerFailure`` and exit; the launcher then raises ``LaunchError`` with the root cause first. The process
group's own timeout (``startup_timeout``) is only a backstop. Children die with the parent
(``PR_SET_PDEATHSIG`` on Linux), and Ctrl-C in the parent terminates them.

Every rank process also keeps the CPU memory it frees for reuse (``keep_freed_memory``): glibc's
defaults hand it back to the kernel, and faulting it in again page by page cost a pipeline stage up
to 10% of its compute.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from astrobio.parallel.faults import FaultGuard, PeerFailure, note_failure, pipeline_rank_name

STARTUP_TIMEOUT_S = 300.0  # ranks of a loaded machine may start many seconds apart
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """A spawned job failed; the message names the rank that failed first, then the others."""


@dataclass
class RankContext:
    """What ``fn`` gets: where it runs, and the guard to pass to the executor."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    guard: FaultGuard
    launched_by: str  # "spawn" or "torchrun"


def startup_timeout(timeout_s: float) -> timedelta:
    """Rendezvous and the process group's own timeout: long enough for slow starts. Faults after the
    start are the guard's job (``timeout_s``); this is only the backstop."""
    return timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S))


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS) and "ASTROBIO_SPAWNED" not in os.environ


def pick_backend(backend: str, local_world: int) -> str:
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend {backend!r} is not one of auto, gloo, nccl")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    return backend


def init_rank(store: dist.Store, rank: int, world_size: int, local_rank: int, backend: str,
              timeout_s: float, launched_by: str, name_rank: Callable[[int], str] = pipeline_rank_name) -> RankContext:
    """Joins the process group and starts the guard."""
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.PrefixStore("astrobio/pg", store), rank=rank,
                            world_size=world_size, timeout=startup_timeout(timeout_s))
    guard = FaultGuard(store, rank, world_size, timeout_s, name_rank)
    return RankContext(rank, world_size, local_rank, device, backend, guard, launched_by)


def close_rank(ctx: RankContext) -> None:
    ctx.guard.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "auto",
           timeout_s: float = 60.0, name_rank: Callable[[int], str] = pipeline_rank_name) -> dict[int, Any]:
    """Runs ``fn(ctx, *args)`` on ``world_size`` ranks; see the module docstring. ``name_rank(rank)``
    names a rank in the messages of a failure (a picklable function: the spawned ranks get it too)."""
    if under_torchrun():
        return run_under_torchrun(fn, world_size, args, backend, timeout_s, name_rank)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return Spawner(fn, world_size, args, pick_backend(backend, world_size), timeout_s, name_rank).run()


def run_under_torchrun(fn, world_size: int, args: tuple, backend: str, timeout_s: float,
                       name_rank: Callable[[int], str]) -> dict[int, Any]:
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world != world_size:
        raise ValueError(f"torchrun started {world} ranks (WORLD_SIZE) but the job needs {world_size}; "
                         f"start {world_size} in all (--nnodes x --nproc-per-node)")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # NOTE: torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE);
    # without an agent, rank 0 hosts it, as the env:// rendezvous does.
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, hosts,
                          timeout=startup_timeout(timeout_s))
    keep_freed_memory()
    ctx = init_rank(store, rank, world, local, pick_backend(backend, local_world), timeout_s, "torchrun", name_rank)
    try:
        return {rank: fn(ctx, *args)}
    except PeerFailure:
        raise
    except BaseException:
        ctx.guard.report(traceback.format_exc(limit=8))
        raise
    finally:
        close_rank(ctx)


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Linux (glibc): lets freed CPU tensors up to 32 MiB stay in the process for reuse, instead of
    going back to the kernel and being faulted in again page by page at their next allocation.

    NOTE: glibc's defaults return them: a stage's backward then spent ~10% of its time in page faults
    (ZB-H1's split backward, whose tensors outlive B, 5,000 faults per micro-batch on the tiny model),
    and the split cost 10% more than a whole backward; with this, both fault nothing and cost the same.
    Leaves the allocator alone when a MALLOC_* variable is set. Returns whether it changed anything."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in MALLOC_ENV):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, so no rank is left orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_main(fn, rank: int, world_size: int, port: int, backend: str, timeout_s: float, args: tuple,
               conn, parent_pid: int, name_rank: Callable[[int], str]) -> None:
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    os.environ["ASTROBIO_SPAWNED"] = "1"
    keep_freed_memory()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timeout=startup_timeout(timeout_s))
    ctx = init_rank(store, rank, world_size, rank, backend, timeout_s, "spawn", name_rank)
    try:
        # plain pickle copies tensors into the message; the shared-memory reducers torch installs for
        # multiprocessing would need this process alive until the parent has read them
        conn.send_bytes(pickle.dumps(("ok", fn(ctx, *args))))
    except PeerFailure as failure:
        conn.send_bytes(pickle.dumps(("peer", (failure.stage, str(failure)))))
        conn.close()
        os._exit(1)  # the peer is gone: tearing the process group down could wait on it
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then the rank exits
        # a collective called outside the guard's waits (e.g. all_gather_object) fails with the backend's
        # own error when a peer dies: name the peer that failed, as the guard's waits do
        cause = ctx.guard.cause_of(err) if isinstance(err, RuntimeError) else None
        if cause is not None:
            conn.send_bytes(pickle.dumps(("peer", (cause.stage, str(cause)))))
            conn.close()
            os._exit(1)
        text = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
        ctx.guard.report(f"{type(err).__name__}: {err}")
        conn.send_bytes(pickle.dumps(("error", (rank, text))))
        conn.close()
        os._exit(1)
    close_rank(ctx)
    # NOTE: the rank ends at the start of the interpreter's exit handlers, before the rest of its teardown.
    # Once in 60 runs of a two-stage job on two busy cores, a rank that had sent its result and closed its
    # process group printed "terminate called without an active exception" while exiting: a native thread
    # (torch's or gloo's) met the C++ static destructors. multiprocessing's own cleanup (e.g. the semaphores
    # of tqdm's lock) has run by then; ending here in child_main itself skipped it (the launcher then warned
    # of leaked semaphores). The launcher still reports a rank that ends badly after its result
    # (Spawner.on_exit).
    atexit.register(os._exit, 0)


class Spawner:
    """Starts the children, relays their results, and stops all of them when one fails."""

    def __init__(self, fn, world_size: int, args: tuple, backend: str, timeout_s: float,
                 name_rank: Callable[[int], str] = pipeline_rank_name):
        self.fn, self.world_size, self.args = fn, world_size, args
        self.backend, self.timeout_s, self.name_rank = backend, timeout_s, name_rank
        self.results: dict[int, Any] = {}
        self.reported: set[int] = set()  # ranks that sent an error before exiting
        self.failures: list[tuple[float, int, str, bool]] = []  # (time, failed rank, message, caused by a peer)
        self.hung = False

    def run(self) -> dict[int, Any]:
        self.store = dist.TCPStore("127.0.0.1", 0, self.world_size + 1, True, wait_for_workers=False,
                                   timeout=startup_timeout(self.timeout_s))
        context = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for rank in range(self.world_size):
                parent_end, child_end = context.Pipe(duplex=False)
                proc = context.Process(target=child_main, name=f"astrobio-rank{rank}", daemon=False,
                                       args=(self.fn, rank, self.world_size, self.store.port, self.backend,
                                             self.timeout_s, self.args, child_end, os.getpid(), self.name_rank))
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
            self.watch()
        finally:
            self.stop_all()
        if self.failures:
            raise LaunchError(self.describe_failures())
        return self.results

    def watch(self) -> None:
        deadline = None
        live = dict(enumerate(self.procs))
        while live:
            multiprocessing.connection.wait([self.conns[r] for r in live if not self.conns[r].closed]
                                            + [p.sentinel for p in live.values()], timeout=0.2)
            for rank in list(live):
                self.drain(rank)
                if not self.procs[rank].is_alive():
                    self.drain(rank)
                    self.on_exit(rank)
                    del live[rank]
            if self.failures and deadline is None:
                deadline = time.monotonic() + self.timeout_s
            if deadline is not None and time.monotonic() > deadline:
                for rank in live:
                    self.failures.append((time.monotonic(), rank, f"{self.name_rank(rank)} did not stop "
                                          f"within {self.timeout_s:g} s of the failure; killed", True))
                self.hung = True
                return

    def drain(self, rank: int) -> None:
        """Reads what the child has sent; a closed pipe (EOF) means it will send nothing more."""
        conn = self.conns[rank]
        while not conn.closed and conn.poll():
            try:
                status, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                conn.close()
                return
            if status == "ok":
                self.results[rank] = payload
            else:
                failed_rank, message = payload
                self.failures.append((time.monotonic(), failed_rank, message, status == "peer"))
                self.reported.add(rank)

    def on_exit(self, rank: int) -> None:
        code = self.procs[rank].exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if rank in self.results and code != 0:
            # its work is done and its result here (e.g. the checkpoint is written): say so, do not fail the job
            print(f"warning: {self.name_rank(rank)} sent its result but then exited with {how} while shutting "
                  f"down; the job's results are complete", file=sys.stderr)
        if rank in self.results or rank in self.reported:
            return
        self.failures.append((time.monotonic(), rank, f"{self.name_rank(rank)} died with {how}", False))
        note_failure(self.store, rank, f"died with {how}")

    def stop_all(self) -> None:
        """Terminates, then kills, every child still running; no process outlives the launcher."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        end = time.monotonic() + (0 if self.hung else 3)  # a hung (e.g. stopped) rank may ignore SIGTERM
        for proc in self.procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

    def describe_failures(self) -> str:
        ordered = sorted(self.failures, key=lambda f: (f[3], f[0]))  # root causes first, then by time
        _, rank, message, _ = ordered[0]
        lines = [f"pipeline job failed at {self.name_rank(rank)}: {message.strip()}"]
        lines += [f"  then: {m.strip().splitlines()[0]}" for _, _, m, _ in ordered[1:]]
        return "\n".join(lines)
