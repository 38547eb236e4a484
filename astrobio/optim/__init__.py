"""Optimizers: AdamW8bit (specified in astrobio.spec.adamw8bit) and the CPU offload engine."""

from astrobio.optim.adamw8bit import AdamW8bit, step_seed
from astrobio.optim.offload import OffloadEngine, StepStats

__all__ = ["AdamW8bit", "OffloadEngine", "StepStats", "step_seed"]
