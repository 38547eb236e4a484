"""The optimizer as the training loop sees it: one protocol over every optimizer the trainer can build.

    begin_step(num_micro_batches)   before the step's backward passes
    end_step(lr) -> StepStats       after them: the global gradient norm, the skip of a step whose norm
                                    is not finite, clipping to ``--max-grad-norm``, the update at ``lr``
    synchronize()                   the model's parameters hold the last update (before a checkpoint)
    state_dict(), load_state_dict(), close()

``build_optimizer`` chooses the implementation once, from the config:

- ``DeviceOptimizer``: a torch optimizer whose gradients stay in ``.grad`` next to the parameters; with
  data parallel, a ``GradientReducer`` (astrobio.parallel.replicas, from the rank layout) averages them
  over the replicas during backward, and ``end_step`` first waits for it (phase ``grad_reduce``).
  ``EightBitAdamW`` wraps astrobio's AdamW8bit, which applies the clipping coefficient inside its
  kernel and is told whether to skip (the norm already says whether every gradient is finite, so the
  optimizer scans nothing again); ``TorchAdamW`` wraps torch.optim.AdamW, whose gradients are scaled
  here and whose ``step`` is not called on a skipped step.
- ``OffloadOptimizer``: astrobio.optim.offload.OffloadEngine (master weights, 8-bit moments and the
  gradient accumulators in host memory; it clips and skips inside its ``end_step``). With data parallel
  the engine is given the stage's replica group (``replicas``): it reduce-scatters the gradients,
  steps its shard and all-gathers the weights, and its squared norm is already the replicas' total.

The learning rate reaches the update by ``end_step(lr)`` alone; it was validated when the config was
parsed. With several pipeline stages the norm is the whole model's: ``global_norm`` / ``sum_across``
come from the rank layout (astrobio.train.local / astrobio.train.pipeline), identities in one process;
they sum over one replica's stages, since every replica holds the same averaged gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from astrobio.train.checkpoint import load_offload_state, optimizer_by_index
from astrobio.train.config import TrainConfig
from astrobio.train.local import RankLayout
from astrobio.train.timeline import StepTimeline


@dataclass
class StepStats:
    """What one optimizer step did: the global gradient norm before clipping, and whether the step was
    skipped because that norm was not finite."""

    grad_norm: float
    skipped: bool


class TrainingOptimizer(Protocol):
    sharded: bool  # each data-parallel replica holds only its shard of the state (checkpoints: one part each)

    def begin_step(self, num_micro_batches: int) -> None: ...

    def end_step(self, lr: float) -> StepStats: ...

    def synchronize(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def load_checkpoint(self, path: Path, state: dict, names: list[str]) -> None: ...

    def close(self) -> None: ...


class DeviceOptimizer:
    """A torch optimizer over ``params``, with the loop's clipping and skipping around its step."""

    sharded = False

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_grad_norm: float,
                 global_norm: Callable[[float], float], timeline: StepTimeline | None = None, reducer=None):
        self.optimizer, self.params = optimizer, params
        self.max_grad_norm, self.global_norm = max_grad_norm, global_norm
        self.timeline = timeline or StepTimeline(params[0].device)
        self.reducer = reducer  # a GradientReducer (data parallel), or None

    def begin_step(self, num_micro_batches: int) -> None:
        """Backward accumulates into ``.grad``; the reducer learns when each gradient is final."""
        if self.reducer is not None:
            self.reducer.begin_step(num_micro_batches)

    def end_step(self, lr: float) -> StepStats:
        """Clips the global gradient norm to ``max_grad_norm`` (0: no clipping) and updates at ``lr``;
        a step whose norm is not finite changes nothing. Leaves no gradient behind."""
        if self.reducer is not None:
            with self.timeline.phase("grad_reduce"):  # the replicas' all-reduces still in flight
                self.reducer.finish()
        with self.timeline.phase("norm_clip", device_work=True):
            grads = [p.grad for p in self.params if p.grad is not None]
            local_norm = torch.nn.utils.get_total_norm(grads).item()
        with self.timeline.phase("norm_reduce"):  # with several stages: an all-reduce, waiting for the others
            norm = self.global_norm(local_norm)
        with self.timeline.phase("norm_clip"):
            finite = math.isfinite(norm)
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 and finite else 1.0
        with self.timeline.phase("optimizer", device_work=True):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.update(grads, scale, finite)
            self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm, skipped=not finite)

    def update(self, grads: list[torch.Tensor], scale: float, finite: bool) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """The update ran in ``end_step``: nothing is in flight."""

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def load_checkpoint(self, path: Path, state: dict, names: list[str]) -> None:
        """This rank's parameters' state from a checkpoint's (merged, by-name) optimizer ``state``."""
        self.load_state_dict(optimizer_by_index(state["optimizer"], names))

    def close(self) -> None:
        """Holds no threads or buffers; the reducer's hooks go."""
        if self.reducer is not None:
            self.reducer.remove()


