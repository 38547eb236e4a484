"""Multi-process training: ``--pipeline-stages N --schedule 1f1b|gpipe|zb-h1`` and ``--data-parallel K``
(docs/TRAINING.md, docs/SCALING.md).

The entry point (astrobio.train.entry) starts the ranks with ``astrobio.parallel.launch.launch`` (spawned
there, gloo on the CPU and NCCL on GPUs; or one rank per process under ``torchrun``), and every rank runs
the same loop over its own stage with this module's parts, the counterparts of astrobio.train.local's:

- ``Ranks``: the rank layout, what the trainer needs from the job: this rank's replica and stage on the
  ("dp", "pp") mesh (astrobio.parallel.replicas), collectives that stop when a peer fails (through the
  launcher's ``FaultGuard``), the global gradient norm (an all-reduce of the stages' squared norms over
  the replica's pipeline: the replicas hold the same averaged gradients), the step's loss averaged
  over the replicas, and the reducer that averages the gradients over them.
- ``PipelineStepRunner`` (a ``StepRunner``) runs one step's micro-batches through the schedule with
  ``astrobio.parallel.executor.run_pipeline_step`` (every rank reads the same micro-batches from an
  identical loader: stage 0 uses the inputs, the last stage the targets), returns the loss on every
  rank, keeps the step's trace for the measured bubble, and evaluates forward-only through the stages.
  In a multimodal run the micro-batches are MultimodalBatch: stage 0 runs the prefix encoders before its
  layers (``PrefixedStage``; the encoders and their optimizer state live on stage 0 only) and the last
  stage's loss covers the token positions.
- ``StagedCheckpoint``: checkpoints in parts, one per stage, written by replica 0 (astrobio.train.checkpoint);
  they load with any number of stages and replicas (the prefix encoders' weights go with rank 0's
  training state, as with one stage).

Only rank 0 writes metrics, plots and the summary; its figures and per-stage records are replica 0's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from astrobio.model.stages import PrefixedStage
from astrobio.parallel.replicas import GradientReducer, Layout, mesh
from astrobio.train.checkpoint import CheckpointError, Checkpointer, optimizer_part, write_part, write_rank_part
from astrobio.train.timeline import DEVICE, HOST, StepTimeline

# the schedule's computations as phases of the step breakdown (W: the weight-gradient half of backward)
TRACE_PHASES = {"F": "forward", "B": "backward", "W": "backward"}


class Ranks:
    """This rank's place in the job (``replicas`` x the stages), and collectives that stop when a peer
    fails."""

    def __init__(self, ctx, replicas: int = 1):
        if ctx.world_size % replicas:
            raise ValueError(f"{ctx.world_size} ranks do not split into {replicas} replicas")
        self.ctx, self.guard = ctx, ctx.guard
        self.layout = Layout(replicas, ctx.world_size // replicas)
        self.mesh = mesh(self.layout, ctx.device.type)
        self.pipeline = self.mesh.get_group("pp")  # this replica's stages: activations, gradients, the norm
        self.replica_group = self.mesh.get_group("dp")  # this stage in every replica: the gradients' average
        self.stage, self.stages = self.mesh.get_local_rank("pp"), self.layout.stages
        self.replica, self.replicas = self.mesh.get_local_rank("dp"), replicas
        self.optimizer_group = self.optimizer_replica_group()
        self.is_main = ctx.rank == 0
        self.transport_device = ctx.device  # where the backend's tensors live: the GPU with NCCL, else the host
        if ctx.backend == "nccl":  # the activations' headers go over gloo beside NCCL: made here, by every rank
            from astrobio.parallel.transport import make_side_gloo_groups
            make_side_gloo_groups(self.pipeline, [self.layout.pipeline_ranks(r) for r in range(replicas)])

    def optimizer_replica_group(self):
        """This stage's replicas again, as a group of the offload engine's own (None: one replica): the
        engine issues its collectives from a thread of its own, and those must never interleave with the
        loop's on one group (e.g. the loss's mean during the next step's all-gathers of weights).
        ``dist.new_group`` is collective over the world: every rank makes every stage's group, in order."""
        if self.replicas == 1:
            return None
        groups = [dist.new_group([r for r in range(self.layout.world_size) if self.layout.stage_of(r) == stage])
                  for stage in range(self.stages)]
        return groups[self.stage]

    def wait(self, work) -> None:
        self.guard.wait(work)

    def peer(self, stage: int) -> int:
        """The global rank of ``stage`` of this replica."""
        return dist.get_global_rank(self.pipeline, stage)

    def all_reduce(self, value: float, group) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.ctx.device)
        self.wait(dist.all_reduce(total, group=group, async_op=True))
        return total.item()

    def sum_across(self, value: float) -> float:
        """The sum of ``value`` over this replica's stages (fp64), the same on every rank."""
        return self.all_reduce(value, self.pipeline)

    def global_norm(self, local_norm: float) -> float:
        """The whole model's L2 norm from this stage's."""
        return math.sqrt(self.sum_across(local_norm * local_norm))

    def replica_mean(self, value: float) -> float:
        """The mean of ``value`` over the replicas (e.g. the step's loss), the same on every rank."""
        if self.replicas == 1:
            return value
        return self.all_reduce(value, self.replica_group) / self.replicas

    def gradient_reducer(self, params: list[nn.Parameter]) -> GradientReducer | None:
        """What averages this stage's gradients over the replicas (None: one replica)."""
        return GradientReducer(params, self.replica_group, self.wait) if self.replicas > 1 else None

    def gather(self, obj) -> list:
        """Every stage's ``obj`` (of this replica), on every rank."""
        self.guard.check()
        out: list = [None] * self.stages
        dist.all_gather_object(out, obj, group=self.pipeline)
        return out

    def gather_all(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        self.guard.check()
        out: list = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.wait(dist.barrier(async_op=True))


class HostBoundary(nn.Module):
    """A stage computing on ``device`` whose neighbours talk to it through host memory (gloo, e.g. two
    ranks sharing one GPU): what it receives moves to the device, what it sends (all but the last stage's
    output, which feeds the loss here) goes back to the host; autograd moves the gradients the same way."""

    def __init__(self, stage: nn.Module, device: torch.device, output_to_host: bool):
        super().__init__()
        self.stage, self.device, self.output_to_host = stage, device, output_to_host

    @property
    def gradient_checkpointing(self) -> bool:  # read by the executor's weight pass
        return getattr(self.stage, "gradient_checkpointing", False)

    def forward(self, x):
        out = self.stage(x.to(self.device))
        return out.to("cpu") if self.output_to_host else out

    def loss(self, x, targets):  # the last stage's loss from its input (PipelineStepRunner.target_loss)
        return self.stage.loss(x.to(self.device), targets)


class PipelineStepRunner:
    """This rank's stage of the model, run by the schedule; see the module docstring."""

    def __init__(self, stage: nn.Module, ranks: Ranks, schedule: str, device: torch.device, mixed_precision: bool,
                 prefix: nn.Module | None = None, prefix_len: int = 0, timeline: StepTimeline | None = None):
        self.stage, self.ranks, self.schedule = stage, ranks, schedule
        self.device, self.mixed_precision = device, mixed_precision
        self.first, self.last = ranks.stage == 0, ranks.stage == ranks.stages - 1
        self.prefix_len = prefix_len
        self.module = stage if prefix is None else PrefixedStage(stage, prefix)
        self.transport_device = ranks.transport_device
        if self.transport_device != device:
            self.module = HostBoundary(self.module, device, output_to_host=not self.last)
        self.wire_dtype = next(stage.parameters()).dtype  # activations between stages in evaluate
        self.trace: list = []
        self.micro_batches = 0
        self.last_traces: list | None = None
        self.timeline = timeline or StepTimeline(device, ranks.stage)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)

    def pairs(self, batches: list) -> list:
        """(inputs, targets) per micro-batch: a MultimodalBatch is its own input (stage 0 reads its tokens,
        catalogue rows and graphs) and gives its targets to the last stage."""
        return [(batch, batch.targets) for batch in batches] if self.prefix_len else list(batches)

    def forward_backward(self, micro_batches: list) -> float:
        from astrobio.parallel.executor import run_pipeline_step
        self.module.train()
        start = time.perf_counter()
        with self.autocast():
            result = run_pipeline_step(self.module, self.schedule, self.pairs(micro_batches), None,
                                       group=self.ranks.pipeline, guard=self.ranks.guard,
                                       device=self.transport_device, loss_from_input=self.target_loss)
        self.add_to_timeline(result.trace, start, time.perf_counter())
        self.trace, self.micro_batches = result.trace, len(micro_batches)
        return result.loss

    def add_to_timeline(self, trace: list, start: float, end: float) -> None:
        """The trace's computations as forward/backward phases, and the time between them (waits for the
        other stages' activations and gradients, transfers, the schedule's own work) as
        ``pipeline_wait``. NOTE: the trace holds the host's wall clock, so on a GPU the device lane shows
        when the host issued the work, not when the GPU ran it."""
        cursor = start
        for event in sorted(trace, key=lambda e: e.start):
            if event.start > cursor:
                self.timeline.add(HOST, "pipeline_wait", cursor, event.start)
            for lane in (HOST, DEVICE):
                self.timeline.add(lane, TRACE_PHASES[event.op], event.start, event.end)
            cursor = max(cursor, event.end)
        if end > cursor:
            self.timeline.add(HOST, "pipeline_wait", cursor, end)

    def target_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's mean loss of a micro-batch, over the token positions, from the stage's input:
        the stage's own ``loss`` (with fused kernels the chunked cross-entropy, which never builds the logits)."""
        return self.module.loss(x, targets.to(self.device))

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        """Forward only: each batch's activations (prefix + tokens positions) go stage to stage in the
        weights' dtype, the last stage averages the losses and rank 0 gets the mean."""
        self.module.eval()
        wire = self.transport_device
        total = torch.zeros((), dtype=torch.float64, device=wire)
        width = self.stage.config.d_model
        for inputs, targets in self.pairs(batches):
            if self.first:
                x = inputs.to(wire)
            else:
                shape = (targets.shape[0], self.prefix_len + targets.shape[1], width)
                x = torch.empty(shape, dtype=self.wire_dtype, device=wire)
                self.ranks.wait(dist.irecv(x, self.ranks.peer(self.ranks.stage - 1), self.ranks.pipeline))
            with self.autocast():
                out = self.target_loss(x, targets) if self.last else self.module(x)
            if self.last:
                total += out.double().to(wire)
            else:
                self.ranks.wait(dist.isend(out.to(wire, self.wire_dtype).contiguous(), self.ranks.peer(self.ranks.stage + 1),
                                           self.ranks.pipeline))
        last = self.ranks.peer(self.ranks.stages - 1)
        self.ranks.wait(dist.broadcast(total, last, group=self.ranks.pipeline, async_op=True))
        return (total / len(batches)).item()

    def step_record(self) -> dict:
        """The measured bubble of the last step, from every stage's trace (a collective)."""
        from astrobio.parallel.trace import measured_bubble
        self.last_traces = self.ranks.gather(self.trace)
        return {"pipeline_bubble": round(measured_bubble(self.last_traces), 4)}

    def write_plots(self, directory: Path) -> None:
        """plots/pipeline.png: the Gantt chart of the last logged step's traces, with the bubble the
        schedule would have at the measured compute costs (astrobio.parallel.gantt)."""
        if self.last_traces is None:
            return
        from astrobio.parallel.trace import simulated_bubble
        from astrobio.parallel.gantt import render_gantt
        from astrobio.parallel.schedules import schedule
        stages, micro_batches = self.ranks.stages, self.micro_batches
        simulated = simulated_bubble(schedule(self.schedule, stages, micro_batches), self.last_traces)
        render_gantt(self.last_traces, directory / "pipeline.png",
                     f"{self.schedule}, {stages} stages x {micro_batches} micro-batches", simulated)


