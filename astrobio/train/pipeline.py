"""Pipeline-parallel training: ``--pipeline-stages N --schedule 1f1b|gpipe|zb-h1`` (docs/TRAINING.md).

``run_pipeline`` starts the ranks with ``astrobio.parallel.launch.launch`` (spawned here, gloo on the
CPU and NCCL on GPUs; or one rank per process under ``torchrun``), and every rank runs the same
``Trainer`` loop over its own stage:

- ``Ranks`` is what the trainer needs from the job: this rank's stage, collectives that stop when a
  peer fails (through the launcher's ``FaultGuard``), and the global gradient norm (an all-reduce of
  the stages' squared norms). ``SingleProcess`` is the same interface for one stage.
- ``PipelineStepRunner`` (a ``StepRunner``) runs one step's micro-batches through the schedule with
  ``astrobio.parallel.executor.run_pipeline_step`` (every rank reads the same micro-batches from an
  identical loader: stage 0 uses the inputs, the last stage the targets), returns the loss on every
  rank, keeps the step's trace for the measured bubble, and evaluates forward-only through the stages.
  In a multimodal run the micro-batches are MultimodalBatch: stage 0 runs the prefix encoders before its
  layers (``PrefixedStage``; the encoders and their optimizer state live on stage 0 only) and the last
  stage's loss covers the token positions.

Only rank 0 writes metrics, plots and the summary; checkpoints are written in parts, one per stage
(astrobio.train.checkpoint), and load with any number of stages (the prefix encoders' weights go with rank
0's training state, as with one stage).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist
from torch import nn

from astrobio.model.stages import PrefixedStage
from astrobio.train.config import TrainConfig


class SingleProcess:
    """One stage in this process: the collectives are identities."""

    stage, world_size, is_main, guard = 0, 1, True, None

    def sum_across(self, value: float) -> float:
        return value

    def gather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


class Ranks:
    """This rank's place in the pipeline job, and collectives that stop when a peer fails."""

    def __init__(self, ctx):
        self.ctx, self.guard = ctx, ctx.guard
        self.stage, self.world_size = ctx.rank, ctx.world_size
        self.is_main = ctx.rank == 0

    def wait(self, work) -> None:
        self.guard.wait(work)

    def sum_across(self, value: float) -> float:
        """The sum of ``value`` over the ranks (fp64), the same on every rank."""
        total = torch.tensor([value], dtype=torch.float64, device=self.ctx.device)
        self.wait(dist.all_reduce(total, async_op=True))
        return total.item()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        self.guard.check()
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.wait(dist.barrier(async_op=True))


