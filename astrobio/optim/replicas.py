"""The offload engine's data-parallel side: how a bucket is cut between the replicas of a pipeline stage,
and the collectives over them (docs/MEMORY.md, "Sharded optimizer state").

With K replicas, a bucket's flat layout places every parameter at a multiple of the 8-bit block size
(``BLOCK_SIZE`` = 256 elements) and pads the whole to a multiple of K x 256, so that it splits into K
equal contiguous shards whose edges fall on block edges of every parameter: a rank owns whole blocks
(their absmax is the unsharded one) of a slice of each parameter its shard touches, and the collectives
run on the flat buffers themselves (``reduce_scatter`` of the summed gradients, ``all_gather`` of the new
weights), with no copies into padded buffers. With one replica the layout is the engine's plain one:
parameters back to back, one shard of everything.

``Replicas`` runs every collective of the group on one thread, in the order the engine's main thread
submits them, so that every rank issues them in the same order whatever its worker threads do. With a
CUDA engine over an NCCL group the collectives run on device buffers on a stream of their own; otherwise
(gloo) on host buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from astrobio.spec.adamw8bit import BLOCK_SIZE

# NOTE: torch renamed the flat collectives (reduce_scatter_tensor -> reduce_scatter_single, the same for
# all_gather); take the new name where it exists
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Piece:
    """One parameter in a bucket's flat layout: ``offset`` (flat position of its element 0), and the
    elements ``lo``..``hi`` of it that this rank owns, at ``local`` in the rank's shard (lo == hi: none)."""

    offset: int
    lo: int
    hi: int
    local: int

    @property
    def count(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class BucketLayout:
    """A bucket cut into ``size`` shards: ``numel`` flat elements (padding included), each shard
    ``shard_numel`` long, this rank's starting at ``shard_start``; ``pieces`` per parameter; ``gaps``, the
    (start, stop) flat ranges no parameter covers (kept zero in every gradient buffer)."""

    numel: int
    shard_numel: int
    shard_start: int
    pieces: tuple[Piece, ...]
    gaps: tuple[tuple[int, int], ...]


def bucket_layout(numels: list[int], size: int = 1, rank: int = 0) -> BucketLayout:
    """The flat layout of a bucket holding parameters of ``numels`` elements, cut into ``size`` shards,
    seen from ``rank``."""
    align = BLOCK_SIZE if size > 1 else 1
    offsets, end, gaps = [], 0, []
    for n in numels:
        start = -(-end // align) * align
        if start > end:
            gaps.append((end, start))
        offsets.append(start)
        end = start + n
    numel = -(-end // (align * size)) * align * size
    if numel > end:
        gaps.append((end, numel))
    shard = numel // size
    first, last = rank * shard, (rank + 1) * shard
    pieces = []
    for offset, n in zip(offsets, numels):
        lo, hi = max(offset, first) - offset, min(offset + n, last) - offset
        if hi <= lo:
            pieces.append(Piece(offset, 0, 0, 0))
        else:
            pieces.append(Piece(offset, lo, hi, offset + lo - first))
    return BucketLayout(numel, shard, first, tuple(pieces), tuple(gaps))


class Replicas:
    """The ranks holding the same pipeline stage (``group``), as the offload engine uses them; every
    collective goes through ``submit`` (one thread, in submission order)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.on_device = device.type == "cuda" and "nccl" in backend
        if not self.on_device and "gloo" not in backend:
            raise ValueError(f"the replicas group has backend {backend!r}, which cannot reduce host tensors; an "
                             f"engine on {device} needs a gloo group (or NCCL with the engine on a CUDA device)")
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.on_device else None
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="astrobio-replicas")
        self.failed: BaseException | None = None  # the first task that raised (see submit)

    @classmethod
    def of(cls, group: dist.ProcessGroup, device: torch.device) -> "Replicas | None":
        """The replicas of ``group``, or None when it has one rank (nothing to shard)."""
        return cls(group, device) if dist.get_world_size(group) > 1 else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Runs ``fn(*args)`` on the replicas thread, after every task submitted before it. Once a task has
        failed, the later ones raise without running: a rank that skipped one collective would pair its
        next one with its peers' previous (sizes differ: garbage or a hang); it fails instead, and its
        error reaches the launcher, which stops the peers."""
        return self._lane.submit(self._run, fn, *args)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.failed is not None:
            raise RuntimeError(f"an earlier collective of the replicas failed ({self.failed!r}); this one was "
                               f"not issued") from self.failed
        try:
            return fn(*args)
        except BaseException as error:
            self.failed = error
            raise

    def close(self) -> None:
        # after a failure a peer may never answer: do not wait for a task stuck in a collective
        broken = self.failed is not None
        self._lane.shutdown(wait=not broken, cancel_futures=broken)

    def sum(self, value: float) -> float:
        """Replicas thread: the sum of ``value`` over the replicas (fp64), the same on every rank."""
        total = torch.tensor([value], dtype=torch.float64, device=self.device if self.on_device else "cpu")
        dist.all_reduce(total, group=self.group)
        return total.item()

    def reduce_scatter(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        """Replicas thread, gloo: ``shard`` = this rank's shard of the sum of every replica's ``full``;
        ``shard`` may be that shard's own place in ``full`` (gloo reduces a copy of the input: NOTE, an
        implementation property, which tests/test_offload_sharded.py's bit-exact comparisons check)."""
        _REDUCE_SCATTER(shard, full, group=self.group)

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        """Replicas thread, gloo: every replica's ``shard`` into ``full``, in rank order."""
        _ALL_GATHER(full, shard, group=self.group)

    def reduce_scatter_on_device(self, full: torch.Tensor, shard: torch.Tensor, ready: Any,
                                 squared_norm: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Replicas thread, NCCL: once the device has passed ``ready`` (an event of the compute stream, or
        None), reduce-scatter ``full`` (the device accumulator, or a pinned host accumulator copied over
        first) on this class's stream, copy this rank's shard into the pinned host ``shard`` and return its
        squared norm (``squared_norm``: a 0-d tensor on the device); blocks until all of it has run, so
        the host shard is final and ``full`` free."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            source = full if full.device.type == "cuda" else full.to(self.device, non_blocking=True)
            reduced = torch.empty(shard.numel(), dtype=shard.dtype, device=self.device)
            _REDUCE_SCATTER(reduced, source, group=self.group)  # the stream waits for NCCL's
            square = squared_norm(reduced)
            shard.copy_(reduced, non_blocking=True)
            self.stream.synchronize()
        return float(square)

    def all_gather_on_device(self, shard: torch.Tensor, numel: int,
                             targets: Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]],
                             after: Any) -> Any:
        """Replicas thread, NCCL: copy the pinned host ``shard`` (new weights in the parameters' dtype) into
        its place of a device buffer of ``numel`` elements, all-gather in place, then, once the device has
        passed ``after``, copy each (parameter, view of the buffer) of ``targets(buffer)``; returns the
        event after the copies (the compute stream waits for it, the host does not)."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            gathered = torch.empty(numel, dtype=shard.dtype, device=self.device)
            own = gathered[self.rank * shard.numel():(self.rank + 1) * shard.numel()]
            own.copy_(shard, non_blocking=True)
            _ALL_GATHER(gathered, own, group=self.group)  # in place: NCCL reads own where it writes it
            if after is not None:
                self.stream.wait_event(after)
            for param, view in targets(gathered):
                param.copy_(view)
            return self.stream.record_event()
