"""The parts of a training run, each made by a small builder, and ``build_parts``, which assembles them
once for this process's place in the job:

    build_model / build_stage_model   the whole model, or this rank's pipeline stage, seeded; built on the
                                      meta device and materialised where it lives, in its dtype
                                      (astrobio.model.materialize: the same weights, no fp32 host copy)
    speed_up                          ``--kernels`` and ``--compile`` applied to the model or stage on its
                                      device (astrobio.train.speed), with what is in use
    build_prefix                      the multimodal prefix encoders of ``--modalities`` (stage 0)
    build_optimizer                   astrobio.train.optimizer: 8-bit AdamW, torch AdamW or the offload engine
    build_schedule                    linear warm-up, then cosine decay to ``--min-lr``
    the step runner, the rank layout and the checkpoint writer: one process (astrobio.train.local) or
    a rank of a multi-process job (astrobio.train.pipeline: a pipeline stage, of one of the replicas
    with data parallel; a whole model per rank under pure data parallel), chosen here and nowhere else
    the metrics logger (rank 0), the memory profiler and the step timeline (astrobio.train.timeline)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from astrobio.memory import MemoryProfiler
from astrobio.model import get_config
from astrobio.model.materialize import build_model_on, build_stage_on
from astrobio.train.checkpoint import Checkpointer
from astrobio.train.config import TrainConfig, prefix_len
from astrobio.train.data import DataBundle
from astrobio.train.local import (CheckpointWriter, LocalStepRunner, RankLayout, SingleProcess, StepRunner,
                                  WholeCheckpoint)
from astrobio.train.logging import MetricsLogger, NullLogger
from astrobio.train.memory import build_profiler, resolve_grad_accum_location, weights_dtype
from astrobio.train.optimizer import TrainingOptimizer, build_optimizer
from astrobio.train.speed import Speed, speed_up
from astrobio.train.timeline import StepTimeline


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    model = build_model_on(get_config(config.model, vocab_size=vocab_size), seed=config.seed, device=device,
                           dtype=weights_dtype(config, device))
    model.gradient_checkpointing = config.use_gradient_checkpointing
    return model


def build_stage_model(config: TrainConfig, vocab_size: int, device: torch.device, stage: int) -> tuple[nn.Module, int]:
    """This rank's pipeline stage (the whole model's initial weights and parameter names), and how many
    parameters the stages before it hold (the offload engine's rounding-seed offset)."""
    from astrobio.model import build_stage, even_split
    model_config = get_config(config.model, vocab_size=vocab_size)
    split = even_split(model_config.n_layers, config.pipeline_stages)
    module = build_stage_on(model_config, stage, split, seed=config.seed, device=device,
                            dtype=weights_dtype(config, device))
    module.gradient_checkpointing = config.use_gradient_checkpointing
    before = sum(len(list(build_stage(model_config, s, split, device="meta").parameters())) for s in range(stage))
    return module, before


def build_prefix(config: TrainConfig, device: torch.device) -> nn.Module | None:
    """The multimodal prefix encoders of ``--modalities`` (None for text alone)."""
    from astrobio.model.encoders import build_prefix as build_prefix_module
    from astrobio.model.encoders import check_modalities
    modalities = check_modalities(config.modalities)
    if not modalities:
        return None
    return build_prefix_module(get_config(config.model).d_model, modalities, seed=config.seed, device=device)


def trainable(model: nn.Module, prefix: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the optimizer updates: the model's, then the prefix's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if prefix is not None:
        named += [(f"prefix.{n}", p) for n, p in prefix.named_parameters() if p.requires_grad]
    return named


class WarmupCosine:
    """Learning rate of the step with 0-based index ``step``: linear warm-up over ``warmup`` steps to
    ``peak``, then a half cosine down to ``floor`` at step ``total``. A pure function of the step, so
    resuming needs only the step count."""

    def __init__(self, peak: float, floor: float, warmup: int, total: int):
        self.peak, self.floor, self.warmup, self.total = peak, floor, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"peak": self.peak, "floor": self.floor, "warmup": self.warmup, "total": self.total}


def build_schedule(config: TrainConfig) -> WarmupCosine:
    return WarmupCosine(config.lr, config.min_lr, config.warmup_steps, config.steps)


@dataclass
class Parts:
    """Everything the loop runs, built for this process's place in the job."""

    device: torch.device
    ranks: RankLayout
    model: nn.Module
    prefix: nn.Module | None
    names: list[str]  # the optimizer's parameters, in its order (checkpoints key its state by these)
    optimizer: TrainingOptimizer
    schedule: WarmupCosine
    runner: StepRunner
    checkpoints: Checkpointer
    checkpoint_writer: CheckpointWriter
    logger: MetricsLogger | NullLogger
    profiler: MemoryProfiler
    timeline: StepTimeline
    speed: Speed


def build_parts(config: TrainConfig, data: DataBundle, device: torch.device,
                ranks: RankLayout | None = None) -> Parts:
    """The parts of one process: the whole model (``ranks`` None), or one rank's share of a job
    (``ranks``: that rank's astrobio.train.pipeline.Ranks): its pipeline stage, or with one stage the
    whole model (pure data parallel)."""
    checkpoints = Checkpointer(Path(config.output_dir) / "checkpoints", config.keep_last_k)
    config = resolve_grad_accum_location(config, data.vocab_size, device, log=None)  # when not done before
    one_process = ranks is None
    ranks = ranks or SingleProcess()
    if ranks.stages == 1:  # one process, or the replicas of a whole model
        timeline = StepTimeline(device)
        model, index_offset = build_model(config, data.vocab_size, device), 0
        speed = speed_up(model, config, device)
        prefix = build_prefix(config, device)
        runner = LocalStepRunner(model, device, config.use_mixed_precision, prefix, timeline)
    else:
        from astrobio.train.pipeline import PipelineStepRunner
        timeline = StepTimeline(device, ranks.stage)
        model, index_offset = build_stage_model(config, data.vocab_size, device, ranks.stage)
        speed = speed_up(model, config, device)
        prefix = build_prefix(config, device) if ranks.stage == 0 else None  # the encoders live on stage 0
        runner = PipelineStepRunner(model, ranks, config.schedule, device, config.use_mixed_precision,
                                    prefix, prefix_len(config), timeline)
    named = trainable(model, prefix)
    # the prefix runs outside the model's hooked forward: then the offload engine's end_step waits for
    # every bucket instead of each layer waiting for its own
    optimizer = build_optimizer(config, named, ranks, timeline, model if prefix is None else None, index_offset)
    if one_process:
        writer = WholeCheckpoint(checkpoints)
    else:
        from astrobio.train.pipeline import StagedCheckpoint
        writer = StagedCheckpoint(checkpoints, ranks, optimizer.sharded)  # one part per stage (and replica)
    logger = (MetricsLogger(config.output_dir, config.to_dict(), config.wandb_project, config.wandb_name)
              if ranks.is_main else NullLogger())
    return Parts(device=device, ranks=ranks, model=model, prefix=prefix, names=[n for n, _ in named],
                 optimizer=optimizer, schedule=build_schedule(config), runner=runner, checkpoints=checkpoints,
                 checkpoint_writer=writer, logger=logger, profiler=build_profiler(config, device, ranks.stage),
                 timeline=timeline, speed=speed)
