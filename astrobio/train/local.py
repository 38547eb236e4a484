"""One process holds the whole model: its step runner, its rank layout and its checkpoint writer.

The pipeline's counterparts (astrobio.train.pipeline) have the same methods, so the loop runs either
without asking which:

- ``StepRunner``: runs micro-batches through the model. ``forward_backward`` accumulates gradients
  (each micro-batch's loss scaled by 1/len(micro_batches)) and returns the step's mean loss;
  ``evaluate`` returns the mean loss without gradients; ``step_record`` gives the metrics the step adds
  (a collective with several stages); ``write_plots`` draws the runner's own figures.
- The rank layout (``SingleProcess`` here): this process's stage and replica, whether it is the main
  rank, and the collectives, which are identities in one process (so is averaging the gradients over
  replicas: ``gradient_reducer`` gives None).
- The checkpoint writer (``WholeCheckpoint`` here): one ``step-N`` directory with ``model.safetensors``
  and the optimizer state inside the training state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from astrobio.train.checkpoint import Checkpointer
from astrobio.train.timeline import StepTimeline

Batch = tuple[torch.Tensor, torch.Tensor]


class StepRunner(Protocol):
    def forward_backward(self, micro_batches: list[Batch]) -> float: ...

    def evaluate(self, batches: list[Batch]) -> float: ...

    def step_record(self) -> dict: ...

    def write_plots(self, directory: Path) -> None: ...


class LocalStepRunner:
    """All micro-batches through one whole model in this process. With ``prefix`` (a MultimodalPrefix)
    the micro-batches are MultimodalBatch: the prefix embeddings go before the tokens and the loss
    covers the token positions only. Each micro-batch's forward and backward are phases of ``timeline``."""

    def __init__(self, model: nn.Module, device: torch.device, mixed_precision: bool,
                 prefix: nn.Module | None = None, timeline: StepTimeline | None = None):
        self.model = model
        self.device = device
        self.mixed_precision = mixed_precision
        self.prefix = prefix
        self.timeline = timeline or StepTimeline(device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)

    def train(self, mode: bool) -> None:
        for module in (self.model, self.prefix):
            if module is not None:
                module.train(mode)

    def loss(self, batch) -> torch.Tensor:
        """One micro-batch's mean loss over the token positions: the model's own ``loss`` (the cross-entropy
        of its fp32 logits on the eager path, the chunked cross-entropy with fused kernels)."""
        if self.prefix is None:
            inputs, targets = batch
            return self.model.loss(inputs.to(self.device), targets.to(self.device))
        batch = batch.to(self.device)
        return self.model.loss(batch.tokens, batch.targets, prefix=self.prefix(**batch.prefix_inputs()))

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        self.train(True)
        scale = 1.0 / len(micro_batches)
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with self.timeline.phase("forward", device_work=True), self.autocast():
                loss = self.loss(batch) * scale
            with self.timeline.phase("backward", device_work=True):
                loss.backward()
                total += loss.detach()
        return total.item()

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.train(False)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with self.autocast():
                total += self.loss(batch)
        return (total / len(batches)).item()

    def step_record(self) -> dict:
        return {}

    def write_plots(self, directory: Path) -> None:
        """No figures of its own."""


class RankLayout(Protocol):
    stage: int  # this process's pipeline stage (0 in one process)
    stages: int
    replica: int  # which copy of the pipeline this process belongs to (0 in one process)
    replicas: int
    replica_group: object  # the ranks of this stage in every replica (a ProcessGroup; None in one process)
    optimizer_group: object  # the same ranks, as a group the offload engine alone uses (None: one replica)
    is_main: bool  # rank 0: it writes the metrics, plots and summary

    def sum_across(self, value: float) -> float: ...  # over this replica's stages

    def global_norm(self, local_norm: float) -> float: ...

    def replica_mean(self, value: float) -> float: ...

    def gradient_reducer(self, params: list[nn.Parameter]): ...  # a GradientReducer, or None

    def gather(self, obj) -> list: ...  # one per stage of this replica

    def gather_all(self, obj) -> list: ...  # one per rank

    def barrier(self) -> None: ...


class CheckpointWriter(Protocol):
    def save(self, step: int, model_state: dict, optimizer_state: Callable[[], dict],
             training_state: Callable[[], dict]) -> Path: ...


class SingleProcess:
    """The rank layout of one process holding the whole model: the collectives are identities."""

    stage, stages, replica, replicas, replica_group, optimizer_group, is_main = 0, 1, 0, 1, None, None, True

    def sum_across(self, value: float) -> float:
        return value

    def global_norm(self, local_norm: float) -> float:
        return local_norm

    def replica_mean(self, value: float) -> float:
        return value

    def gradient_reducer(self, params: list[nn.Parameter]) -> None:
        return None

    def gather(self, obj) -> list:
        return [obj]

    def gather_all(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


class WholeCheckpoint:
    """Writes ``step-N`` with the whole model and, in the training state, the optimizer state."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def save(self, step: int, model_state: dict, optimizer_state: Callable[[], dict],
             training_state: Callable[[], dict]) -> Path:
        return self.checkpointer.save(step, model_state, {**training_state(), "optimizer": optimizer_state()})