class StagedCheckpoint:
    """Each stage's part goes into the temporary directory, written by that stage's rank of replica 0
    (the replicas hold the same weights and, unless ``sharded``, the same optimizer state; a sharded
    optimizer's state goes in one part per replica: astrobio.train.checkpoint.write_rank_part); rank 0
    then writes the shared training state and the manifest, and renames (the same atomic save as with one
    stage)."""

    def __init__(self, checkpointer: Checkpointer, ranks: Ranks, sharded: bool = False):
        self.checkpointer, self.ranks, self.sharded = checkpointer, ranks, sharded

    def writes_part(self) -> bool:
        """Whether this rank writes files of its stage: replica 0, or every replica of a sharded state."""
        return self.sharded or self.ranks.replica == 0

    def write_part(self, tmp: Path, model_state: dict, optimizer_state: Callable[[], dict]) -> None:
        write_rank_part(tmp, self.ranks.stage, self.ranks.replica, model_state, optimizer_state(), self.sharded,
                        self.checkpointer.save_io)

    def check_parts(self, tmp: Path) -> None:
        """Rank 0, before the manifest: every rank's part is in ``tmp`` (on several machines the output
        directory must be one shared directory: the parts of a sharded state are written on every
        machine)."""
        stages, replicas = range(self.ranks.stages), range(self.ranks.replicas if self.sharded else 1)
        expected = [f"model-stage{s}.safetensors" for s in stages]
        expected += [f"{optimizer_part(s, r if self.sharded else None)}.json" for s in stages for r in replicas]
        missing = [name for name in expected if not (tmp / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {tmp} lacks {', '.join(missing)} after every rank wrote its part: "
                                  f"with several machines, --output-dir must be a directory all of them share "
                                  f"(e.g. NFS); see docs/SCALING.md")

    def save(self, step: int, model_state: dict, optimizer_state: Callable[[], dict],
             training_state: Callable[[], dict]) -> Path:
        ckpt, is_main = self.checkpointer, self.ranks.is_main
        tmp = ckpt.begin(step) if is_main else ckpt.root / f".tmp-step-{step}"
        self.ranks.barrier()
        if self.writes_part():
            self.write_part(tmp, model_state, optimizer_state)
        self.ranks.barrier()
        if is_main:
            self.check_parts(tmp)
            write_part(tmp, None, None, "state", training_state(), ckpt.save_io)
            ckpt.finish(tmp, step)
        self.ranks.barrier()
        return ckpt.root / f"step-{step}"