class EightBitAdamW(DeviceOptimizer):
    """astrobio.optim.AdamW8bit: the kernel applies ``scale``; ``found_inf`` decides the skip without a
    second scan of the gradients."""

    def update(self, grads: list[torch.Tensor], scale: float, finite: bool) -> None:
        self.optimizer.step(grad_scale=scale, found_inf=not finite)


class TorchAdamW(DeviceOptimizer):
    """torch.optim.AdamW: the gradients are scaled in place, and a skipped step never reaches it."""

    def update(self, grads: list[torch.Tensor], scale: float, finite: bool) -> None:
        if not finite:
            return
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        self.optimizer.step()


class OffloadOptimizer:
    """astrobio.optim.offload.OffloadEngine: gradients go to the host during backward (its hooks), and
    ``end_step`` clips, skips and steps there; with a module attached, the weights' upload overlaps the
    next forward."""

    def __init__(self, engine, sum_across: Callable[[float], float], timeline: StepTimeline | None = None,
                 sharded: bool = False):
        self.engine, self.sum_across, self.sharded = engine, sum_across, sharded
        self.timeline = timeline or StepTimeline(engine.device)
        engine.on_stall = self.timeline.add_stall  # the compute stream's waits for weights: not busy

    def begin_step(self, num_micro_batches: int) -> None:
        self.engine.begin_step(num_micro_batches)

    def end_step(self, lr: float) -> StepStats:
        # NOTE: one phase for the whole call (waits for the host accumulators, the norm, the dispatch of
        # the bucket steps; with no module attached also the steps and uploads). The engine's worker
        # threads would add their own lanes through timeline.add once it reports their intervals.
        with self.timeline.phase("offload_end_step"):
            stats = self.engine.end_step(lr=lr, sum_across=self.sum_across)
        return StepStats(grad_norm=stats.grad_norm, skipped=stats.skipped)

    def synchronize(self) -> None:
        self.engine.synchronize()

    def state_dict(self) -> dict:
        # master weights the parameters hold exactly (bf16-sr over bf16) are saved once, with the model
        return self.engine.state_dict(masters=not self.engine.masters_in_parameters)

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)  # after the model's weights: they may be the masters

    def load_checkpoint(self, path: Path, state: dict, names: list[str]) -> None:
        """This rank's shard of the state, resharded from the checkpoint's parts whatever the stage and
        replica counts that wrote them (astrobio.train.checkpoint.load_offload_state)."""
        self.load_state_dict(load_offload_state(path, names, self.engine.shard_ranges()))

    def close(self) -> None:
        self.engine.close()


def build_optimizer(config: TrainConfig, named: list[tuple[str, nn.Parameter]], ranks: RankLayout,
                    timeline: StepTimeline, module: nn.Module | None = None, index_offset: int = 0) -> TrainingOptimizer:
    """The optimizer of ``--use-8bit-optimizer`` / ``--use-cpu-offloading`` over ``named`` (this rank's
    parameters). ``ranks``: the rank layout, whose collectives make the gradient norm global and whose
    replicas (data parallel) average the gradients. With offloading, ``module`` is the model whose
    forward waits per bucket for its updated weights (None: ``end_step`` waits for every bucket) and
    ``index_offset`` the number of parameters on the stages before this one (the stochastic rounding's
    seed). Its phases go on ``timeline``."""
    betas = (config.beta1, config.beta2)
    if config.use_cpu_offloading:
        from astrobio.optim.offload import OffloadEngine
        # with replicas the engine averages the gradients itself (reduce-scatter into its shards)
        sharded = {"replicas": ranks.optimizer_group} if ranks.replicas > 1 else {}
        engine = OffloadEngine(named, lr=config.lr, betas=betas, weight_decay=config.weight_decay,
                               max_grad_norm=config.max_grad_norm or None, accum_dtype=config.accum_dtype,
                               master_weights=config.master_weights, module=module, seed=config.seed,
                               index_offset=index_offset, grad_accum_location=config.grad_accum_location, **sharded)
        return OffloadOptimizer(engine, ranks.sum_across, timeline, sharded=bool(sharded))
    params = [p for _, p in named]
    reducer = ranks.gradient_reducer(params)
    if config.use_8bit_optimizer:
        from astrobio.optim import AdamW8bit
        optimizer = AdamW8bit(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
        return EightBitAdamW(optimizer, params, config.max_grad_norm, ranks.global_norm, timeline, reducer)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    return TorchAdamW(optimizer, params, config.max_grad_norm, ranks.global_norm, timeline, reducer)
