"""Where a run's processes compute, how their ranks talk, and how much of a GPU each may take.

With at least as many GPUs as pipeline stages, every rank gets its own GPU and the ranks talk over
NCCL. With fewer (e.g. ``--pipeline-stages 2`` on one GPU), ranks share GPUs round-robin and talk over
gloo through host memory (astrobio.train.pipeline.HostBoundary); ``--gpu-memory-limit`` then caps each
process, so that two 24 GiB cards can be tried out on one larger GPU.
"""

from __future__ import annotations

import math
import os

import torch

from astrobio.memory.units import parse_bytes
from astrobio.train.config import ConfigError, TrainConfig, replicas


def gpu_memory_limit(config: TrainConfig) -> int | None:
    """``--gpu-memory-limit`` in bytes (None: no cap)."""
    if config.gpu_memory_limit is None:
        return None
    try:
        limit = parse_bytes(config.gpu_memory_limit)
    except ValueError as error:
        raise ConfigError(f"--gpu-memory-limit: {error}") from None
    if limit <= 0:
        raise ConfigError(f"--gpu-memory-limit must be positive, got {config.gpu_memory_limit!r}")
    return limit


def ranks_per_gpu(stages: int) -> int:
    """How many of the job's ranks share each GPU of this machine (1 where none is visible: a plan for
    GPUs elsewhere assumes one per rank)."""
    gpus = torch.cuda.device_count()
    return max(1, math.ceil(stages / gpus)) if gpus else 1


def local_ranks(config: TrainConfig) -> int:
    """The job's ranks on this machine: torchrun's LOCAL_WORLD_SIZE, else all of them (replicas x stages,
    spawned here)."""
    if "LOCAL_WORLD_SIZE" in os.environ and "ASTROBIO_SPAWNED" not in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return replicas(config) * config.pipeline_stages


def backend_for(device: torch.device, local_ranks: int) -> str:
    """NCCL when every rank of this machine (``local_ranks``) has a GPU of its own, else gloo (the CPU, or
    ranks sharing a GPU)."""
    return "nccl" if device.type == "cuda" and torch.cuda.device_count() >= local_ranks else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device rank ``local_rank`` computes on: the CPU, or the GPUs round-robin (made current)."""
    if device.type != "cuda":
        return device
    ordinal = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(ordinal)
    return ordinal


def process_gpu_budget(config: TrainConfig, total: int) -> int:
    """The GPU memory one process may plan with: ``--gpu-memory-limit``, or the GPU's share of each of
    the ranks that use it. A cap that the ranks sharing a GPU cannot all have is refused."""
    limit, sharing = gpu_memory_limit(config), ranks_per_gpu(local_ranks(config))
    if limit is None:
        return total // sharing
    if limit * sharing > total:
        raise ConfigError(f"--gpu-memory-limit {config.gpu_memory_limit} for each of {sharing} ranks sharing a "
                          f"GPU of {total / 2 ** 30:.1f} GiB does not fit; lower it to "
                          f"{total // sharing / 2 ** 30:.1f}GiB or less")
    return limit


def limit_gpu_memory(config: TrainConfig, device: torch.device) -> None:
    """Caps this process's allocations on ``device`` at ``--gpu-memory-limit`` (the caching allocator
    raises out-of-memory beyond it)."""
    limit = gpu_memory_limit(config)
    if limit is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
