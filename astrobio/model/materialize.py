"""Build a model on the meta device, then give it memory where it will live, in its dtype.

``build_model`` / ``build_stage`` (astrobio.model) initialise a whole fp32 copy on the CPU and then move
and cast it: for 13B that is 52 GB of host memory and one serial pass of random draws (minutes). Here the
model is built on the meta device (no memory), and each module that owns parameters is materialised in
turn, layer by layer: its parameters are allocated on the target device in the target dtype and
filled by ``init_parameters``, which draws each parameter from its own generator (seeded by the run's
seed and the parameter's full name). Because the draws of different parameters are independent, they
run in a thread pool (torch's random and copy kernels release the GIL). The weights are the same bits
as ``build_model(config, seed, device, dtype)`` gives: the same fp32 draw per parameter, rounded to the
dtype once.

Host memory in flight: one fp32 draw per thread (the largest is the embedding or the head).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from astrobio.model.stages import PipelineStage, build_stage
from astrobio.model.transformer import ModelConfig, RebuiltLLMIntegration, build_model, init_parameters


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def materialize(module: nn.Module, config: ModelConfig, seed: int, device: torch.device | str,
                dtype: torch.dtype, threads: int | None = None) -> nn.Module:
    """Allocate every parameter of the meta-device ``module`` on ``device`` in ``dtype`` and initialise it
    as ``init_parameters(module, config, seed)`` would; returns ``module``."""
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("materialize allocates memory: pass the device the model will live on, not meta")
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise ValueError(f"materialize initialises parameters only, but the module has buffers ({buffers[0]}, ...)")
    owners = [(name, sub) for name, sub in module.named_modules() if any(True for _ in sub.parameters(recurse=False))]
    with ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="astrobio-init") as pool:
        pending = []
        for name, sub in owners:  # in registration order: the first layers first
            for key, meta in list(sub._parameters.items()):
                if meta is None:
                    continue
                if not meta.is_meta:
                    raise ValueError(f"parameter {name}.{key} is already on {meta.device}; materialize expects a "
                                     f"module built on the meta device")
                real = torch.empty(meta.shape, dtype=dtype, device=device)
                sub._parameters[key] = nn.Parameter(real, requires_grad=meta.requires_grad)
            pending.append(pool.submit(init_parameters, sub, config, seed, f"{name}." if name else ""))
        for future in pending:
            future.result()
    return module


def build_model_on(config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, threads: int | None = None) -> RebuiltLLMIntegration:
    """``build_model(config, seed, device, dtype)``, materialised in place (same weights)."""
    return materialize(build_model(config, device="meta", dtype=dtype), config, seed, device, dtype, threads)


def build_stage_on(config: ModelConfig, stage: int, layers_per_stage: list[int] | None = None, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   threads: int | None = None) -> PipelineStage:
    """``build_stage(...)``, materialised in place (same weights)."""
    module = build_stage(config, stage, layers_per_stage, device="meta", dtype=dtype)
    return materialize(module, config, seed, device, dtype, threads)
