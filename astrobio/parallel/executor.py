"""Runs one stage's actions of a pipeline schedule over torch.distributed point-to-point.

``run_pipeline_step(stage_module, schedule, micro_batches, loss_fn)`` is one optimizer step's forward
and backward on this rank (stage = rank in ``group``); gradients accumulate into the stage's ``.grad``
exactly as ``(sum_i loss_i / m).backward()`` would in one process. It returns every micro-batch's loss
(on every rank) and this rank's measured trace (astrobio.parallel.trace).

Each action of the schedule goes to one method: ``F`` to ``forward``, ``B`` to ``backward``, ``W`` to
``weight_pass``, and the communication actions to the stage's ``StageTransport``
(astrobio.parallel.transport), which posts them without blocking; ``F`` waits for its activation and
``B`` for its gradient. A stage keeps only the autograd edge of an output it sent: once the send
completes the output's memory is released.

The last stage's loss. By default the last stage's ``F`` runs ``loss_fn(stage_module(input), targets)``.
With ``loss_from_input`` given it runs ``loss_from_input(input, targets)`` instead: the stage's forward
and its loss in one call, for a stage that computes its loss without ever returning its whole output
(a language model's chunked cross-entropy, which never builds the fp32 logits). The executor does not
care which module or loss it runs.

Backward. With ``gpipe`` and ``1f1b``, ``B`` runs the whole backward. With ``zb-h1`` (on every stage
that has an input to differentiate), ``B`` runs the backward to the stage input and ``W`` the weight
gradients of the ``nn.Linear`` modules (astrobio.parallel.weight_pass). Activation checkpointing
(``stage_module.gradient_checkpointing``) works with every schedule.

Late weight passes (ZB-H1). Nobody waits for a ``W``, so the executor may run one later than its
place in the schedule: a reached ``W`` waits while the next computation's data is in, and runs when
that data is not (filling what would be idle time) or when more than ``max_late_weight_passes`` are
waiting. A ``W`` never runs earlier than the schedule says, and at most that many extra
micro-batches' Linear inputs and output gradients are held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge

from astrobio.parallel.faults import FaultGuard
from astrobio.parallel.schedules import Action, Schedule, schedule as make_schedule
from astrobio.parallel.trace import TraceEvent
from astrobio.parallel.transport import StageTransport
from astrobio.parallel.weight_pass import LinearCall, WeightSplit

# NOTE: re-exported for the importers that still use this module's path for them (astrobio/train/pipeline.py,
# benchmarks/bench_pipeline.py); new code imports them from astrobio.parallel.
from astrobio.parallel.trace import gather_traces, measured_bubble, simulated_bubble  # noqa: F401
from astrobio.parallel.transport import p2p_latency  # noqa: F401

# a W may run after later computations (one micro-batch's Linear inputs and output gradients held longer)
MAX_LATE_WEIGHT_PASSES = 1


@dataclass
class StepResult:
    loss: float  # sum of the micro-batch losses / m, on every rank
    micro_batch_losses: list[float]
    stage: int
    trace: list[TraceEvent] = field(default_factory=list)


def run_pipeline_step(stage_module: nn.Module, schedule: Schedule | str,
                      micro_batches: Sequence[tuple[Any, Any]], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                      *, group: dist.ProcessGroup | None = None, guard: FaultGuard | None = None,
                      device: torch.device | None = None, on_action: Callable[[Action], None] | None = None,
                      max_late_weight_passes: int = MAX_LATE_WEIGHT_PASSES,
                      loss_from_input: Callable[[Any, Any], torch.Tensor] | None = None) -> StepResult:
    """One step of this rank's stage.

    ``micro_batches[i]`` is ``(inputs, targets)``: stage 0 reads the inputs (token ids), the last stage
    the targets (passed to ``loss_fn(output, targets)``, which returns the micro-batch's mean loss);
    other entries may be None. ``schedule`` is a Schedule or a kind (``gpipe``, ``1f1b``, ``zb-h1``).
    ``guard`` (the ``FaultGuard`` of astrobio.parallel.launch's RankContext) makes every wait stop when
    another rank fails. ``on_action`` is called before each action (tracing, fault injection in tests),
    in the schedule's order. ``max_late_weight_passes``: how many ``W`` may wait past their place in the
    schedule for a moment when the stage would otherwise wait for data (0: every ``W`` exactly where
    the schedule puts it). ``loss_from_input(input, targets)``: on the last stage, the micro-batch's mean
    loss straight from the stage's input, in place of ``loss_fn(stage_module(input), targets)`` (then
    ``loss_fn`` may be None)."""
    if max_late_weight_passes < 0:
        raise ValueError(f"max_late_weight_passes must be >= 0, got {max_late_weight_passes}")
    stage, world = dist.get_rank(group), dist.get_world_size(group)
    m = len(micro_batches)
    sched = make_schedule(schedule, world, m) if isinstance(schedule, str) else schedule
    if sched.num_stages != world or sched.num_micro_batches != m:
        raise ValueError(f"schedule is for {sched.num_stages} stages x {sched.num_micro_batches} micro-batches, "
                         f"but the group has {world} ranks and {m} micro-batches were given")
    if stage == world - 1 and loss_fn is None and loss_from_input is None:
        raise ValueError("the last stage needs loss_fn(output, targets) or loss_from_input(input, targets) "
                         "for its loss")
    device = device or next(stage_module.parameters()).device
    transport = StageTransport(group, guard, device, stage, m)
    return _StageRun(stage_module, sched, stage, micro_batches, loss_fn, transport, on_action,
                     max_late_weight_passes, loss_from_input).execute()


class _StageRun:
    """One step of one stage: the schedule's actions in order, and what they leave for later ones."""

    def __init__(self, module, sched: Schedule, stage: int, micro_batches, loss_fn, transport: StageTransport,
                 on_action, max_late_weight_passes: int, loss_from_input=None):
        self.module, self.sched, self.stage = module, sched, stage
        self.loss_from_input = loss_from_input
        self.micro_batches, self.loss_fn, self.transport, self.on_action = micro_batches, loss_fn, transport, on_action
        self.m = sched.num_micro_batches
        self.first, self.last = stage == 0, stage == sched.num_stages - 1
        self.split = WeightSplit(module) if sched.split_backward and not self.first else None
        self.handlers: dict[str, Callable[[Action], None]] = {
            "F": self.forward, "B": self.backward, "W": self.weight_pass,
            "SEND_ACT": self.send_activation, "RECV_ACT": self.expect_activation,
            "SEND_GRAD": self.send_gradient, "RECV_GRAD": self.expect_gradient}
        self.inputs: dict[int, torch.Tensor] = {}  # received activations (leaves), until their B
        self.roots: dict[int, Any] = {}  # scaled loss, or the edge of the output sent on
        self.outputs: dict[int, torch.Tensor] = {}  # detached outputs waiting for SEND_ACT
        self.output_meta: dict[int, tuple] = {}  # shape and dtype of each output, for its gradient
        self.input_grads: dict[int, torch.Tensor] = {}  # waiting for SEND_GRAD
        self.linear_calls: dict[int, list[LinearCall]] = {}  # ZB-H1: from F to W
        self.late_weight_passes: list[Action] = []  # W's whose place in the schedule has passed, oldest first
        self.max_late = max_late_weight_passes if self.split is not None else 0
        self.losses: dict[int, torch.Tensor] = {}
        self.trace: list[TraceEvent] = []

    def execute(self) -> StepResult:
        try:
            if not self.first:
                self.transport.post_activation_headers(self.stage - 1)
            for action in self.sched.actions[self.stage]:
                if self.on_action is not None:
                    self.on_action(action)
                self.run(action)
            while self.late_weight_passes:
                self.run_late_weight_pass()
            self.transport.drain()
            losses = self.share_losses()
        finally:
            self.transport.close()
            if self.split is not None:
                self.split.remove()
        return StepResult(sum(losses) / self.m, losses, self.stage, self.trace)

    def run(self, action: Action) -> None:
        """Runs one action, or keeps a W for later (see "Late weight passes" above)."""
        if action.op == "W" and self.max_late > 0:
            self.late_weight_passes.append(action)
            if len(self.late_weight_passes) > self.max_late:
                self.run_late_weight_pass()
            return
        if action.is_compute:
            self.transport.flush()
            while self.late_weight_passes and not self.data_ready(action):
                self.run_late_weight_pass()  # fill the wait with work nobody waits for
        self.handlers[action.op](action)
        self.transport.reap_sends()

    def run_late_weight_pass(self) -> None:
        self.transport.flush()  # a gradient sent just before must not wait behind the W
        self.weight_pass(self.late_weight_passes.pop(0))
        self.transport.reap_sends()

    def data_ready(self, a: Action) -> bool:
        """Whether the data of computation ``a`` is in (without waiting)."""
        if a.op == "F":
            return self.transport.activation_ready(a.micro_batch)
        if a.op == "B":
            return self.transport.gradient_ready(a.micro_batch)
        return True

    # communication: handed to the transport, with what the computations left for it ----------------
    def send_activation(self, a: Action) -> None:
        self.transport.send_activation(a.micro_batch, self.outputs.pop(a.micro_batch), a.peer)

    def expect_activation(self, a: Action) -> None:
        self.transport.expect_activation(a.micro_batch, a.peer)

    def send_gradient(self, a: Action) -> None:
        self.transport.send_gradient(a.micro_batch, self.input_grads.pop(a.micro_batch), a.peer)

    def expect_gradient(self, a: Action) -> None:
        shape, dtype = self.output_meta.pop(a.micro_batch)
        self.transport.expect_gradient(a.micro_batch, shape, dtype, a.peer)

    # computation ---------------------------------------------------------------------------------
    def forward(self, a: Action) -> None:
        mb, t0 = a.micro_batch, time.perf_counter()
        if self.first:
            x = self.micro_batches[mb][0].to(self.transport.device)
        else:
            x = self.inputs[mb] = self.transport.receive_activation(mb).requires_grad_()
        start = time.perf_counter()
        if self.split is not None:
            self.split.recording = self.linear_calls[mb] = []
        try:
            if self.last:
                targets = self.micro_batches[mb][1]
                if self.loss_from_input is not None:
                    loss = self.loss_from_input(x, targets)
                else:
                    loss = self.loss_fn(self.module(x), targets)
            else:
                out = self.module(x)
        finally:
            if self.split is not None:
                self.split.recording = None
        if self.last:
            self.losses[mb] = loss.detach()
            self.roots[mb] = loss / self.m  # the one place the loss is scaled
        else:
            self.roots[mb] = get_gradient_edge(out)
            self.output_meta[mb] = (out.shape, out.dtype)
            self.outputs[mb] = out.detach()
        self.trace.append(TraceEvent("F", mb, start, time.perf_counter(), start - t0))

    def backward(self, a: Action) -> None:
        mb, t0 = a.micro_batch, time.perf_counter()
        grad = None if self.last else self.transport.receive_gradient(mb)
        start = time.perf_counter()
        root = self.roots.pop(mb)
        if self.split is not None:
            self.split.input_backward(root, grad, self.inputs[mb], self.linear_calls.get(mb, []))
        else:
            torch.autograd.backward([root], None if grad is None else [grad])
        if not self.first:
            self.input_grads[mb] = self.inputs.pop(mb).grad
        self.trace.append(TraceEvent("B", mb, start, time.perf_counter(), start - t0))

    def weight_pass(self, a: Action) -> None:
        calls = self.linear_calls.pop(a.micro_batch, None)
        if not calls:
            return  # stage 0's B already computed its weight gradients
        start = time.perf_counter()
        missing = [call for call in calls if call.grad is None]
        if missing:
            raise RuntimeError(f"stage {self.stage}: {len(missing)} Linear outputs got no gradient in B"
                               f"{a.micro_batch}; ZB-H1 needs every Linear on the path to the stage input")
        self.split.weight_backward(calls)
        self.trace.append(TraceEvent("W", a.micro_batch, start, time.perf_counter()))

    def share_losses(self) -> list[float]:
        """Every micro-batch loss, broadcast from the last stage so every rank can log them."""
        losses = torch.zeros(self.m, dtype=torch.float64, device=self.transport.device)
        if self.last:
            losses.copy_(torch.stack([self.losses[i].double() for i in range(self.m)]))
        last = self.transport.peer(self.sched.num_stages - 1)
        self.transport.wait(dist.broadcast(losses, last, self.transport.group, async_op=True))
        return losses.tolist()
