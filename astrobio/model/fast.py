"""The model at hardware speed: its fused layer kernels, and torch.compile of each block.

    use_kernels(model, "fused")   the layers' fused kernels for the model's device: on CUDA the Triton
                                   kernels (astrobio.kernels) and the chunked loss, on the CPU the C++
                                   ops (astrobio.model.cpu_layers) and the eager loss
    compile_blocks(model)          torch.compile each TransformerBlock in place
    fuse_projections(model)        q, k, v and SwiGLU's gate and up as one matrix product each

Both take a whole model (RebuiltLLMIntegration) or a pipeline stage (PipelineStage), work with
activation checkpointing (``model.gradient_checkpointing``: the checkpoint calls the compiled block,
and recomputes through it), and fall back with a one-line message where they cannot run: the fused
kernels need Triton on CUDA, and the compiled extension (astrobio._C) on the CPU; under
TRITON_INTERPRET=1 (tests) CPU tensors run the Triton kernels in Triton's interpreter instead.
torch.compile needs TorchDynamo on this Python and, on the CPU, a C++ compiler, and cannot trace the
Triton interpreter. Each returns what it switched on, so a trainer can log it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from typing import Callable

import torch
from torch import nn

from astrobio.model import transformer
from astrobio.model.transformer import TransformerBlock

KERNELS = ("eager", "fused")


@dataclass(frozen=True)
class FusedOps:
    rmsnorm: Callable
    rotary: Callable
    silu_mul: Callable
    linear_cross_entropy: Callable | None  # None: the loss is the eager head and cross-entropy
    attention: Callable | None = None  # causal self-attention of [b, t, h, hd]; None: PyTorch's SDPA


def say(message: str) -> None:
    print(f"astrobio.model: {message}", file=sys.stderr)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def runs_cpu_kernels(device: torch.device) -> bool:
    """Whether the fused layers on ``device`` are the C++ ops (the CPU, unless Triton's interpreter is on)."""
    return device.type == "cpu" and not interpreted()


def fused_kernels_unavailable(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device``, or None when they can."""
    if runs_cpu_kernels(device):
        from astrobio import ops
        reason = ops.cpu_layer_kernels_unavailable()
        return None if reason is None else f"the C++ CPU kernels cannot run: {reason}"
    if device.type not in ("cuda", "cpu"):
        return f"the fused kernels run on CUDA (Triton) and on the CPU (C++), not on {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


@cache
def load_fused_ops() -> FusedOps:
    """The Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from astrobio import ops
    kernels = ops.load_layer_kernels()
    return FusedOps(kernels["rmsnorm"], kernels["rotary"], kernels["silu_mul"], kernels["linear_cross_entropy"])


@cache
def load_cpu_fused_ops() -> FusedOps:
    """The C++ kernels, causal attention included; no chunked loss (its row step would be PyTorch on the
    CPU: the eager loss serves)."""
    from astrobio.model import cpu_layers
    return FusedOps(cpu_layers.rmsnorm, cpu_layers.rotary, cpu_layers.silu_mul, None, cpu_layers.causal_attention)


def use_kernels(model: nn.Module, kernels: str) -> str:
    """Switches every layer of ``model`` to ``kernels`` ("eager" or "fused"); returns the one in use
    ("eager", with a one-line message, where the fused kernels cannot run on the model's device)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "fused":
        device = module_device(model)
        reason = fused_kernels_unavailable(device)
        if reason is not None:
            say(f"fused kernels off ({reason}); the layers run eager")
            kernels = "eager"
        else:  # per device type: a CPU model and a GPU model in one process each get their own
            transformer.FUSED[device.type] = load_cpu_fused_ops() if runs_cpu_kernels(device) else load_fused_ops()
    fused = kernels == "fused"
    for module in model.modules():
        if hasattr(module, "fused"):  # the layers, and the model or last stage for the loss
            module.fused = fused
    return kernels


def fuse_projections(model: nn.Module, on: bool = True) -> None:
    """q, k and v as one matrix product of the input with their weights concatenated at use, and
    SwiGLU's gate and up likewise (``on``; off: three and two products). The parameters stay as they
    are (names, state dicts, optimizer state and checkpoints unchanged).

    Costs where the products are already large: each forward copies the concatenated weights
    (3 h^2 + 2 h f per block) and autograd keeps that copy until the backward; the Linear modules' own
    forwards no longer run, so their forward hooks do not fire (the offload engine's wait for a
    module's weights, ZB-H1's deferred weight pass: their gradients are then computed in B). The
    trainer does not use it (docs/MODEL.md: measured gain on the CPU within noise)."""
    for module in model.modules():
        if isinstance(module, (transformer.Attention, transformer.SwiGLU)):
            module.fused_projections = on


def compile_unsupported(model: nn.Module) -> str | None:
    """Why torch.compile of the blocks cannot work here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support Python {sys.version.split()[0]} here"
    device = module_device(model)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Inductor needs Triton for CUDA code and it is not installed"
    if device.type == "cpu":
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return "Inductor needs a C++ compiler for CPU code and none was found"
        if interpreted() and any(getattr(m, "fused", False) for m in model.modules()):
            return "the Triton interpreter's kernels (fused, on the CPU under TRITON_INTERPRET=1) cannot be traced"
    return None


def blocks_of(model: nn.Module) -> list[TransformerBlock]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"compile_blocks needs a model or pipeline stage with .layers, got {type(model).__name__}")
    return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)


def compile_blocks(model: nn.Module, **compile_options) -> bool:
    """torch.compile each block of ``model`` in place (``nn.Module.compile``: parameter names and
    state dicts are unchanged). Returns False, with a one-line message, where compile is unsupported."""
    reason = compile_unsupported(model)
    if reason is not None:
        say(f"torch.compile off ({reason}); the blocks run uncompiled")
        return False
    for block in blocks_of(model):
        block.compile(**compile_options)
    return True
