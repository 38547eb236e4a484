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
    offset: int = 0
    position: int = 0  # within its bucket
    state: dict[str, Any] = field(default_factory=dict)
    arrivals: int = 0  # device accumulation: micro-batches of this step whose gradient arrived


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
    """Parameters of one dtype, consecutive in backward order, with flat host buffers."""

    def __init__(self, index: int, slots: list[_Slot], master_dtype: torch.dtype, accum_dtype: torch.dtype,
                 pin: bool, on_device: bool):
        self.index, self.slots = index, slots
        offset = 0
        for position, slot in enumerate(slots):
            slot.offset, slot.position = offset, position
            offset += slot.param.numel()
        self.numel = offset
        self.grad_dtype = slots[0].param.dtype
        self.master = torch.empty(offset, dtype=master_dtype, pin_memory=pin)
        self.accum = torch.zeros(offset, dtype=accum_dtype, pin_memory=pin)
        # the kernel writes the new weights in the device's dtype here when the master has another dtype
        needs_upload = master_dtype == torch.float32 and self.grad_dtype == torch.bfloat16
        self.upload = torch.empty(offset, dtype=torch.bfloat16, pin_memory=pin) if needs_upload else None
        for slot in slots:
            self.view(self.master, slot).copy_(slot.param.detach())
        # device accumulation: the flat device accumulator, and the event of its copy into ``accum``
        self.device_accum = (torch.empty(offset, dtype=accum_dtype, device=slots[0].param.device)
                             if on_device else None)
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
    def view(flat: torch.Tensor, slot: _Slot) -> torch.Tensor:
        return flat[slot.offset:slot.offset + slot.param.numel()].view(slot.param.shape)

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
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, max_grad_norm: float | None = None,
                 accum_dtype: str = "fp32", master_weights: str = "fp32", bucket_bytes: int = 32 << 20,
                 module: torch.nn.Module | None = None, min_8bit_size: int = reference.MIN_8BIT_NUMEL,
                 seed: int = 0, index_offset: int = 0, num_workers: int = 1, backend: str = "auto",
                 grad_accum_location: str = "host", staging_buffers: int = 2):
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
        self._buckets = self._make_buckets(slots, int(bucket_bytes), pin)
        for slot in slots:
            slot.state = new_state(self._buckets[slot.bucket].view(self._buckets[slot.bucket].master, slot),
                                   min_8bit_size)
        self._slots = slots
        self._on_device = grad_accum_location == "device"
        self._pool = None if self._on_device else StagingPool(
            max(b.numel * b.grad_dtype.itemsize for b in self._buckets), staging_buffers, pin)
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
        buckets = []
        for index, group in enumerate(groups):
            for slot in group:
                slot.bucket = index
            buckets.append(_Bucket(index, group, master, accum, pin, self.grad_accum_location == "device"))
        return buckets

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
        if last:
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
        for bucket in self._buckets:
            bucket.device_sq_norm, bucket.sent, bucket.complete = None, False, 0
            for slot in bucket.slots:
                slot.arrivals = 0
        return norms

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
        squares = 0.0
        for square in (self._device_squared_norms() if self._on_device else self._host_squared_norms()):
            squares += square
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
            bucket.stepped = self._lane(bucket).submit(self._step_bucket, bucket, self.lr, grad_scale * clip_coef,
                                                       backward_done)
        if not self._module_hooks:
            self.synchronize()
        return StepStats(grad_norm=grad_norm, skipped=False, clip_coef=clip_coef, lr=self.lr)

    def _host_squared_norms(self) -> list[float]:
        """Flush open fills, wait for every host accumulator, and each bucket's squared norm."""
        for bucket in self._buckets:
            if bucket.open_fill is not None:
                self._submit_fill(bucket)
            if bucket.fills_done < self._num_micro_batches:
                bucket.accumulated = self._lane(bucket).submit(self._finish_accumulation, bucket, bucket.accumulated)
        norms = []
        for bucket in self._buckets:
            bucket.accumulated.result()
            norms.append(bucket.sq_norm)
            bucket.accumulated, bucket.sq_norm, bucket.fills_done = None, None, 0
        return norms

    def _step_bucket(self, bucket: _Bucket, lr: float, grad_scale: float, after: Any) -> Any:
        """Worker: the fused 8-bit AdamW over the bucket's parameters, then the upload to the device."""
        self._delay()
        start = time.perf_counter()
        self._link.wait_host(bucket.uploaded)  # a bucket without gradients this step waited on nothing yet
        self._link.wait_host(bucket.copied)  # device accumulation: the accumulator has landed
        landed = time.perf_counter()
        beta1, beta2 = self.betas
        qmap1, qmap2 = self._qmaps
        no_absmax = torch.empty(0, dtype=torch.float32)
        for slot in bucket.slots:
            state = slot.state
            state["step"] += 1
            quantized = state["exp_avg"].dtype == torch.uint8
            upload = bucket.view(bucket.upload, slot) if bucket.upload is not None else None
            self._host_step(bucket.view(bucket.master, slot), bucket.view(bucket.accum, slot), state["exp_avg"],
                            state["exp_avg_sq"], state["absmax1"] if quantized else no_absmax,
                            state["absmax2"] if quantized else no_absmax, qmap1, qmap2, upload, None, lr, beta1,
                            beta2, self.eps, self.weight_decay, grad_scale, state["step"],
                            step_seed(self.seed, state["step"], self.index_offset + slot.index))
        stepped = time.perf_counter()
        event = self._upload(bucket, after)
        self._timings.add("transfer_wait_s", landed - start)
        self._timings.add("optimizer_s", stepped - landed)
        self._timings.add("upload_s", time.perf_counter() - stepped)
        return event

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

    def state_dict(self, masters: bool = True) -> dict[str, Any]:
        """Hyperparameters, per-parameter state (moments, step, master), and, between micro-batches of an
        open step, the accumulators and the micro-batch count. ``masters=False`` leaves the master weights
        out where ``masters_in_parameters`` (a 13B checkpoint then holds its bf16 weights once, in the
        model's file): loading it takes them from the parameters, so load the model's weights first."""
        self.synchronize()
        if any(b.open_fill is not None for b in self._buckets):
            raise RuntimeError("state_dict() was called during a backward pass; call it between micro-batches")
        if not masters and not self.masters_in_parameters:
            raise ValueError(f"state_dict(masters=False): the {self.master_weights} master weights differ from the "
                             f"parameters (another dtype), so they must be saved; use masters=True")
        state = {}
        for slot in self._slots:
            bucket = self._buckets[slot.bucket]
            state[slot.index] = {**slot.state, "master": bucket.view(bucket.master, slot)} if masters else \
                dict(slot.state)
        saved = {"hyperparameters": dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                         max_grad_norm=self.max_grad_norm),
                 "master_weights": self.master_weights, "accum_dtype": self.accum_dtype,
                 "masters": "saved" if masters else "parameters",
                 "skipped_steps": self.skipped_steps, "state": state, "accumulation": None}
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
        """Load a state_dict of an engine over the same parameters (validated before anything changes)."""
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
        for slot, (state, master) in zip(self._slots, states):
            bucket = self._buckets[slot.bucket]
            slot.state = state
            bucket.view(bucket.master, slot).copy_(master)
            if bucket.upload is not None:
                bucket.view(bucket.upload, slot).copy_(master)  # round to nearest, as the kernel writes it
        for bucket in self._buckets:
            self._wait_device(self._upload(bucket, self._link.compute_done()))
        self._load_accumulation(accumulation)
        self.lr, self.betas, self.eps = float(hyper["lr"]), tuple(hyper["betas"]), hyper["eps"]
        self.weight_decay, self.max_grad_norm = hyper["weight_decay"], hyper["max_grad_norm"]
        self.skipped_steps = skipped_steps

    def _checked_states(self, saved: dict[int, Any], masters_in_parameters: bool,
                        ) -> list[tuple[dict[str, Any], torch.Tensor]]:
        if sorted(saved) != [s.index for s in self._slots]:
            raise ValueError(f"the state holds parameters {sorted(saved)[:8]}... but this engine has "
                             f"{len(self._slots)} parameters; was it saved for another model or stage?")
        if masters_in_parameters and not self.masters_in_parameters:
            raise ValueError("the state was saved without master weights (its parameters held them), but this "
                             "engine's masters have another dtype than its parameters; build the engine with the "
                             "parameters' dtype and master_weights of the saved run")
        checked = []
        master_dtype = MASTER_WEIGHTS[self.master_weights]
        for slot in self._slots:
            entry = dict(saved[slot.index])
            master = entry.pop("master", None)
            if masters_in_parameters:
                master = slot.param.detach().to("cpu")
            where = f"offload state of parameter {slot.index} ({slot.name}, shape {tuple(slot.param.shape)})"
            if not torch.is_tensor(master) or master.shape != slot.param.shape or master.dtype != master_dtype:
                got = f"{master.dtype} {tuple(master.shape)}" if torch.is_tensor(master) else repr(master)
                raise ValueError(f"{where}: master must be a {master_dtype} tensor of the parameter's shape, got {got}")
            host_like = torch.empty(slot.param.shape, dtype=master_dtype)
            state = checked_state(host_like, entry, where)
            owned = {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
            checked.append((owned, master))
        return checked

    def _checked_accumulation(self, accumulation: dict[str, Any] | None) -> dict[str, Any] | None:
        if accumulation is None:
            return None
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

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
