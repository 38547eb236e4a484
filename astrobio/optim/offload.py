"""Asynchronous CPU offload of the 8-bit AdamW (docs/MEMORY.md: what it holds; docs/ARCHITECTURE.md).

Master weights (fp32, or bf16 with stochastic rounding), 8-bit moments and the host gradient
accumulators live in host memory; the device keeps the weights the model computes with and, with
``grad_accum_location="device"``, the stage's gradient accumulators. Each optimizer step:

1. Gradients are summed over the step's micro-batches in one of two places:

   - ``"host"``: while backward runs, a post-accumulate-grad hook copies each gradient to the host (on a
     CUDA device: into a pinned staging buffer on a side stream, with an event) and frees the device
     gradient. When a bucket's gradients of one micro-batch are all there, a CPU worker thread adds them
     into the bucket's host accumulator (torch ops: the GIL is released and the add runs on the
     intra-op threads); after the last micro-batch it also computes the bucket's squared norm (fp64).
     Every micro-batch's gradients cross the link.
   - ``"device"``: the hook adds each gradient into a flat device accumulator of the bucket (in the
     accumulation dtype) and frees it. When a bucket has its last micro-batch's gradients, its squared
     norm is computed on the device and the accumulator is copied to the host once (side stream,
     event), while the backward goes on. The gradients cross the link once per optimizer step; the
     device holds one accumulator per parameter (the planner's ``auto``:
     astrobio.memory.accumulation).

   Both give the same sums bit for bit (the same adds in the same order, in the same dtype).
2. ``end_step`` waits for the accumulators' squared norms, forms the global gradient norm (exact: from
   every bucket, before any bucket steps), skips the whole step when it is not finite, else derives the
   clipping coefficient and hands every bucket to the workers, in forward order. A worker waits for the
   bucket's host accumulator, runs the fused 8-bit AdamW on it (``astrobio._C.adamw8bit_step_nogil``,
   which releases the GIL), writing the new weights in the device's dtype into a staging buffer in the
   same pass, then copies them to the device parameters (side stream + event on a CUDA device).
3. With ``module`` given, forward pre-hooks make each submodule wait only for the buckets holding its own
   parameters, so the host step overlaps the next forward; without it ``end_step`` waits for every bucket.

On a CPU-only machine the "device" is the CPU and the same code path runs: copies are host copies, streams
and events are no-ops, buffers are not pinned. ``last_timings`` (astrobio.optim.offload_timings) says
where the time of the last finished step went.

Usage (one engine per pipeline stage, over that stage's parameters)::

    engine = OffloadEngine(model.named_parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                           weight_decay=0.1, max_grad_norm=1.0, accum_dtype="fp32",
                           master_weights="fp32", bucket_bytes=32 << 20, module=model,
                           grad_accum_location="device")
    for step in range(steps):
        engine.begin_step(num_micro_batches)
        for micro_batch in micro_batches:          # any schedule: GPipe, 1F1B, ZB-H1 ...
            loss = model(micro_batch) / num_micro_batches
            loss.backward()                        # the hooks copy and accumulate; p.grad stays None
        stats = engine.end_step(lr=scheduler_lr)   # StepStats(grad_norm, skipped, clip_coef, lr)
        timings = engine.last_timings              # OffloadTimings of the step before this one
    engine.synchronize()                           # before reading parameters outside a hooked forward
    checkpoint["optimizer"] = engine.state_dict()  # later: engine.load_state_dict(checkpoint["optimizer"])
    engine.close()

Contract:

- Gradients are summed over micro-batches (scale the loss, or pass ``end_step(grad_scale=1/N)``, which the
  kernel applies and which the reported norm and the clipping include). ``grad_norm`` is the L2 norm
  before clipping, as ``torch.nn.utils.clip_grad_norm_`` returns; clipping multiplies by
  ``min(1, max_grad_norm / (grad_norm + 1e-6))``. A non-finite norm (any NaN or Inf gradient) skips the
  step: weights and moments stay as they were and ``skipped_steps`` grows.
- A parameter that receives no gradient in a micro-batch contributes zeros. More micro-batches than
  ``begin_step`` announced is an error.
- A module that reads another module's parameters in its forward (tied weights) must call
  ``engine.synchronize()`` first, or be built without ``module`` (``end_step`` then waits).
- Per parameter ``i`` (position in ``params``), the state is AdamW8bit's (``step``, ``exp_avg``,
  ``exp_avg_sq``, ``absmax1``, ``absmax2``) plus ``master``; stochastic rounding uses
  ``step_seed(seed, step, index_offset + i)``, so N steps here equal N steps of
  ``AdamW8bit(params, seed=seed)`` on the same (accumulated, clipped) gradients, bit for bit.
- Pipeline stages: one engine per rank over its stage's parameters, with ``index_offset`` = the number of
  parameters of the stages before it (the same rounding bits as one engine over the whole model), and
  ``end_step(sum_across=...)`` summing the squared norms over the ranks so that clipping and skipping are
  global: e.g. a function that all-reduces (SUM) ``torch.tensor([sq], dtype=torch.float64)`` over the
  pipeline ranks and returns its ``.item()``.
- ``state_dict()`` may be taken between steps or between micro-batches (it then also holds the
  accumulators and the micro-batch count; after loading it, continue the step's remaining micro-batches
  and call ``end_step`` without ``begin_step``). Moment and master tensors are live references (a save
  of a 13B state must not copy it first): save before the next ``end_step``. ``load_state_dict`` validates
  everything first, copies what it keeps (never holding the caller's tensors, e.g. views of a mapped
  checkpoint file) and also writes the master weights to the device parameters. The accumulation state
  does not depend on the location: a state saved between micro-batches with one location loads into an
  engine with the other.
- ``worker_delay``: a test hook, a callable run at the start of every worker task (e.g. a random sleep)
  to expose ordering bugs.

Data-parallel replicas (``replicas=group``: the ranks holding the same stage's parameters, K of them;
ZeRO-1/2 style, docs/MEMORY.md "Sharded optimizer state"):

- Each rank holds the master weights, moments and upload copy of 1/K of every bucket: a contiguous shard
  of the bucket's flat layout, in which every parameter starts on a block of 256 elements and the bucket
  is padded to K blocks (astrobio.optim.replicas.bucket_layout), so a rank owns whole blocks of a slice
  ``shard_ranges()[i] = (lo, hi)`` of each parameter its shard touches, with the unsharded blocks'
  absmax. The gradient accumulators stay whole (each replica sums its own micro-batches as above).
- ``end_step``: every bucket's sums are reduce-scattered (SUM) across the replicas, in bucket order, on
  one "replicas" thread (every collective on ``group`` runs there, in the order the main thread submits
  them, so all ranks issue them alike: the group must serve this engine alone, e.g. a
  ``dist.new_group`` of its own). The norm is that of the replicas' mean: each rank's squared norm of
  its reduced shards, all-reduced over the group, times (grad_scale / K)²; ``sum_across`` then sums over
  the pipeline stages as before, so clipping and the non-finite skip stay global (a NaN in one replica
  skips the step on all). The 1/K of the mean goes into the kernel's ``grad_scale`` (so K = 2 replicas
  fed the same gradients train bit for bit as one engine: 2g x s/2 == g x s). Each rank steps only its
  slices (the same fused kernel, a slice of a parameter with its blocks' absmax), then the new weights
  (in the parameters' dtype) are all-gathered into every replica's device parameters, bucket by bucket
  in forward order; forward pre-hooks wait for those gathers.
- gloo group: the collectives run on host buffers (the host accumulators; the gathers land in two host
  buffers of the largest bucket, then upload as without replicas), for an engine on the CPU or on a GPU.
  NCCL group with the engine on a CUDA device: on device buffers, on a stream of its own: the device
  accumulator (device accumulation) or the host accumulator copied over (host accumulation) is
  reduce-scattered there and only this rank's shard crosses to the host; the shard's new weights cross
  to the device and are all-gathered in place into a device buffer of the bucket, then copied into the
  parameters.
- Stochastic rounding of bf16-sr masters: the kernel draws bits by element index within the tensor it is
  given, here a slice starting at ``lo``; a slice with ``lo`` > 0 rounds with other bits than the
  unsharded engine (each weight within one bf16 step of it). fp32 masters are exact.
- Every replica must build its engine from the same initial weights, call ``begin_step``/``end_step``
  alike, and call ``load_state_dict`` together (it gathers). ``state_dict()`` holds this rank's slices
  (with their ``range``) and is taken between steps only; astrobio.train.checkpoint writes one part per
  rank and reshards on load (``load_offload_state``) for any replica or stage count.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from astrobio import ops
from astrobio.spec import adamw8bit as reference
from astrobio.optim.adamw8bit import check_hyperparameters, check_parameter, checked_state, new_state, step_seed
from astrobio.optim.host_link import HostLink, StagingPool
from astrobio.optim.offload_timings import OffloadTimings, TimingsRecorder
from astrobio.optim.pinned import PinnedArena
from astrobio.optim.replicas import Replicas, bucket_layout

ACCUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASTER_WEIGHTS = {"fp32": torch.float32, "bf16-sr": torch.bfloat16}
GRAD_ACCUM_LOCATIONS = ("device", "host")
# elements per fp64 chunk of the norm (bounds its temporary); larger on a GPU, where each chunk costs
# kernel launches on the thread that runs the backward
_NORM_CHUNK = 1 << 20
_DEVICE_NORM_CHUNK = 1 << 24
# elements per host add: a bf16 gradient added into an fp32 accumulator is converted into a temporary
# first (torch's CPU kernels convert mixed-dtype inputs); in chunks the temporary stays in the CPU's cache
_ADD_CHUNK = 1 << 21


@dataclass
class StepStats:
    """What end_step did: the global gradient norm before clipping, whether the step was skipped, the
    clipping coefficient applied (1.0 when none) and the learning rate used."""

    grad_norm: float
    skipped: bool
    clip_coef: float
    lr: float


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``x`` in fp64 (chunked, summed in order), a 0-d tensor on ``x``'s device, so that
    a device computes it without waiting for the host; NaN or Inf when any element is not finite."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    size = max(1, min(flat.numel(), _NORM_CHUNK if x.device.type == "cpu" else _DEVICE_NORM_CHUNK))
    scratch = torch.empty(size, dtype=torch.float64, device=x.device)  # one buffer: no fresh pages per chunk
    for start in range(0, flat.numel(), size):
        chunk = scratch[:min(size, flat.numel() - start)]
        chunk.copy_(flat[start:start + size])
        total += torch.dot(chunk, chunk)
    return total


@dataclass
class _Slot:
    """One parameter: where it lies in its bucket's flat buffers, and its optimizer state."""

    param: torch.nn.Parameter
    index: int  # position in the params given to the engine
    name: str
    bucket: int = 0
    offset: int = 0  # of its element 0 in the bucket's flat gradient buffers
    position: int = 0  # within its bucket
    lo: int = 0  # the elements lo..hi of it this rank steps (all of them without replicas) ...
    hi: int = 0
    local: int = 0  # ... at this offset of the bucket's shard buffers (master, reduced gradients, upload)
    state: dict[str, Any] = field(default_factory=dict)  # of those elements
    arrivals: int = 0  # device accumulation: micro-batches of this step whose gradient arrived

    @property
    def count(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        return self.count == self.param.numel()


@dataclass
class _Fill:
    """The gradients of one micro-batch of one bucket, arriving in a staging buffer."""

    buffer: torch.Tensor
    grads: torch.Tensor  # the buffer viewed as the bucket's flat gradient
    arrived: set[int] = field(default_factory=set)


def add_chunked(accum: torch.Tensor, grads: torch.Tensor, first: bool) -> None:
    """``accum = grads`` (first) or ``accum += grads``, in chunks of _ADD_CHUNK elements; each chunk runs on
    torch's intra-op threads with the GIL released."""
    for start in range(0, accum.numel(), _ADD_CHUNK):
        part, source = accum[start:start + _ADD_CHUNK], grads[start:start + _ADD_CHUNK]
        if first:
            part.copy_(source)
        else:
            part.add_(source)


class _Bucket:
    """Parameters of one dtype, consecutive in backward order, with flat host buffers. The gradient
    buffers span the whole bucket; the master, the reduced gradients and the upload copy span this rank's
    shard of it (astrobio.optim.replicas; without replicas the shard is the whole bucket)."""

    def __init__(self, index: int, slots: list[_Slot], master_dtype: torch.dtype, accum_dtype: torch.dtype,
                 host: Callable[[int, torch.dtype], torch.Tensor], on_device: bool, replicas: Replicas | None):
        self.index, self.slots = index, slots
        layout = self.layout(slots, replicas)
        for position, (slot, piece) in enumerate(zip(slots, layout.pieces)):
            slot.offset, slot.position = piece.offset, position
            slot.lo, slot.hi, slot.local = piece.lo, piece.hi, piece.local
        self.numel, self.shard_numel, self.gaps = layout.numel, layout.shard_numel, layout.gaps
        self.grad_dtype = slots[0].param.dtype
        buffers = self.host_buffers(layout, self.grad_dtype, master_dtype, accum_dtype, on_device, replicas)
        self.master = host(*buffers["master"])
        # the host's summed gradients: all of the bucket's, except where NCCL reduces the device's sums on the
        # device and only this rank's shard comes over. ``reduced``: the gradients the step reads, this
        # rank's shard of the replicas' sum, reduce-scattered in place into its own part of ``accum``
        self.accum = host(*buffers["accum"]).zero_()
        first = 0 if self.accum.numel() == self.shard_numel else layout.shard_start
        self.reduced = self.accum[first:first + self.shard_numel]
        # the kernel writes the new weights in the device's dtype here when the master has another dtype
        self.upload = host(*buffers["upload"]) if buffers["upload"] is not None else None
        for slot in slots:
            if slot.count:
                self.owned(self.master, slot).view(-1).copy_(slot.param.detach().reshape(-1)[slot.lo:slot.hi])
        # device accumulation: the flat device accumulator (zeros: the gaps between sharded parameters stay
        # zero), and the event of its copy into ``accum``
        self.device_accum = (torch.zeros(self.numel, dtype=accum_dtype, device=slots[0].param.device)
                             if on_device else None)
        self.ready: Any = None  # NCCL reduction of the device accumulator: the compute stream's event
        self.complete = 0  # device accumulation: slots that have all the step's micro-batches
        self.sent = False  # device accumulation: the accumulator is on its way to the host this step
        self.copied: Any = None  # ... and the event of that copy
        self.device_sq_norm: torch.Tensor | None = None
        self.fills_done = 0
        self.open_fill: _Fill | None = None
        self.accumulated: Future | None = None  # the last accumulation task of this step
        self.stepped: Future | None = None  # the optimizer step; its result is the upload event
        self.uploaded: Any = None  # the last upload's event: master/upload are rewritten only after it
        self.sq_norm: float | None = None

    @staticmethod
    def layout(slots: list[_Slot], replicas: Replicas | None):
        return bucket_layout([s.param.numel() for s in slots], *((replicas.size, replicas.rank) if replicas
                                                                 else (1, 0)))

    @staticmethod
    def host_buffers(layout, grad_dtype: torch.dtype, master_dtype: torch.dtype, accum_dtype: torch.dtype,
                     on_device: bool, replicas: Replicas | None) -> dict[str, tuple[int, torch.dtype] | None]:
        """(elements, dtype) of the host buffers of a bucket of ``layout``: the engine reserves their
        pinned memory at once."""
        reduced_on_device = on_device and replicas is not None and replicas.on_device
        needs_upload = master_dtype == torch.float32 and grad_dtype == torch.bfloat16
        return {"master": (layout.shard_numel, master_dtype),
                "accum": (layout.shard_numel if reduced_on_device else layout.numel, accum_dtype),
                "upload": (layout.shard_numel, torch.bfloat16) if needs_upload else None}

    @staticmethod
    def view(flat: torch.Tensor, slot: _Slot) -> torch.Tensor:
        """The parameter's place in a buffer over the whole bucket."""
        return flat[slot.offset:slot.offset + slot.param.numel()].view(slot.param.shape)

    @staticmethod
    def owned(shard: torch.Tensor, slot: _Slot) -> torch.Tensor:
        """The elements this rank steps of the parameter, in a buffer over the shard: shaped as the
        parameter when they are all of it, else flat."""
        view = shard[slot.local:slot.local + slot.count]
        return view.view(slot.param.shape) if slot.whole else view

    def upload_source(self) -> torch.Tensor:
        return self.upload if self.upload is not None else self.master


def _named(params: Iterable) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for i, item in enumerate(params):
        name, p = item if isinstance(item, tuple) else (f"param{i}", item)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"OffloadEngine expects parameters or (name, parameter) pairs, got {type(p)} for {name}")
        named.append((name, p))
    if not named:
        raise ValueError("OffloadEngine got an empty parameter list")
    return named