class PipelineStepRunner:
    """This rank's stage of the model, run by the schedule; see the module docstring."""

    def __init__(self, stage: nn.Module, ranks: Ranks, schedule: str, device: torch.device, mixed_precision: bool,
                 loss_fn, prefix: nn.Module | None = None, prefix_len: int = 0):
        self.stage, self.ranks, self.schedule = stage, ranks, schedule
        self.device, self.mixed_precision, self.loss_fn = device, mixed_precision, loss_fn
        self.first, self.last = ranks.stage == 0, ranks.stage == ranks.world_size - 1
        self.prefix_len = prefix_len
        self.module = stage if prefix is None else PrefixedStage(stage, prefix)
        self.wire_dtype = next(stage.parameters()).dtype  # activations between stages in evaluate
        self.trace: list = []

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)

    def pairs(self, batches: list) -> list:
        """(inputs, targets) per micro-batch: a MultimodalBatch is its own input (stage 0 reads its tokens,
        catalogue rows and graphs) and gives its targets to the last stage."""
        return [(batch, batch.targets) for batch in batches] if self.prefix_len else list(batches)

    def forward_backward(self, micro_batches: list) -> float:
        from astrobio.parallel.executor import run_pipeline_step
        self.module.train()
        with self.autocast():
            result = run_pipeline_step(self.module, self.schedule, self.pairs(micro_batches), self.target_loss,
                                       guard=self.ranks.guard, device=self.device)
        self.trace = result.trace
        return result.loss

    def target_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-batch's mean loss; with a prefix, over the token positions only."""
        if self.prefix_len:
            from astrobio.model.encoders import prefix_lm_loss
            return prefix_lm_loss(output, targets.to(self.device), self.prefix_len)
        return self.loss_fn(output, targets.to(self.device))

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        """Forward only: each batch's activations (prefix + tokens positions) go stage to stage in the
        weights' dtype, the last stage averages the losses and rank 0 gets the mean."""
        self.module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        width = self.stage.config.d_model
        for inputs, targets in self.pairs(batches):
            if self.first:
                x = inputs.to(self.device)
            else:
                shape = (targets.shape[0], self.prefix_len + targets.shape[1], width)
                x = torch.empty(shape, dtype=self.wire_dtype, device=self.device)
                self.ranks.wait(dist.irecv(x, self.ranks.stage - 1))
            with self.autocast():
                out = self.module(x)
            if self.last:
                total += self.target_loss(out, targets).double()
            else:
                self.ranks.wait(dist.isend(out.to(self.wire_dtype).contiguous(), self.ranks.stage + 1))
        self.ranks.wait(dist.broadcast(total, self.ranks.world_size - 1, async_op=True))
        return (total / len(batches)).item()

    def gather_traces(self) -> list:
        """Every stage's trace of the last step (a collective)."""
        return self.ranks.gather(self.trace)


def bubble_of(traces: list) -> float:
    from astrobio.parallel.executor import measured_bubble
    return measured_bubble(traces)


def plot_pipeline(traces: list, path, config: TrainConfig):
    """plots/pipeline.png: H5's Gantt chart of one step's traces, with the bubble the schedule would have
    at the measured compute costs (astrobio.parallel.gantt)."""
    from astrobio.parallel.executor import simulated_bubble
    from astrobio.parallel.gantt import render_gantt
    from astrobio.parallel.schedules import schedule
    stages, micro_batches = config.pipeline_stages, config.gradient_accumulation_steps
    simulated = simulated_bubble(schedule(config.schedule, stages, micro_batches), traces)
    return render_gantt(traces, path, f"{config.schedule}, {stages} stages x {micro_batches} micro-batches", simulated)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_main(ctx, config: TrainConfig, data, resume_path: str | None) -> dict | None:
    """One rank of the job: the trainer over this rank's stage; rank 0 returns the summary."""
    from astrobio.train.trainer import Trainer, load_resume
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the launcher's SIG_IGN is inherited
    trainer = Trainer(config, data, ctx.device, Ranks(ctx))
    if resume_path is not None:
        trainer.load(load_resume(config, resume_path))
    elif ctx.rank == 0:
        trainer.logger.truncate_after(-1)
    return trainer.train()


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 when started plainly)."""
    from astrobio.parallel.launch import under_torchrun
    return int(os.environ["RANK"]) if under_torchrun() else 0


def run_pipeline(config: TrainConfig, prepared) -> dict | None:
    """Starts (or, under torchrun, joins) the job; returns rank 0's summary (None on other ranks)."""
    from astrobio.parallel.launch import launch
    from astrobio.train.trainer import resolve_device
    config, data, resume = prepared
    with interrupts_left_to_ranks():
        results = launch(rank_main, config.pipeline_stages, args=(config, data, str(resume.path) if resume else None),
                         backend=backend_for(resolve_device(config)), timeout_s=config.pipeline_timeout)
    return results.get(0)


@contextlib.contextmanager
def interrupts_left_to_ranks():
    """Ctrl-C reaches every process of the terminal's group: the spawned ranks agree to stop after the
    same step and checkpoint (exit 130), so the launching process ignores SIGINT meanwhile rather than
    tear them down. (Under torchrun, torchrun handles it.)"""
    from astrobio.parallel.launch import under_torchrun
    if under_torchrun() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

