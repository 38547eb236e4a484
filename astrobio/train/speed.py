"""The trainer's ``--kernels`` and ``--compile``: what ``auto`` picks where, what will run (the memory
preflight plans it: astrobio.train.memory), and ``speed_up``, which switches them on for the model or
stage (astrobio.model.fast)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from astrobio.model import compile_blocks, use_kernels
from astrobio.model.fast import fused_kernels_unavailable
from astrobio.train.config import TrainConfig


@dataclass(frozen=True)
class Speed:
    """What ``speed_up`` switched on: the kernels in use ("eager" or "fused") and whether the blocks
    are compiled."""

    kernels: str
    compiled: bool


def measured_fast_path(config: TrainConfig, device: torch.device) -> bool:
    """Whether ``auto`` may pick the fused, compiled model: on CUDA, where it was measured (2x eager on
    an H200, docs/BENCHMARKS.md), and not with CPU offload, whose hooks have not yet run with compiled
    blocks on a GPU (NOTE: lift this once a GPU run has checked that combination)."""
    return device.type == "cuda" and not config.use_cpu_offloading


def requested_kernels(config: TrainConfig, device: torch.device) -> str:
    """``--kernels``, with auto: fused on CUDA without offload (the Triton kernels) and on the CPU without
    offload (the C++ kernels: the default job 1.1-1.2x eager, docs/TRAINING.md), else eager. With offload
    the fused blocks read the post-attention norm's weight without calling its module, so the engine's
    wait for it would not run."""
    if config.kernels != "auto":
        return config.kernels
    cpu = device.type == "cpu" and not config.use_cpu_offloading
    return "fused" if cpu or measured_fast_path(config, device) else "eager"


def planned_kernels(config: TrainConfig, device: torch.device) -> str:
    """The kernels ``speed_up`` will switch on (the memory preflight plans their activations):
    ``requested_kernels``, eager where the fused ones cannot run on ``device``."""
    kernels = requested_kernels(config, device)
    return "eager" if kernels == "fused" and fused_kernels_unavailable(device) else kernels


def requested_compile(config: TrainConfig, device: torch.device) -> bool:
    """``--compile``, with auto: on with CUDA without offload, off on the CPU (compiling costs more there
    than it gains)."""
    if config.compile != "auto":
        return config.compile == "on"
    return measured_fast_path(config, device)


def speed_up(module: nn.Module, config: TrainConfig, device: torch.device) -> Speed:
    """``--kernels`` and ``--compile`` applied to the model or stage, which must already be on its device
    with its gradient_checkpointing set. What cannot run here falls back with a one-line message."""
    kernels = use_kernels(module, requested_kernels(config, device))
    compiled = compile_blocks(module) if requested_compile(config, device) else False
    return Speed(kernels, compiled)