def _check_max_grad_norm(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")


def new_owned_state(view: torch.Tensor, param_numel: int, min_8bit_size: int) -> dict[str, Any]:
    """Zero moments for ``view``, the elements of a parameter of ``param_numel`` elements that this rank
    steps: 8-bit exactly when the whole parameter's would be (the specification decides per tensor)."""
    return new_state(view, 1 if param_numel >= min_8bit_size else view.numel() + 1)


def _host_step_function(backend: str) -> Callable[..., None]:
    """The host kernel: the C++ op with the GIL released, or the reference (holds the GIL)."""
    if ops.resolve_backend(backend, "cpu") == "cpu":
        return ops.host_adamw8bit_step()
    return reference.adamw8bit_step


class OffloadEngine:
    """Host-resident 8-bit AdamW fed by gradient hooks; see the module docstring for the protocol.

    ``params``: parameters or (name, parameter) pairs, all on one device, all trainable. ``lr``, ``betas``,
    ``eps``, ``weight_decay``: as AdamW8bit (one set for all parameters). ``max_grad_norm``: clip the
    global norm to this (None: no clipping). ``accum_dtype``: "fp32" or "bf16" host accumulators.
    ``master_weights``: "fp32", or "bf16-sr" (bf16 masters with stochastic rounding, no fp32 copy).
    ``bucket_bytes``: device-gradient bytes per bucket (parameters of one dtype, in backward order).
    ``module``: the model (or stage) whose forward pre-hooks wait per bucket. ``min_8bit_size``, ``seed``:
    as AdamW8bit; ``index_offset``: see pipeline stages. ``num_workers``: CPU worker threads (each bucket
    always on the same one). ``backend``: "auto"/"cpu" (the C++ kernel) or "reference".
    ``grad_accum_location``: "host" (every micro-batch's gradients go to the host and are summed there)
    or "device" (summed on the device, sent once per step). ``staging_buffers``: host staging buffers
    allocated up front for host accumulation (gradients of that many buckets in flight at once).
    ``replicas``: the data-parallel group of this stage (the ranks holding the same parameters; see the
    module docstring); None or a group of one: this engine holds the whole optimizer state.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, max_grad_norm: float | None = None,
                 accum_dtype: str = "fp32", master_weights: str = "fp32", bucket_bytes: int = 32 << 20,
                 module: torch.nn.Module | None = None, min_8bit_size: int = reference.MIN_8BIT_NUMEL,
                 seed: int = 0, index_offset: int = 0, num_workers: int = 1, backend: str = "auto",
                 grad_accum_location: str = "host", staging_buffers: int = 2,
                 replicas: torch.distributed.ProcessGroup | None = None):
        check_hyperparameters(lr, tuple(betas), eps, weight_decay)
        _check_max_grad_norm(max_grad_norm)
        if accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be one of {', '.join(ACCUM_DTYPES)}, got {accum_dtype!r}")
        if master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {', '.join(MASTER_WEIGHTS)}, got {master_weights!r}")
        if grad_accum_location not in GRAD_ACCUM_LOCATIONS:
            raise ValueError(f"grad_accum_location must be one of {', '.join(GRAD_ACCUM_LOCATIONS)}, got "
                             f"{grad_accum_location!r} (the trainer's auto is decided by "
                             f"astrobio.memory.accumulation before the engine is built)")
        if bucket_bytes < 1 or num_workers < 1 or staging_buffers < 1:
            raise ValueError(f"bucket_bytes, num_workers and staging_buffers must be >= 1, got {bucket_bytes}, "
                             f"{num_workers} and {staging_buffers}")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), eps, weight_decay
        self.max_grad_norm, self.seed, self.index_offset = max_grad_norm, int(seed), int(index_offset)
        self.accum_dtype, self.master_weights = accum_dtype, master_weights
        self.grad_accum_location = grad_accum_location
        self.skipped_steps = 0
        self.worker_delay: Callable[[], None] | None = None
        self._host_step = _host_step_function(backend)
        self._qmaps = (reference.dynamic_map(signed=True), reference.dynamic_map(signed=False))
        slots = self._make_slots(_named(params))
        self.device = slots[0].param.device
        self._link = HostLink(self.device)
        pin = self._link.cuda
        self._replicas = Replicas.of(replicas, self.device) if replicas is not None else None
        self._buckets = self._make_buckets(slots, int(bucket_bytes), pin)
        for slot in slots:
            if slot.count:
                bucket = self._buckets[slot.bucket]
                slot.state = new_owned_state(bucket.owned(bucket.master, slot), slot.param.numel(), min_8bit_size)
        self._slots = slots
        self._on_device = grad_accum_location == "device"
        self._pool = None if self._on_device else StagingPool(
            max(b.numel * b.grad_dtype.itemsize for b in self._buckets), staging_buffers, pin)
        # replicas over gloo: two host buffers the new weights are gathered into, taken in turn (a
        # buffer is reused once the upload out of it has run)
        self._gather_buffers: list[tuple[torch.Tensor, Any]] = []
        if self._replicas is not None and not self._replicas.on_device:
            nbytes = max(b.numel * b.upload_source().element_size() for b in self._buckets)
            self._gather_buffers = [(torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin), None) for _ in range(2)]
        self._next_gather = 0
        self._timings = TimingsRecorder(grad_accum_location, self._link.cuda)
        self.last_timings: OffloadTimings | None = None
        # called with each stall of the compute stream: its (before, after) CUDA events on a GPU, the
        # host's (start, end) time.perf_counter() of a wait for weights on the CPU (a step breakdown)
        self.on_stall: Callable[[Any, Any], None] | None = None
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"astrobio-offload-{i}") for i in range(num_workers)]
        self._num_micro_batches: int | None = None
        on_grad = self._on_grad_device if self._on_device else self._on_grad
        self._hooks = [s.param.register_post_accumulate_grad_hook(functools.partial(on_grad, s)) for s in slots]
        self._module_hooks: list[Any] = []
        if module is not None:
            self.attach(module)

    @staticmethod
    def _make_slots(named: list[tuple[str, torch.nn.Parameter]]) -> list[_Slot]:
        seen: set[int] = set()
        for i, (name, p) in enumerate(named):
            check_parameter(p, f"OffloadEngine parameter {i} ({name})")
            if not p.requires_grad:
                raise ValueError(f"parameter {i} ({name}) does not require grad; pass only trainable parameters")
            if id(p) in seen:
                raise ValueError(f"parameter {i} ({name}) appears twice; pass each parameter once")
            if p.device != named[0][1].device:
                raise ValueError(f"parameter {i} ({name}) is on {p.device} but parameter 0 is on "
                                 f"{named[0][1].device}; one engine serves one device (one per pipeline stage)")
            seen.add(id(p))
        return [_Slot(param=p, index=i, name=name) for i, (name, p) in enumerate(named)]

    def _make_buckets(self, slots: list[_Slot], bucket_bytes: int, pin: bool) -> list[_Bucket]:
        """Greedy buckets over the parameters in backward (reverse registration) order."""
        groups: list[list[_Slot]] = []
        size = 0
        for slot in reversed(slots):
            nbytes = slot.param.numel() * slot.param.element_size()
            if not groups or size + nbytes > bucket_bytes or groups[-1][0].param.dtype != slot.param.dtype:
                groups.append([])
                size = 0
            groups[-1].append(slot)
            size += nbytes
        master, accum = MASTER_WEIGHTS[self.master_weights], ACCUM_DTYPES[self.accum_dtype]
        on_device = self.grad_accum_location == "device"
        host = self._host_allocator(groups, master, accum, on_device, pin)
        buckets = []
        for index, group in enumerate(groups):
            for slot in group:
                slot.bucket = index
            buckets.append(_Bucket(index, group, master, accum, host, on_device, self._replicas))
        return buckets

    def _host_allocator(self, groups: list[list[_Slot]], master: torch.dtype, accum: torch.dtype, on_device: bool,
                        pin: bool) -> Callable[[int, torch.dtype], torch.Tensor]:
        """Where the buckets' host buffers come from: one PinnedArena sized for all of them, pinned on a
        CUDA device (torch's pinned allocator would round each buffer up to a power of two:
        astrobio.optim.pinned), plain host blocks on a CPU-only machine (the same code path)."""
        expected = 0
        for group in groups:
            layout = _Bucket.layout(group, self._replicas)
            for buffer in _Bucket.host_buffers(layout, group[0].param.dtype, master, accum, on_device,
                                               self._replicas).values():
                if buffer is not None:
                    numel, dtype = buffer
                    expected += numel * dtype.itemsize
        self._arena = PinnedArena(expected, pin=pin)
        return self._arena.empty

    def attach(self, module: torch.nn.Module) -> None:
        """Forward pre-hooks on every submodule of ``module`` that owns engine parameters: each waits
        only for the buckets holding its own parameters, so end_step no longer waits for the steps."""
        bucket_of = {id(s.param): s.bucket for s in self._slots}
        for sub in module.modules():
            buckets = sorted({bucket_of[id(p)] for p in sub.parameters(recurse=False) if id(p) in bucket_of})
            if buckets:
                hook = functools.partial(self._before_forward, buckets)
                self._module_hooks.append(sub.register_forward_pre_hook(hook))

    def _before_forward(self, buckets: list[int], module: torch.nn.Module, args: Any) -> None:
        start = time.perf_counter()
        waited = [self._wait_step(self._buckets[index]) for index in buckets]
        self._waited_for_weights(start, any(waited))

    def _waited_for_weights(self, start: float, waited: bool) -> None:
        """Count the host's time since ``start`` as a wait for weights if a bucket's step was pending."""
        if not waited:
            return
        end = time.perf_counter()
        self._timings.add("weight_wait_s", end - start)
        if not self._link.cuda and self.on_stall is not None:
            self.on_stall(start, end)

    def _wait_device(self, event: Any) -> None:
        """Order the compute stream after ``event``, timing the stall (CUDA events, read once per step)."""
        marks = self._link.wait_device(event)
        self._timings.add_stall(marks)
        if marks is not None and self.on_stall is not None:
            self.on_stall(*marks)

    def _lane(self, bucket: _Bucket) -> ThreadPoolExecutor:
        """Every task of a bucket runs on one worker thread, so they run in the order submitted."""
        return self._lanes[bucket.index % len(self._lanes)]

    def _delay(self) -> None:
        if self.worker_delay is not None:
            self.worker_delay()

    # -- one optimizer step -------------------------------------------------------------------------------

    def begin_step(self, num_micro_batches: int) -> None:
        """Open an optimizer step that will run ``num_micro_batches`` backward passes; the timings of the
        step before become ``last_timings``."""
        if self._num_micro_batches is not None:
            raise RuntimeError("begin_step called twice without end_step; call end_step() to finish the open step")
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        self._num_micro_batches = int(num_micro_batches)
        self.last_timings = self._timings.roll()
        for bucket in self._buckets:  # device accumulation: rewrite no accumulator still being copied out
            self._wait_device(bucket.copied)

    def _check_open(self, slot: _Slot) -> None:
        if self._num_micro_batches is None:
            raise RuntimeError(f"a gradient for {slot.name} arrived outside an optimizer step; call "
                               f"engine.begin_step(num_micro_batches) before the backward passes")

    # -- host accumulation: every micro-batch's gradients to the host -------------------------------------

    def _on_grad(self, slot: _Slot, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook (main thread): stage the gradient for the host, free it on the device."""
        self._check_open(slot)
        start = time.perf_counter()
        bucket = self._buckets[slot.bucket]
        self._wait_step(bucket)
        if bucket.open_fill is not None and slot.position in bucket.open_fill.arrived:
            self._submit_fill(bucket)  # this parameter's second gradient: a new micro-batch began
        if bucket.open_fill is None:
            waited = time.perf_counter()
            buffer = self._pool.acquire()
            self._timings.add("staging_wait_s", time.perf_counter() - waited)
            grads = buffer[:bucket.numel * bucket.grad_dtype.itemsize].view(bucket.grad_dtype)
            bucket.open_fill = _Fill(buffer, grads)
        fill = bucket.open_fill
        self._link.to_host(bucket.view(fill.grads, slot), param.grad)
        fill.arrived.add(slot.position)
        param.grad = None
        if len(fill.arrived) == len(bucket.slots):
            self._submit_fill(bucket)
        self._timings.add("grad_hooks_s", time.perf_counter() - start)

    def _submit_fill(self, bucket: _Bucket) -> None:
        fill, bucket.open_fill = bucket.open_fill, None
        if bucket.fills_done == self._num_micro_batches:
            self._pool.put_back(fill.buffer)
            raise RuntimeError(f"bucket {bucket.index} received gradients of more than the "
                               f"{self._num_micro_batches} micro-batches announced by begin_step")
        for slot in bucket.slots:
            if slot.position not in fill.arrived:
                bucket.view(fill.grads, slot).zero_()
        for start, stop in bucket.gaps:  # the staging buffer's bytes there are stale
            fill.grads[start:stop].zero_()
        copied = self._link.host_copies_done()
        first = bucket.fills_done == 0
        bucket.fills_done += 1
        last = bucket.fills_done == self._num_micro_batches
        self._pool.handed_to_worker()
        bucket.accumulated = self._lane(bucket).submit(self._accumulate, bucket, fill, copied, first, last,
                                                       bucket.accumulated)

    def _accumulate(self, bucket: _Bucket, fill: _Fill, copied: Any, first: bool, last: bool,
                    previous: Future | None) -> None:
        """Worker: add one micro-batch's gradients into the host accumulator. Only the bucket's last task is
        awaited, so each task first re-raises the error of the one before it (done: same lane)."""
        try:
            if previous is not None:
                previous.result()
            self._delay()
            start = time.perf_counter()
            self._link.wait_host(copied)
            landed = time.perf_counter()
            add_chunked(bucket.accum, fill.grads, first)
            done = time.perf_counter()
        finally:
            self._pool.release(fill.buffer)
        self._timings.add("transfer_wait_s", landed - start)
        self._timings.add("host_accumulate_s", done - landed)
        accum_bytes = bucket.accum.numel() * bucket.accum.element_size()
        self._timings.add("host_accumulate_bytes", fill.grads.numel() * fill.grads.element_size()
                          + accum_bytes * (1 if first else 2))
        if last and self._replicas is None:  # with replicas: the norm of their sum, once reduced
            self._host_norm(bucket)

    def _host_norm(self, bucket: _Bucket) -> None:
        start = time.perf_counter()
        bucket.sq_norm = float(squared_norm(bucket.accum))
        self._timings.add("norm_s", time.perf_counter() - start)

    def _finish_accumulation(self, bucket: _Bucket, previous: Future | None) -> None:
        """Worker, at end_step, for a bucket that got fewer micro-batches than announced."""
        if previous is not None:
            previous.result()
        self._delay()
        if bucket.fills_done == 0:
            bucket.accum.zero_()
        if self._replicas is None:
            self._host_norm(bucket)

    # -- device accumulation: summed on the device, one copy to the host per step -------------------------

    def _on_grad_device(self, slot: _Slot, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add the gradient into the bucket's device accumulator and free it;
        send the bucket to the host once all its parameters have every micro-batch's gradient."""
        self._check_open(slot)
        start = time.perf_counter()
        bucket = self._buckets[slot.bucket]
        if slot.arrivals == self._num_micro_batches:
            raise RuntimeError(f"bucket {bucket.index} received gradients of more than the "
                               f"{self._num_micro_batches} micro-batches announced by begin_step")
        view = bucket.view(bucket.device_accum, slot)
        if slot.arrivals == 0:
            view.copy_(param.grad)
        else:
            view.add_(param.grad)
        slot.arrivals += 1
        param.grad = None
        if slot.arrivals == self._num_micro_batches:
            bucket.complete += 1
            if bucket.complete == len(bucket.slots):
                self._send(bucket)
        self._timings.add("grad_hooks_s", time.perf_counter() - start)

    def _send(self, bucket: _Bucket) -> None:
        """Main thread: the bucket's sums are final: its squared norm on the device, and one copy of the
        accumulator into the host accumulator (the previous step's optimizer must be done reading it)."""
        self._wait_step(bucket)
        for slot in bucket.slots:
            if slot.arrivals == 0:  # no gradient in any micro-batch: zeros, as the host path sums them
                bucket.view(bucket.device_accum, slot).zero_()
        if self._replicas is not None and self._replicas.on_device:  # NCCL reduces the accumulator where it is
            bucket.ready = self._link.compute_done()
        else:
            if self._replicas is None:  # with replicas: the norm of their sum, once reduced
                bucket.device_sq_norm = squared_norm(bucket.device_accum)
            self._link.to_host(bucket.accum, bucket.device_accum)
            bucket.copied = self._link.host_copies_done()
        bucket.sent = True

    def _device_squared_norms(self) -> list[float]:
        """Send every bucket not sent yet (some parameters had fewer micro-batches), then each bucket's
        squared norm, in bucket order, with one device-to-host copy of them all."""
        for bucket in self._buckets:
            if not bucket.sent:
                self._send(bucket)
        norms = torch.stack([b.device_sq_norm for b in self._buckets]).cpu().tolist()
        self._reset_device_accumulation()
        return norms

    def _reset_device_accumulation(self) -> None:
        for bucket in self._buckets:
            bucket.device_sq_norm, bucket.sent, bucket.complete = None, False, 0
            for slot in bucket.slots:
                slot.arrivals = 0

    # -- replicas: the sums reduced across them, each rank's shard stepped, the new weights gathered ------

    def _replicated_squared_norm(self) -> float:
        """Every bucket's sums, reduce-scattered across the replicas (in bucket order, on the replicas
        thread), and the squared norm of the reduced gradients, summed over the replicas: the stage's."""
        if self._on_device:
            for bucket in self._buckets:
                if not bucket.sent:
                    self._send(bucket)
        else:
            self._flush_host_accumulation()
        reductions = []
        for bucket in self._buckets:
            self._wait_step(bucket)  # the last step has read ``reduced``
            reductions.append(self._replicas.submit(self._reduce, bucket))
        local = 0.0
        for reduction in reductions:
            local += reduction.result()
        if self._on_device:
            self._reset_device_accumulation()
        for bucket in self._buckets:
            bucket.accumulated, bucket.fills_done = None, 0
        return self._replicas.submit(self._replicas.sum, local).result()

    def _reduce(self, bucket: _Bucket) -> float:
        """Replicas thread: this rank's shard of the replicas' summed gradients into ``bucket.reduced``;
        returns its squared norm."""
        if bucket.accumulated is not None:
            bucket.accumulated.result()  # host accumulation: the last micro-batch is in
        start = time.perf_counter()
        if self._replicas.on_device:
            full = bucket.device_accum if self._on_device else bucket.accum
            square = self._replicas.reduce_scatter_on_device(full, bucket.reduced, bucket.ready, squared_norm)
            bucket.ready = None
        else:
            self._link.wait_host(bucket.copied)  # device accumulation: the device's sums have landed
            self._replicas.reduce_scatter(bucket.accum, bucket.reduced)
            square = float(squared_norm(bucket.reduced))
        self._timings.add("collective_s", time.perf_counter() - start)
        return square

    def _gather(self, bucket: _Bucket, stepped: Future | None, after: Any) -> Any:
        """Replicas thread: once the bucket's shard has stepped, every replica's new weights into the device
        parameters (after the device has passed ``after``); returns the event of the last copy."""
        if stepped is not None:
            stepped.result()
        start = time.perf_counter()
        source = bucket.upload_source()
        if self._replicas.on_device:
            event = self._replicas.all_gather_on_device(
                source, bucket.numel, lambda full: [(s.param.data, bucket.view(full, s)) for s in bucket.slots], after)
        else:
            turn, self._next_gather = self._next_gather, 1 - self._next_gather
            buffer, previous = self._gather_buffers[turn]
            self._link.wait_host(previous)
            full = buffer[:bucket.numel * source.element_size()].view(source.dtype)
            self._replicas.all_gather(full, source)
            event = self._link.to_device([(s.param.data, bucket.view(full, s)) for s in bucket.slots], after)
            self._gather_buffers[turn] = (buffer, event)
        bucket.uploaded = event
        self._timings.add("collective_s", time.perf_counter() - start)
        return event

    # -- the step -----------------------------------------------------------------------------------------

    def end_step(self, lr: float | None = None, grad_scale: float = 1.0,
                 sum_across: Callable[[float], float] | None = None) -> StepStats:
        """Finish the step: global norm, skip or clip, then the bucket steps (asynchronous when a module
        is attached). ``lr`` (e.g. from a schedule) replaces the engine's lr from now on. ``sum_across``
        turns this engine's sum of squared gradients into the whole model's (e.g. an all-reduce over the
        pipeline stages' ranks; it must return the same float on every rank), so that every stage clips
        and skips alike."""
        if self._num_micro_batches is None:
            raise RuntimeError("end_step called without begin_step; call engine.begin_step(num_micro_batches) first")
        if lr is not None:
            check_hyperparameters(lr, self.betas, self.eps, self.weight_decay)
            self.lr = float(lr)
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be finite and > 0, got {grad_scale}")
        start = time.perf_counter()
        if self._replicas is None:
            squares = 0.0
            for square in (self._device_squared_norms() if self._on_device else self._host_squared_norms()):
                squares += square
        else:
            squares = self._replicated_squared_norm()
            grad_scale = grad_scale / self._replicas.size  # the reduced gradients are the replicas' sum: their mean
        grad_norm = math.sqrt(squares if sum_across is None else sum_across(squares)) * grad_scale
        self._timings.add("norm_wait_s", time.perf_counter() - start)
        self._num_micro_batches = None
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            return StepStats(grad_norm=grad_norm, skipped=True, clip_coef=1.0, lr=self.lr)
        clip_coef = 1.0
        if self.max_grad_norm is not None:
            clip_coef = min(1.0, self.max_grad_norm / (grad_norm + 1e-6))
        backward_done = self._link.compute_done()
        for bucket in reversed(self._buckets):  # forward order: the next forward needs these first
            if self._replicas is None:
                bucket.stepped = self._lane(bucket).submit(self._step_bucket, bucket, self.lr,
                                                           grad_scale * clip_coef, backward_done)
            else:  # the shard steps on a worker, the gathers run in this order on the replicas thread
                stepped = self._lane(bucket).submit(self._step_shard, bucket, self.lr, grad_scale * clip_coef)
                bucket.stepped = self._replicas.submit(self._gather, bucket, stepped, backward_done)
        if not self._module_hooks:
            self.synchronize()
        return StepStats(grad_norm=grad_norm, skipped=False, clip_coef=clip_coef, lr=self.lr)

    def _flush_host_accumulation(self) -> None:
        """Submit the open fills, and finish the buckets that got fewer micro-batches than announced."""
        for bucket in self._buckets:
            if bucket.open_fill is not None:
                self._submit_fill(bucket)
            if bucket.fills_done < self._num_micro_batches:
                bucket.accumulated = self._lane(bucket).submit(self._finish_accumulation, bucket, bucket.accumulated)

    def _host_squared_norms(self) -> list[float]:
        """Flush open fills, wait for every host accumulator, and each bucket's squared norm."""
        self._flush_host_accumulation()
        norms = []
        for bucket in self._buckets:
            bucket.accumulated.result()
            norms.append(bucket.sq_norm)
            bucket.accumulated, bucket.sq_norm, bucket.fills_done = None, None, 0
        return norms

    def _step_bucket(self, bucket: _Bucket, lr: float, grad_scale: float, after: Any) -> Any:
        """Worker: the fused 8-bit AdamW over the bucket's parameters, then the upload to the device."""
        self._step_shard(bucket, lr, grad_scale)
        start = time.perf_counter()
        event = self._upload(bucket, after)
        self._timings.add("upload_s", time.perf_counter() - start)
        return event

    def _step_shard(self, bucket: _Bucket, lr: float, grad_scale: float) -> None:
        """Worker: the fused 8-bit AdamW over the elements of the bucket this rank steps, a call per
        parameter (on a slice of one, with the absmax of its blocks: blocks are independent)."""
        self._delay()
        start = time.perf_counter()
        self._link.wait_host(bucket.uploaded)  # a bucket without gradients this step waited on nothing yet
        self._link.wait_host(bucket.copied)  # device accumulation: the accumulator has landed
        landed = time.perf_counter()
        beta1, beta2 = self.betas
        qmap1, qmap2 = self._qmaps
        no_absmax = torch.empty(0, dtype=torch.float32)
        for slot in bucket.slots:
            if not slot.count:
                continue
            state = slot.state
            state["step"] += 1
            quantized = state["exp_avg"].dtype == torch.uint8
            upload = bucket.owned(bucket.upload, slot) if bucket.upload is not None else None
            self._host_step(bucket.owned(bucket.master, slot), bucket.owned(bucket.reduced, slot), state["exp_avg"],
                            state["exp_avg_sq"], state["absmax1"] if quantized else no_absmax,
                            state["absmax2"] if quantized else no_absmax, qmap1, qmap2, upload, None, lr, beta1,
                            beta2, self.eps, self.weight_decay, grad_scale, state["step"],
                            step_seed(self.seed, state["step"], self.index_offset + slot.index))
        self._timings.add("transfer_wait_s", landed - start)
        self._timings.add("optimizer_s", time.perf_counter() - landed)

    def _upload(self, bucket: _Bucket, after: Any) -> Any:
        source = bucket.upload_source()
        bucket.uploaded = self._link.to_device([(s.param.data, bucket.view(source, s)) for s in bucket.slots], after)
        return bucket.uploaded

    def _wait_step(self, bucket: _Bucket) -> bool:
        """Main thread: wait until the bucket's step has run and its upload is ordered before later work;
        returns whether a step was pending."""
        if bucket.stepped is None:
            return False
        stepped, bucket.stepped = bucket.stepped, None
        self._wait_device(stepped.result())
        return True

    def synchronize(self) -> None:
        """Wait for every pending accumulation, step and upload; device work after this sees the new
        weights, and the host buffers are free to read or rewrite."""
        start = time.perf_counter()
        waited = False
        for bucket in self._buckets:
            if bucket.accumulated is not None:
                bucket.accumulated.result()
            waited = self._wait_step(bucket) or waited
        self._link.finish_uploads()
        self._waited_for_weights(start, waited)

    # -- checkpoints --------------------------------------------------------------------------------------

    @property
    def masters_in_parameters(self) -> bool:
        """Whether the device parameters hold the master weights exactly (the masters have the parameters'
        dtype, e.g. bf16-sr masters of a bf16 model), so that a checkpoint needs them only once."""
        return all(b.upload is None and b.master.dtype == b.grad_dtype for b in self._buckets)

    def host_bytes(self) -> dict[str, int]:
        """Bytes of the engine's host buffers by kind, as the memory planner names them: ``master``,
        ``moments`` (codes, absmax, fp32 moments), ``accumulators`` (the summed gradients: all of the
        bucket's, or the shard that came reduced from the device; the replicas' sum is reduced into it),
        ``upload``, ``staging``, ``gather``."""
        def nbytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        buckets = self._buckets
        return {"master": nbytes(b.master for b in buckets),
                "moments": nbytes(v for s in self._slots for v in s.state.values() if torch.is_tensor(v)),
                "accumulators": nbytes(b.accum for b in buckets),
                "upload": nbytes(b.upload for b in buckets if b.upload is not None),
                "staging": 0 if self._pool is None else self._pool.nbytes * self._pool.allocated,
                "gather": nbytes(buffer for buffer, _ in self._gather_buffers)}

    def shard_ranges(self) -> dict[int, tuple[int, int]]:
        """The elements ``(lo, hi)`` of each parameter (by position in ``params``, flattened) whose state
        this rank holds: every parameter whole without replicas; with them, only those its shards touch."""
        return {slot.index: (slot.lo, slot.hi) for slot in self._slots if slot.count}

    def state_dict(self, masters: bool = True) -> dict[str, Any]:
        """Hyperparameters, per-parameter state (moments, step, master), and, between micro-batches of an
        open step, the accumulators and the micro-batch count. ``masters=False`` leaves the master weights
        out where ``masters_in_parameters`` (a 13B checkpoint then holds its bf16 weights once, in the
        model's file): loading it takes them from the parameters, so load the model's weights first.
        With replicas: the state of this rank's elements only, each entry with its ``range`` [lo, hi]
        (``shard_ranges``) and flat tensors where it is a slice, and ``shard`` = {replica, replicas};
        only between steps."""
        self.synchronize()
        if any(b.open_fill is not None for b in self._buckets):
            raise RuntimeError("state_dict() was called during a backward pass; call it between micro-batches")
        if self._replicas is not None and self._num_micro_batches is not None:
            raise RuntimeError("state_dict() of an engine with replicas was called inside an optimizer step; its "
                               "accumulators hold this replica's unreduced sums: call it between steps")
        if not masters and not self.masters_in_parameters:
            raise ValueError(f"state_dict(masters=False): the {self.master_weights} master weights differ from the "
                             f"parameters (another dtype), so they must be saved; use masters=True")
        state = {}
        for slot in self._slots:
            if not slot.count:
                continue
            bucket = self._buckets[slot.bucket]
            entry = {**slot.state, "master": bucket.owned(bucket.master, slot)} if masters else dict(slot.state)
            if self._replicas is not None:
                entry["range"] = [slot.lo, slot.hi]
            state[slot.index] = entry
        saved = {"hyperparameters": dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                         max_grad_norm=self.max_grad_norm),
                 "master_weights": self.master_weights, "accum_dtype": self.accum_dtype,
                 "masters": "saved" if masters else "parameters",
                 "skipped_steps": self.skipped_steps, "state": state, "accumulation": None}
        if self._replicas is not None:
            saved["shard"] = {"replica": self._replicas.rank, "replicas": self._replicas.size}
        if self._num_micro_batches is not None:
            saved["accumulation"] = self._accumulation_state()
        return saved

    def _accumulation_state(self) -> dict[str, Any]:
        """The sums so far (host tensors) and how many micro-batches each holds, whatever the location."""
        accumulators, done = {}, {}
        for slot in self._slots:
            bucket = self._buckets[slot.bucket]
            count = slot.arrivals if self._on_device else bucket.fills_done
            view = bucket.view(bucket.device_accum if self._on_device else bucket.accum, slot)
            accumulators[slot.index] = view.to("cpu", copy=True) if count else torch.zeros(view.shape, dtype=view.dtype)
            done[slot.index] = count
        return {"num_micro_batches": self._num_micro_batches, "micro_batches_done": done,
                "accumulators": accumulators}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a state_dict of an engine over the same parameters (validated before anything changes).
        With replicas: a state with an entry of exactly ``shard_ranges()`` for each parameter (e.g. from
        astrobio.train.checkpoint.load_offload_state, which reshards a checkpoint); every replica calls
        this (the new weights are gathered)."""
        self.synchronize()
        if any(b.open_fill is not None for b in self._buckets):
            raise RuntimeError("load_state_dict() was called during a backward pass; call it between steps")
        for key, own in (("master_weights", self.master_weights), ("accum_dtype", self.accum_dtype)):
            if saved.get(key) != own:
                raise ValueError(f"the state was saved with {key}={saved.get(key)!r} but this engine uses {own!r}; "
                                 f"build the engine with {key}={saved.get(key)!r}")
        hyper = saved["hyperparameters"]
        check_hyperparameters(hyper["lr"], tuple(hyper["betas"]), hyper["eps"], hyper["weight_decay"])
        _check_max_grad_norm(hyper["max_grad_norm"])
        skipped_steps = saved["skipped_steps"]
        if not isinstance(skipped_steps, int) or skipped_steps < 0:
            raise ValueError(f"skipped_steps must be an int >= 0, got {skipped_steps!r}")
        states = self._checked_states(saved["state"], saved.get("masters", "saved") == "parameters")
        accumulation = self._checked_accumulation(saved.get("accumulation"))
        for slot, (state, master) in zip([s for s in self._slots if s.count], states):
            bucket = self._buckets[slot.bucket]
            slot.state = state
            bucket.owned(bucket.master, slot).copy_(master)
            if bucket.upload is not None:
                bucket.owned(bucket.upload, slot).copy_(master)  # round to nearest, as the kernel writes it
        for bucket in self._buckets:
            after = self._link.compute_done()
            if self._replicas is None:
                self._wait_device(self._upload(bucket, after))
            else:
                self._wait_device(self._replicas.submit(self._gather, bucket, None, after).result())
        self._load_accumulation(accumulation)
        self.lr, self.betas, self.eps = float(hyper["lr"]), tuple(hyper["betas"]), hyper["eps"]
        self.weight_decay, self.max_grad_norm = hyper["weight_decay"], hyper["max_grad_norm"]
        self.skipped_steps = skipped_steps

    def _checked_states(self, saved: dict[int, Any], masters_in_parameters: bool,
                        ) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """(state, master) of each parameter this rank steps, in order, from ``saved``: an entry whose
        ``range`` (absent: the whole parameter) is the rank's, its tensors flat or shaped as the parameter."""
        owned = [s for s in self._slots if s.count]
        if sorted(saved) != [s.index for s in owned]:
            raise ValueError(f"the state holds parameters {sorted(saved)[:8]}... but this engine steps "
                             f"{len(owned)} of its {len(self._slots)} parameters; was it saved for another model, "
                             f"stage or replica count? (astrobio.train.checkpoint.load_offload_state reshards a "
                             f"checkpoint for shard_ranges())")
        if masters_in_parameters and not self.masters_in_parameters:
            raise ValueError("the state was saved without master weights (its parameters held them), but this "
                             "engine's masters have another dtype than its parameters; build the engine with the "
                             "parameters' dtype and master_weights of the saved run")
        checked = []
        master_dtype = MASTER_WEIGHTS[self.master_weights]
        for slot in owned:
            entry = dict(saved[slot.index])
            master = entry.pop("master", None)
            where = f"offload state of parameter {slot.index} ({slot.name}, shape {tuple(slot.param.shape)})"
            span = tuple(entry.pop("range", (0, slot.param.numel())))
            if span != (slot.lo, slot.hi):
                raise ValueError(f"{where}: the state covers its elements {span[0]}..{span[1]} but this rank steps "
                                 f"{slot.lo}..{slot.hi}; reshard it (astrobio.train.checkpoint.load_offload_state)")
            shape = slot.param.shape if slot.whole else torch.Size([slot.count])
            if masters_in_parameters:
                master = slot.param.detach().reshape(-1)[slot.lo:slot.hi].to("cpu")
            if torch.is_tensor(master) and master.numel() == slot.count:
                master = master.reshape(shape)
            if not torch.is_tensor(master) or master.shape != shape or master.dtype != master_dtype:
                got = f"{master.dtype} {tuple(master.shape)}" if torch.is_tensor(master) else repr(master)
                raise ValueError(f"{where}: master must be a {master_dtype} tensor of {slot.count} elements, got {got}")
            for key in ("exp_avg", "exp_avg_sq"):  # flat in a resharded state
                value = entry.get(key)
                if torch.is_tensor(value) and value.numel() == slot.count:
                    entry[key] = value.reshape(shape)
            host_like = torch.empty(shape, dtype=master_dtype)
            state = checked_state(host_like, entry, where)
            owned = {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
            checked.append((owned, master))
        return checked

    def _checked_accumulation(self, accumulation: dict[str, Any] | None) -> dict[str, Any] | None:
        if accumulation is None:
            return None
        if self._replicas is not None:
            raise ValueError("the state was saved inside an optimizer step (it holds accumulators), which an "
                             "engine with replicas cannot continue; save and load between steps")
        accum_dtype = ACCUM_DTYPES[self.accum_dtype]
        num_micro_batches = accumulation["num_micro_batches"]
        if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise ValueError(f"the accumulation's num_micro_batches must be an int >= 1, got {num_micro_batches!r}")
        for slot in self._slots:
            acc = accumulation["accumulators"].get(slot.index)
            if not torch.is_tensor(acc) or acc.shape != slot.param.shape or acc.dtype != accum_dtype:
                raise ValueError(f"the accumulator of parameter {slot.index} ({slot.name}) must be a {accum_dtype} "
                                 f"tensor of shape {tuple(slot.param.shape)}")
            done = accumulation["micro_batches_done"].get(slot.index)
            if not isinstance(done, int) or not 0 <= done <= accumulation["num_micro_batches"]:
                raise ValueError(f"micro_batches_done of parameter {slot.index} must be an int in "
                                 f"[0, {accumulation['num_micro_batches']}], got {done!r}")
        return accumulation

    def _load_accumulation(self, accumulation: dict[str, Any] | None) -> None:
        self._num_micro_batches = None if accumulation is None else int(accumulation["num_micro_batches"])
        if self._on_device:
            self._load_device_accumulation(accumulation)
            return
        for bucket in self._buckets:
            bucket.fills_done, bucket.sq_norm = 0, None
            if accumulation is None:
                continue
            for slot in bucket.slots:
                bucket.view(bucket.accum, slot).copy_(accumulation["accumulators"][slot.index])
            bucket.fills_done = max(accumulation["micro_batches_done"][s.index] for s in bucket.slots)
            if bucket.fills_done == self._num_micro_batches:  # complete: its norm was never computed here
                bucket.accumulated = self._lane(bucket).submit(self._finish_accumulation, bucket, None)

    def _load_device_accumulation(self, accumulation: dict[str, Any] | None) -> None:
        for bucket in self._buckets:
            bucket.complete, bucket.sent, bucket.device_sq_norm = 0, False, None
            for slot in bucket.slots:
                slot.arrivals = 0 if accumulation is None else accumulation["micro_batches_done"][slot.index]
                if slot.arrivals:
                    bucket.view(bucket.device_accum, slot).copy_(accumulation["accumulators"][slot.index])
                bucket.complete += slot.arrivals == self._num_micro_batches
            if bucket.complete == len(bucket.slots):
                self._send(bucket)

    def close(self) -> None:
        """Wait for pending work, remove every hook and stop the worker threads (also when a pending task
        failed: its error is raised after the threads have stopped)."""
        try:
            self.synchronize()
        finally:
            for handle in self._hooks + self._module_hooks:
                handle.remove()
            self._hooks, self._module_hooks = [], []
            for lane in self._lanes:
                lane.shutdown(wait=True)
            if self._replicas is not None:
                self._replicas.close()

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
