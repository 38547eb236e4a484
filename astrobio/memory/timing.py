"""Step-time estimate: three pipelines of work that overlap, and the one that sets the pace.

- compute: 6 N FLOPs per token for the matrices (2 forward, 4 backward), plus 2 N for the forward
  recomputed under checkpointing, plus causal attention scores (2 s h per token per layer forward,
  the same 3x / 4x factors), at ``mfu`` of the profile's matrix peak; the pipeline runs
  ``m + p - 1`` micro-batch slots of the slowest stage under GPipe and 1F1B, while ZB-H1 idles
  (p - 1)(F + B - W) (Qi et al. 2023; ``astrobio.parallel.schedules.theoretical_bubble``).
  The embedding is a lookup, not a matrix product, and is left out of N.
- link: every micro-batch's gradients leave each device, and the new weights come back once per
  step, over the host link (one link per device, in parallel).
- CPU: host-memory traffic of adding each micro-batch's gradients into the accumulators, then the
  8-bit step (read and write master weights and moments, read accumulators, write the bf16 upload),
  over the host memory bandwidth, which all stages share.

Gradients stream out and accumulate while backward runs, so the step takes the longest of the three;
the optimizer step itself is exposed only for what the last micro-batch's backward cannot hide.
"""

from __future__ import annotations

from dataclasses import dataclass

from astrobio.memory.hardware import GB, HardwareProfile
from astrobio.model import ModelConfig
from astrobio.parallel.schedules import theoretical_bubble


@dataclass
class StepTime:
    tokens_per_step: int
    flops_per_step: float
    mfu: float
    compute_s: float
    bubble_fraction: float
    link_s: float
    cpu_accumulate_s: float
    optimizer_s: float
    exposed_optimizer_s: float
    step_s: float
    tokens_per_s: float
    critical_path: str


def matrix_params(tensors: list[tuple[str, int]]) -> int:
    """Parameters that multiply activations: not the embedding table, not norm scales."""
    return sum(n for name, n in tensors if not name.startswith("embed") and "norm" not in name)


def stage_flops(model: ModelConfig, tensors, layers: int, tokens: int, seq: int, checkpointing: bool) -> float:
    factor = 8 if checkpointing else 6
    attention = (factor / 2) * 2 * tokens * seq * model.d_model * layers  # causal: 2 s h per token forward
    return factor * matrix_params(tensors) * tokens + attention


def pipeline_time(schedule: str, stages: int, micro_batches: int, slot_s: float, checkpointing: bool) -> float:
    """The slowest stage's m micro-batch slots plus the schedule's idle time (F = B = W, the recomputed
    forward counted in B)."""
    bubble = theoretical_bubble(schedule, stages, micro_batches, f=1.0, b=2.0 if checkpointing else 1.0, w=1.0)
    return micro_batches * slot_s / (1 - bubble)


def host_bytes_per_param(cfg, param_bytes: int) -> tuple[int, int]:
    """(accumulation bytes per param per step, optimizer-step bytes per param) of host traffic."""
    acc = 4 if cfg.accum_dtype == "fp32" else 2
    m = cfg.micro_batches
    accumulate = m * param_bytes + (2 * m - 1) * acc  # read the copied gradient; read+write the sum
    if cfg.grad_accum_location == "device":
        accumulate = 0  # summed on the device; the sums land on the host once per step
    master = 4 if cfg.master_weights == "fp32" else 2
    moments = 4 if cfg.optimizer == "adamw8bit" else 16
    upload = 2 if master == 4 else 0  # the bf16 copy written for the host-to-device transfer
    return accumulate, 2 * master + acc + moments + upload


def device_step_bytes(cfg, param_bytes: int) -> int:
    """Optimizer-step bytes per param on the device: weights and gradient, moments, fp32 master if any."""
    master = 8 if (param_bytes == 2 and cfg.master_weights == "fp32") else 0
    moments = 4 if cfg.optimizer == "adamw8bit" else 4 * (4 if master or param_bytes == 4 else 2)
    return 3 * param_bytes + master + moments


def estimate_step(cfg, hw: HardwareProfile, model: ModelConfig, split: list[int],
                  tensors: list[list[tuple[str, int]]], param_bytes: int) -> StepTime:
    tokens_mb = cfg.micro_batch_size * cfg.seq_len
    m, p = cfg.micro_batches, len(split)
    rate = hw.matrix_tflops * 1e12 * hw.mfu
    flops = [stage_flops(model, t, k, tokens_mb, cfg.seq_len, cfg.checkpointing) for t, k in zip(tensors, split)]
    slot = max(flops) / rate
    compute = pipeline_time(cfg.schedule, p, m, slot, cfg.checkpointing)
    bubble = 1 - m * slot / compute
    n_stage = [sum(n for _, n in t) for t in tensors]
    n_total = sum(n_stage)
    accumulate_bpp, step_bpp = host_bytes_per_param(cfg, param_bytes)
    if cfg.offload:
        # gradients out (every micro-batch, or once per step after device accumulation), weights in once
        out_bytes = (4 if cfg.accum_dtype == "fp32" else 2) if cfg.grad_accum_location == "device" else m * param_bytes
        link = max((out_bytes + param_bytes) * n for n in n_stage) / (hw.host_link * GB)
        cpu_accumulate = n_total * accumulate_bpp / (hw.host_memory_bandwidth * GB)
        optimizer = n_total * step_bpp / (hw.host_memory_bandwidth * GB)
        backward_share = (4 + (2 if cfg.checkpointing else 0)) / (8 if cfg.checkpointing else 6)
        hidden = backward_share * slot
        upload_first = max(cfg.bucket_bytes, 1) / (hw.host_link * GB)
        exposed = max(0.0, optimizer - hidden) + upload_first
    else:
        link = cpu_accumulate = 0.0
        optimizer = max(n * device_step_bytes(cfg, param_bytes) for n in n_stage) / (hw.device_memory_bandwidth * GB)
        exposed = optimizer
    paths = {"compute": compute, "link": link, "CPU (gradient accumulation)": cpu_accumulate}
    critical = max(paths, key=paths.get)
    step = paths[critical] + exposed
    tokens = tokens_mb * m
    return StepTime(tokens_per_step=tokens, flops_per_step=sum(flops) * m, mfu=hw.mfu, compute_s=compute,
                    bubble_fraction=bubble, link_s=link, cpu_accumulate_s=cpu_accumulate, optimizer_s=optimizer,
                    exposed_optimizer_s=exposed, step_s=step, tokens_per_s=tokens / step, critical_path=critical)
