"""Runs one stage's actions of a pipeline schedule over torch.distributed point-to-point.

``run_pipeline_step(stage_module, schedule, micro_batches, loss_fn)`` is one optimizer step's forward
and backward on this rank (stage = rank in ``group``); gradients accumulate into the stage's ``.grad``
exactly as ``(sum_i loss_i / m).backward()`` would in one process. It returns every micro-batch's loss
(on every rank) and this rank's measured trace.

How data moves. An activation goes with a header (dims and dtype), so every micro-batch may have its
own shape; a gradient has the shape of the activation it belongs to and needs none. Posting is
non-blocking (``SEND_*``/``RECV_*``); ``F`` waits for its activation and ``B`` for its gradient.
Consecutive communication actions are posted as one batch (on NCCL, ``batch_isend_irecv``); on gloo
the sends are posted from the send thread (a gloo send to a posted receive copies its data inside
the call). Headers go over gloo (a side group when the data goes over NCCL). A stage keeps only the
autograd edge of an output it sent: once the send completes the output's memory is released.

Backward. With ``gpipe`` and ``1f1b``, ``B`` runs the whole backward. With ``zb-h1`` (on every stage
that has an input to differentiate), ``B`` runs the backward to the stage input and to the parameters
outside ``nn.Linear`` modules, while forward hooks keep each Linear's input and tensor hooks catch
the gradient of its output; ``W`` then computes each weight gradient as one GEMM of the two (what
Linear's backward does) and accumulates them all into ``.grad`` with one autograd call, so
post-accumulate-grad hooks fire as usual. Activation checkpointing
(``stage_module.gradient_checkpointing``) works with every schedule; under ``zb-h1`` it keeps no
Linear input: ``B`` keeps the graph and ``W`` runs backward from each Linear output to its weights,
recomputing a checkpointed block once more.

Receiving. A stage posts the header receive of every activation it will get when the step starts;
on gloo the thread that waits for the headers posts each payload's receive the moment its header is
in (gloo sends a payload only once its receive is posted), so the transfer overlaps whatever this
stage computes meanwhile. Receives are waited on by background threads (activations and gradients
on separate ones) from when they are posted; a computation whose data is already there does not
wait on a thread hop.

Late weight passes (ZB-H1). Nobody waits for a ``W``, so the executor may run one later than its
place in the schedule: a reached ``W`` waits while the next computation's data is in, and runs when
that data is not (filling what would be idle time) or when more than ``max_late_weight_passes`` are
waiting. A ``W`` never runs earlier than the schedule says, and at most that many extra
micro-batches' Linear inputs and output gradients are held.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge

from astrobio.parallel.launch import WorkWaiter
from astrobio.parallel.schedules import Action, Schedule, schedule as make_schedule
from astrobio.parallel.simulate import Costs, simulate

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_DIMS = 6
TAGS = {"ACT_HEADER": 0, "ACT": 1, "GRAD": 2}
# a W may run after later computations (one micro-batch's Linear inputs and output gradients held longer)
MAX_LATE_WEIGHT_PASSES = 1
_side_groups: dict = {}


@dataclass
class TraceEvent:
    """One computation: perf_counter seconds (one clock for all processes on a Linux host), and the
    seconds it waited for its data before starting."""

    op: str
    micro_batch: int
    start: float
    end: float
    wait: float = 0.0


@dataclass
class StepResult:
    loss: float  # sum of the micro-batch losses / m, on every rank
    micro_batch_losses: list[float]
    stage: int
    trace: list[TraceEvent] = field(default_factory=list)


def run_pipeline_step(stage_module: nn.Module, schedule: Schedule | str,
                      micro_batches: Sequence[tuple[Any, Any]], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                      *, group: dist.ProcessGroup | None = None, guard=None, device: torch.device | None = None,
                      on_action: Callable[[Action], None] | None = None,
                      max_late_weight_passes: int = MAX_LATE_WEIGHT_PASSES) -> StepResult:
    """One step of this rank's stage.

    ``micro_batches[i]`` is ``(inputs, targets)``: stage 0 reads the inputs (token ids), the last stage
    the targets (passed to ``loss_fn(output, targets)``, which returns the micro-batch's mean loss);
    other entries may be None. ``schedule`` is a Schedule or a kind (``gpipe``, ``1f1b``, ``zb-h1``).
    ``guard`` (a ``launch.FaultGuard``) makes every wait stop when another rank fails. ``on_action``
    is called before each action (tracing, fault injection in tests), in the schedule's order.
    ``max_late_weight_passes``: how many ``W`` may wait past their place in the schedule for a moment
    when the stage would otherwise wait for data (0: every ``W`` exactly where the schedule puts it)."""
    if max_late_weight_passes < 0:
        raise ValueError(f"max_late_weight_passes must be >= 0, got {max_late_weight_passes}")
    stage, world = dist.get_rank(group), dist.get_world_size(group)
    m = len(micro_batches)
    sched = make_schedule(schedule, world, m) if isinstance(schedule, str) else schedule
    if sched.num_stages != world or sched.num_micro_batches != m:
        raise ValueError(f"schedule is for {sched.num_stages} stages x {sched.num_micro_batches} micro-batches, "
                         f"but the group has {world} ranks and {m} micro-batches were given")
    device = device or next(stage_module.parameters()).device
    run = _StageRun(stage_module, sched, stage, micro_batches, loss_fn, _Links(group, guard, device), on_action,
                    max_late_weight_passes)
    return run.execute()


class _Links:
    """Point-to-point traffic of one stage with its neighbours."""

    def __init__(self, group, guard, device: torch.device):
        self.group, self.guard, self.device = group, guard, device
        self.nccl = dist.get_backend(group) == "nccl"
        self.header_group = side_gloo_group(group) if self.nccl else group

    def peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage) if self.group is not None else stage

    def post(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """NCCL: one batch (a send and a receive posted one by one in opposite orders would deadlock)."""
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(self, work: dist.Work) -> None:
        if self.guard is not None:
            self.guard.wait(work)
        else:
            work.wait()

    def wait_pending(self, pending) -> None:
        """Waits for a Work already submitted to a WorkWaiter (a send or a receive)."""
        if self.guard is not None:
            self.guard.wait_pending(pending)
        else:
            pending.done.wait()
            pending.result()


def side_gloo_group(group):
    """A gloo group over the same ranks, for headers (small CPU tensors) next to NCCL data."""
    key = id(group)
    if key not in _side_groups:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _side_groups[key] = dist.new_group(ranks, backend="gloo")
    return _side_groups[key]


def make_header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
        raise ValueError(f"cannot send a {t.dim()}-d {t.dtype} activation; the executor sends up to "
                         f"{MAX_DIMS} dims of {DTYPES}")
    dims = list(t.shape) + [0] * (MAX_DIMS - t.dim())
    return torch.tensor([t.dim(), DTYPES.index(t.dtype)] + dims, dtype=torch.int64)


def read_header(header: torch.Tensor) -> tuple[list[int], torch.dtype]:
    values = header.tolist()
    return values[2:2 + values[0]], DTYPES[values[1]]


class _Deferred:
    """One Linear call under ZB-H1: its input (``None`` under checkpointing, where W goes back through
    the output's autograd edge instead), the gradient of its output that B caught, its weights."""

    __slots__ = ("module", "edge", "input", "version", "params", "grad")

    def __init__(self, module, edge, input, params):
        self.module, self.edge, self.input, self.params, self.grad = module, edge, input, params, None
        self.version = None if input is None else input._version

    def catch(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def weight_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) of this call, as Linear's backward computes them: one GEMM (and a sum
        for the bias) on the flattened output gradient and input."""
        if self.input._version != self.version:
            raise RuntimeError(f"the input of {self.module} was modified in place after its forward; ZB-H1's "
                               "weight pass needs it unchanged (use 1f1b for this model)")
        go = self.grad.reshape(-1, self.grad.shape[-1])
        x = self.input.reshape(-1, self.input.shape[-1]).to(go.dtype)
        out = []
        if self.module.weight.requires_grad:
            out.append((self.module.weight, go.t().mm(x).to(self.module.weight.dtype)))
        bias = self.module.bias
        if bias is not None and bias.requires_grad:
            out.append((bias, go.sum(0).to(bias.dtype)))
        return out


class _WeightSplit:
    """Records each nn.Linear output during a forward, so that W can start from it."""

    def __init__(self, module: nn.Module):
        # under checkpointing, keeping each Linear input would undo the recomputation's memory saving
        self.keep_inputs = not getattr(module, "gradient_checkpointing", False)
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        deferred = {id(p) for lin in linears for p in lin.parameters()}
        self.early_params = [p for p in module.parameters() if p.requires_grad and id(p) not in deferred]
        self.recording: list[_Deferred] | None = None
        self.handles = [lin.register_forward_hook(self.record) for lin in linears]

    def record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # NOTE: off outside our F, so a checkpointed block's recomputation in B adds nothing.
        if self.recording is None or not output.requires_grad:
            return
        if any(slot.module is module for slot in self.recording):
            raise RuntimeError(f"{type(module).__name__} {module} ran twice in one forward; ZB-H1's weight "
                               "pass needs each Linear once per micro-batch (use 1f1b for this model)")
        kept = inputs[0] if self.keep_inputs else None
        edge = None if self.keep_inputs else get_gradient_edge(output)
        slot = _Deferred(module, edge, kept, [p for p in module.parameters() if p.requires_grad])
        output.register_hook(slot.catch)
        self.recording.append(slot)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _StageRun:
    def __init__(self, module, sched: Schedule, stage: int, micro_batches, loss_fn, links: _Links, on_action,
                 max_late_weight_passes: int):
        self.module, self.sched, self.stage = module, sched, stage
        self.micro_batches, self.loss_fn, self.links, self.on_action = micro_batches, loss_fn, links, on_action
        self.m = sched.num_micro_batches
        self.first, self.last = stage == 0, stage == sched.num_stages - 1
        self.split = _WeightSplit(module) if sched.split_backward and not self.first else None
        self.batch: list[tuple[dist.P2POp, list, Any]] = []  # ops to post together: (op, work slot, waiter)
        self.inputs: dict[int, torch.Tensor] = {}  # received activations (leaves)
        self.roots: dict[int, Any] = {}  # scaled loss, or the edge of the output sent on
        self.outputs: dict[int, torch.Tensor] = {}  # detached outputs waiting for SEND_ACT
        self.out_meta: dict[int, tuple] = {}  # shape and dtype of each output, for its gradient
        self.early_headers: dict[int, tuple] = {}  # micro-batch -> (Pending header receive, buffer)
        self.headers: dict[int, tuple] = {}  # (peer, Pending, buffer), once the schedule's RECV_ACT is reached
        self.acts_in: dict[int, tuple] = {}  # micro-batch -> (work slot, activation buffer); gloo: filled by
        # the header thread, which posts the payload's receive the moment the header is in
        self.grads_in: dict[int, tuple] = {}  # micro-batch -> (work slot, gradient buffer)
        self.grads_out: dict[int, torch.Tensor] = {}
        self.sends: list[tuple[Any, torch.Tensor]] = []  # (Pending send, tensor kept alive until sent)
        self.send_waiter = WorkWaiter(f"stage-{stage}-sends")
        # activations and gradients on separate threads: a Work waited on blocks those queued after it
        self.act_waiter = WorkWaiter(f"stage-{stage}-activations")
        self.grad_waiter = WorkWaiter(f"stage-{stage}-gradients")
        self.header_waiter = WorkWaiter(f"stage-{stage}-headers")
        self.deferred: dict[int, list[_Deferred]] = {}
        self.late_w: list[Action] = []  # W's whose place in the schedule has passed, oldest first
        self.max_late_w = max_late_weight_passes if self.split is not None else 0
        self.losses: dict[int, torch.Tensor] = {}
        self.trace: list[TraceEvent] = []

    def execute(self) -> StepResult:
        try:
            self.post_headers()
            for action in self.sched.actions[self.stage]:
                if self.on_action is not None:
                    self.on_action(action)
                self.run(action)
            while self.late_w:
                self.run_late_w()
            self.flush()
            for pending, _ in self.sends:
                self.links.wait_pending(pending)
            losses = self.share_losses()
        finally:
            for waiter in (self.send_waiter, self.act_waiter, self.grad_waiter, self.header_waiter):
                waiter.close()
            if self.split is not None:
                self.split.remove()
        return StepResult(sum(losses) / self.m, losses, self.stage, self.trace)

    def run(self, action: Action) -> None:
        """Runs one action, or keeps a W for later (see "Late weight passes" above)."""
        if action.op == "W" and self.max_late_w > 0:
            self.late_w.append(action)
            if len(self.late_w) > self.max_late_w:
                self.run_late_w()
            return
        if action.is_compute:
            self.flush()
            while self.late_w and not self.data_ready(action):
                self.run_late_w()  # fill the wait with work nobody waits for
        getattr(self, action.op.lower())(action)
        self.reap_sends()

    def run_late_w(self) -> None:
        self.flush()  # a gradient sent just before must not wait behind the W
        self.w(self.late_w.pop(0))
        self.reap_sends()

    def data_ready(self, a: Action) -> bool:
        """Whether the data of computation ``a`` is in (without waiting)."""
        if a.op == "F" and not self.first and a.micro_batch in self.headers:
            if not self.headers[a.micro_batch][1].done.is_set():
                return False
            if self.links.nccl:
                return True  # its payload is posted by F itself, right behind the header
            posted = self.acts_in.get(a.micro_batch)  # absent if posting failed: F raises the error
            return posted is None or posted[0][0].done.is_set()
        if a.op == "B" and not self.last and a.micro_batch in self.grads_in:
            slot = self.grads_in[a.micro_batch][0]
            return slot[0] is not None and slot[0].done.is_set()
        return True

    # communication -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Posts the queued sends and receives: on NCCL as one batch, on gloo the sends from the send
        thread (a send copies its data in the call) and the receives from here."""
        if self.links.nccl:
            works = self.links.post([op for op, _, _ in self.batch])
            for (op, slot, waiter), work in zip(self.batch, works):
                if op.op is dist.isend:
                    self.sends.append((self.send_waiter.submit(work), op.tensor))
                else:
                    slot[0] = waiter.submit(work)  # waited on its own thread from now on
        else:
            for op, slot, waiter in self.batch:
                post = functools.partial(op.op, op.tensor, op.peer, op.group, op.tag)
                if op.op is dist.isend:
                    self.sends.append((self.send_waiter.post(post), op.tensor))
                else:
                    slot[0] = waiter.submit(post())
        self.batch = []

    def queue(self, op, tensor: torch.Tensor, peer_stage: int, tag: str, mb: int) -> list:
        slot = [None]
        p2p = dist.P2POp(op, tensor, self.links.peer(peer_stage), self.links.group, mb * len(TAGS) + TAGS[tag])
        self.batch.append((p2p, slot, self.act_waiter if tag == "ACT" else self.grad_waiter))
        return slot

    def send_act(self, a: Action) -> None:
        out = self.outputs.pop(a.micro_batch)
        header = make_header(out)
        work = dist.isend(header, self.links.peer(a.peer), self.links.header_group,
                          a.micro_batch * len(TAGS) + TAGS["ACT_HEADER"])
        self.sends.append((self.send_waiter.submit(work), header))
        self.queue(dist.isend, out, a.peer, "ACT", a.micro_batch)

    def post_headers(self) -> None:
        """Posts the header receive of every activation this stage will get, at the step's start: a
        header is a few bytes. On gloo the header's thread then posts the payload's receive as soon as
        the header is in, so the payload flows while this stage computes (gloo sends a payload only
        once its receive is posted). NCCL matches by order: there the payload's receive is posted
        by this thread, when its F needs it."""
        if self.first:
            return
        peer = self.links.peer(self.stage - 1)
        for mb in range(self.m):
            header = torch.empty(2 + MAX_DIMS, dtype=torch.int64)
            work = dist.irecv(header, peer, self.links.header_group, mb * len(TAGS) + TAGS["ACT_HEADER"])
            then = None if self.links.nccl else functools.partial(self.post_payload, mb, peer, header)
            self.early_headers[mb] = (self.header_waiter.submit(work, then), header)

    def post_payload(self, mb: int, peer: int, header: torch.Tensor) -> None:
        """Runs on the header thread (gloo): the activation's receive, posted and handed to its waiter."""
        shape, dtype = read_header(header)
        buf = torch.empty(shape, dtype=dtype, device=self.links.device)
        work = dist.irecv(buf, peer, self.links.group, mb * len(TAGS) + TAGS["ACT"])
        self.acts_in[mb] = ([self.act_waiter.submit(work)], buf)

    def recv_act(self, a: Action) -> None:
        if a.micro_batch not in self.early_headers:
            raise RuntimeError(f"stage {self.stage} has no activation {a.micro_batch} to receive from stage "
                               f"{a.peer}; the schedule is broken")
        self.headers[a.micro_batch] = (a.peer,) + self.early_headers.pop(a.micro_batch)

    def send_grad(self, a: Action) -> None:
        grad = self.grads_out.pop(a.micro_batch)
        self.queue(dist.isend, grad, a.peer, "GRAD", a.micro_batch)

    def recv_grad(self, a: Action) -> None:
        shape, dtype = self.out_meta.pop(a.micro_batch)
        buf = torch.empty(shape, dtype=dtype, device=self.links.device)
        self.grads_in[a.micro_batch] = (self.queue(dist.irecv, buf, a.peer, "GRAD", a.micro_batch), buf)

    def reap_sends(self) -> None:
        """Drops sent tensors as their sends complete, freeing sent outputs."""
        still = []
        for pending, tensor in self.sends:
            if pending.done.is_set():
                self.links.wait_pending(pending)  # raises if the send failed, naming a failed peer
            else:
                still.append((pending, tensor))
        self.sends = still

    def receive_activation(self, mb: int) -> torch.Tensor:
        if mb not in self.headers:
            raise RuntimeError(f"stage {self.stage} runs F{mb} without a RECV_ACT for it; the schedule is broken")
        peer, pending, header = self.headers.pop(mb)
        self.links.wait_pending(pending)  # on gloo, also the payload's receive posted
        if self.links.nccl:
            shape, dtype = read_header(header)
            buf = torch.empty(shape, dtype=dtype, device=self.links.device)
            self.acts_in[mb] = (self.queue(dist.irecv, buf, peer, "ACT", mb), buf)
            self.flush()
        slot, buf = self.acts_in.pop(mb)
        self.links.wait_pending(slot[0])
        return buf.requires_grad_()

    # computation ---------------------------------------------------------------------------------
    def f(self, a: Action) -> None:
        mb, t0 = a.micro_batch, time.perf_counter()
        if self.first:
            x = self.micro_batches[mb][0].to(self.links.device)
        else:
            x = self.inputs[mb] = self.receive_activation(mb)
        start = time.perf_counter()
        if self.split is not None:
            self.split.recording = self.deferred[mb] = []
        try:
            out = self.module(x)
        finally:
            if self.split is not None:
                self.split.recording = None
        if self.last:
            loss = self.loss_fn(out, self.micro_batches[mb][1])
            self.losses[mb] = loss.detach()
            self.roots[mb] = loss / self.m  # the one place the loss is scaled
        else:
            self.roots[mb] = get_gradient_edge(out)
            self.out_meta[mb] = (out.shape, out.dtype)
            self.outputs[mb] = out.detach()
        self.trace.append(TraceEvent("F", mb, start, time.perf_counter(), start - t0))

    def b(self, a: Action) -> None:
        mb, t0 = a.micro_batch, time.perf_counter()
        grad = None
        if not self.last:
            slot, grad = self.grads_in.pop(mb)
            self.links.wait_pending(slot[0])
        start = time.perf_counter()
        root = self.roots.pop(mb)
        grads = None if grad is None else [grad]
        if self.split is not None:
            # W needs the graph again only when it goes back through the Linear outputs' edges
            x = self.inputs[mb]
            torch.autograd.backward([root], grads, retain_graph=not self.split.keep_inputs,
                                    inputs=[x] + self.split.early_params)
        else:
            torch.autograd.backward([root], grads)
        if not self.first:
            self.grads_out[mb] = self.inputs.pop(mb).grad
        self.trace.append(TraceEvent("B", mb, start, time.perf_counter(), start - t0))

    def w(self, a: Action) -> None:
        slots = self.deferred.pop(a.micro_batch, None)
        if not slots:
            return  # stage 0's B already computed its weight gradients
        start = time.perf_counter()
        missing = [s for s in slots if s.grad is None]
        if missing:
            raise RuntimeError(f"stage {self.stage}: {len(missing)} Linear outputs got no gradient in B"
                               f"{a.micro_batch}; ZB-H1 needs every Linear on the path to the stage input")
        if self.split.keep_inputs:
            # one GEMM per Linear, then one autograd call that accumulates every gradient into .grad
            # (so post-accumulate-grad hooks fire as in a whole backward)
            pairs = [pair for slot in slots for pair in slot.weight_grads()]
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        else:
            # NOTE: one backward per Linear, reaching only its own weights: from all outputs at once the
            # engine would also carry each output's gradient on through earlier layers to their weights.
            for slot in slots:
                torch.autograd.backward([slot.edge], [slot.grad], inputs=slot.params)
        self.trace.append(TraceEvent("W", a.micro_batch, start, time.perf_counter()))

    def share_losses(self) -> list[float]:
        """Every micro-batch loss, broadcast from the last stage so every rank can log them."""
        losses = torch.zeros(self.m, dtype=torch.float64, device=self.links.device)
        if self.last:
            losses.copy_(torch.stack([self.losses[i].double() for i in range(self.m)]))
        work = dist.broadcast(losses, self.links.peer(self.sched.num_stages - 1), self.links.group, async_op=True)
        self.links.wait(work)
        return losses.tolist()


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


def p2p_latency(shape: Sequence[int], dtype: torch.dtype = torch.float32, rounds: int = 10, group=None,
                device: torch.device | str = "cpu") -> float:
    """One-way seconds for an activation of ``shape`` with its header, between ranks 0 and 1 of ``group``
    (a collective for those two: both call it; other ranks return 0)."""
    rank = dist.get_rank(group)
    if rank > 1:
        return 0.0
    peer = dist.get_global_rank(group, 1 - rank) if group is not None else 1 - rank
    payload = torch.zeros(shape, dtype=dtype, device=device)
    header = make_header(payload)
    start = time.perf_counter()
    for _ in range(rounds):
        for sender in (0, 1):
            for t in (header, payload):
                (dist.send if rank == sender else dist.recv)(t, peer, group)
    return (time.perf_counter() - start) / (2 * rounds)
