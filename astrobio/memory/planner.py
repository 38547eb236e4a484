"""The memory planner: what each pipeline stage's device and the host will hold, before anything runs.

``plan(PlanConfig(...)) -> Plan`` counts parameters from the model built on the meta device (per
stage; with ``modalities``, the prefix encoders from ``build_prefix(..., device="meta")`` on stage 0,
and their prefix positions before the tokens), activations from the layer's shapes
(astrobio.memory.activations), optimizer state per tensor from the 8-bit specification's block layout,
and estimates the step time (astrobio.memory.timing).
Refusing what will not fit is astrobio.memory.preflight's job.

A stage's device budget is its resident terms (weights, and without offload the optimizer's tensors)
plus what it holds at its peak moment (astrobio.memory.peak); the host's is laid out as the offload
engine lays out its buffers. The types of the plan are in astrobio.memory.budget.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from astrobio.memory import activations as act
from astrobio.memory.budget import MemoryBudget, Plan, PlanConfig, Term
from astrobio.memory.hardware import HardwareProfile, get_hardware
from astrobio.memory.peak import StageShape, peak_moment
from astrobio.memory.timing import estimate_step
from astrobio.model import ModelConfig, build_stage, even_split, get_config
from astrobio.model.encoders import build_prefix
from astrobio.spec.adamw8bit import BLOCK_SIZE, MIN_8BIT_NUMEL

PREFIX = "prefix."  # the prefix encoders' parameter names, as the trainer names them


# ---------------------------------------------------------------------------------------------------
# parameters, from the model on the meta device


def resolve_model(config: PlanConfig) -> ModelConfig:
    if isinstance(config.model, ModelConfig):
        return config.model
    return get_config(config.model, vocab_size=config.vocab_size)


@functools.lru_cache(maxsize=32)
def stage_tensors(model: ModelConfig, split: tuple[int, ...]) -> list[list[tuple[str, int]]]:
    """(name, numel) of every parameter of every stage, from ``build_stage(..., device="meta")``."""
    return [[(name, p.numel()) for name, p in build_stage(model, s, list(split), device="meta").named_parameters()]
            for s in range(len(split))]


@functools.lru_cache(maxsize=8)
def prefix_tensors(d_model: int, modalities: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], int]:
    """(name, numel) of the prefix encoders' parameters under the trainer's names (``prefix.``), from
    ``build_prefix(..., device="meta")``, and the number of prefix positions; nothing for text alone."""
    if not modalities:
        return (), 0
    module = build_prefix(d_model, modalities, device="meta")
    return tuple((PREFIX + name, p.numel()) for name, p in module.named_parameters()), module.prefix_len


def moments_bytes(numels: list[int], optimizer: str, state_bytes: int) -> int:
    """Optimizer state. 8-bit: one byte each for m and v plus one fp32 absmax per block per moment;
    tensors under MIN_8BIT_NUMEL keep fp32 moments (the specification). torch AdamW: two moments
    in ``state_bytes``."""
    if optimizer == "adamw":
        return sum(2 * state_bytes * n for n in numels)
    total = 0
    for n in numels:
        total += 8 * n if n < MIN_8BIT_NUMEL else 2 * n + 2 * 4 * (-(-n // BLOCK_SIZE))
    return total


# ---------------------------------------------------------------------------------------------------
# device: one stage


def resident_terms(cfg: PlanConfig, tensors: list[tuple[str, int]], param_bytes: int) -> list[Term]:
    """What a stage holds all step long: its weights (the prefix encoders' in fp32, as the trainer keeps
    them), and without offload the optimizer's tensors."""
    numels = [n for _, n in tensors]
    n_params = sum(n for name, n in tensors if not name.startswith(PREFIX))
    n_encoders = sum(numels) - n_params
    dtype_name = "bf16" if param_bytes == 2 else "fp32"
    terms = [Term(f"{dtype_name} weights", param_bytes * n_params, f"{n_params / 1e9:.3f}B parameters")]
    if n_encoders:
        terms.append(Term("prefix encoder weights", 4 * n_encoders,
                          f"{n_encoders:,} parameters ({', '.join(cfg.modalities)}), fp32"))
    if not cfg.offload:
        if param_bytes == 2 and cfg.master_weights == "fp32":
            terms.append(Term("fp32 master weights", 4 * n_params, "on the device (no offload)"))
        state_bytes = 4 if (param_bytes == 4 or cfg.master_weights == "fp32") else 2
        terms.append(Term(f"optimizer moments ({cfg.optimizer})",
                          moments_bytes(numels, cfg.optimizer, state_bytes), "on the device (no offload)"))
    return terms


def chunked_loss(cfg: PlanConfig, hw: HardwareProfile) -> bool:
    """Whether the last stage's loss is the chunked cross-entropy: the fused kernels' on a GPU; the CPU's
    fused layers (the C++ kernels) keep the eager loss."""
    return cfg.kernels == "fused" and not hw.unified


def plan_stage(cfg: PlanConfig, hw: HardwareProfile, s: StageShape, stage: int,
               tensors: list[tuple[str, int]], param_bytes: int) -> MemoryBudget:
    peak = peak_moment(cfg, s, stage, tensors, param_bytes)
    terms = resident_terms(cfg, tensors, param_bytes)
    if peak.casts:
        terms.append(Term("autocast bf16 weight copies", peak.casts,
                          "autocast's casts of fp32 weights, at the peak moment"))
    grad_detail = (f"{cfg.device_grads_in_flight} in flight, streamed to the host" if cfg.offload
                   else "resident on the device, at the peak moment")
    terms.append(Term("gradients", peak.gradients, grad_detail))
    how = ("layer-boundary checkpoints + one block's recompute working set" if cfg.checkpointing
           else "every block's saved tensors")
    waiting_w = f", {peak.waiting_w} more waiting for W" if peak.waiting_w else ""
    terms.append(Term("activations", peak.activations,
                      f"{peak.waiting_b + 1} micro-batch(es) in flight ({cfg.schedule}{waiting_w}); {how}"))
    if cfg.offload and cfg.grad_accum_location == "device":
        acc = 4 if cfg.accum_dtype == "fp32" else 2
        terms.append(Term(f"gradient accumulators ({cfg.accum_dtype})", acc * sum(n for _, n in tensors),
                          "summed on the device, copied to the host once per step"))
    if cfg.offload and cfg.data_parallel > 1 and not hw.unified:
        terms.append(Term("data-parallel buffers", collective_device_bytes(cfg, tensors, param_bytes),
                          "NCCL: one bucket's reduce-scatter and all-gather buffers"))
    how_loss = "the chunked cross-entropy (fused)" if chunked_loss(cfg, hw) else f"{cfg.loss_chunks} chunk(s)"
    terms.append(Term("logits + loss", peak.loss, f"last stage, {how_loss}; at the peak moment"))
    allocated = sum(t.bytes for t in terms)
    terms.append(Term("allocator slack", int(hw.allocator_slack * allocated), f"{hw.allocator_slack:.0%} of allocated"))
    if hw.context_bytes:
        terms.append(Term("CUDA context", hw.context_bytes, "context, cuBLAS workspace, NCCL buffers"))
    capacity = cfg.gpu_memory or hw.device_memory
    return MemoryBudget(label=f"stage {stage}", terms=terms, budget=int(cfg.max_device_fraction * capacity),
                        capacity=capacity, moment=peak.name, params=sum(n for _, n in tensors))


# ---------------------------------------------------------------------------------------------------
# host


def machine_stages(cfg: PlanConfig) -> list[list[int]]:
    """The stage of each rank on each machine: ranks laid out as a ("dp", "pp") DeviceMesh (rank = replica
    x stages + stage), ``machine_ranks`` consecutive ranks per machine."""
    ranks, per_machine = cfg.stages * cfg.data_parallel, cfg.machine_ranks
    return [[rank % cfg.stages for rank in range(first, first + per_machine)] for first in range(0, ranks, per_machine)]


def plan_host(cfg: PlanConfig, hw: HardwareProfile, tensors: list[list[tuple[str, int]]],
              devices: list[MemoryBudget], param_bytes: int) -> MemoryBudget:
    """The host of the machine that needs the most (``machine_stages``): every one of its ranks' buffers."""
    budgets = [machine_host(cfg, hw, tensors, devices, param_bytes, stages) for stages in machine_stages(cfg)]
    return max(budgets, key=lambda b: b.total)


def machine_host(cfg: PlanConfig, hw: HardwareProfile, tensors: list[list[tuple[str, int]]],
                 devices: list[MemoryBudget], param_bytes: int, ranks: list[int]) -> MemoryBudget:
    """Host terms of a machine holding ranks of the stages ``ranks`` (one entry per rank), as
    astrobio.optim.offload.OffloadEngine lays them out: per bucket flat master, accumulator and (fp32 master
    over bf16 weights) bf16 upload buffers, pinned on a CUDA machine; a pool of gradient staging buffers of
    the largest bucket's size; moments per parameter. With K data-parallel replicas each rank holds 1/K of
    its stage's master, moments and upload copy beside its whole accumulators (the replicas' sum is reduced
    into them; astrobio.optim.replicas; the block rounding is left out), and over gloo (CPU) two gather
    buffers."""
    held = [tensors[s] for s in ranks]
    numels = [n for stage in held for _, n in stage]
    n_params = sum(numels)
    k = cfg.data_parallel
    shared = f", 1/{k} per replica" if k > 1 else ""
    terms = []
    if cfg.offload:
        master = 4 if cfg.master_weights == "fp32" else 2
        terms.append(Term(f"master weights ({cfg.master_weights})", master * n_params // k,
                          ("fp32" if master == 4 else "bf16, stochastic rounding; also the upload source") + shared))
        terms.append(Term(f"optimizer moments ({cfg.optimizer})", moments_bytes(numels, cfg.optimizer, 4) // k,
                          ("8-bit m, v + fp32 absmax per 256" if cfg.optimizer == "adamw8bit" else "fp32 m, v")
                          + shared))
        acc = 4 if cfg.accum_dtype == "fp32" else 2
        reduced_on_device = k > 1 and cfg.grad_accum_location == "device" and not hw.unified  # NCCL
        if cfg.grad_accum_location == "device":  # the engine's flat host buffer the device's sums land in
            terms.append(Term(f"gradients from the device ({cfg.accum_dtype})",
                              acc * n_params // (k if reduced_on_device else 1),
                              "the device's sums, copied once per step"
                              + (", reduced across the replicas there: this rank's shard" if reduced_on_device
                                 else "")))
        else:
            terms.append(Term(f"gradient accumulators ({cfg.accum_dtype})", acc * n_params,
                              "summed over micro-batches" + ("; the replicas' sum reduced into them" if k > 1
                                                             else "")))
        if master == 4 and param_bytes == 2:  # not for the fp32 prefix encoders
            uploaded = sum(n for stage in held for name, n in stage if not name.startswith(PREFIX))
            terms.append(Term("bf16 upload copy", 2 * uploaded // k,
                              "new weights written by the step, copied to the device" + shared))
        if cfg.grad_accum_location != "device":  # device accumulation stages nothing
            staging = sum(cfg.staging_buffers * largest_bucket(stage, cfg.bucket_bytes, param_bytes)
                          for stage in held)
            terms.append(Term("gradient staging", staging,
                              f"{cfg.staging_buffers} buffers of the largest bucket per stage"))
        if k > 1 and hw.unified:  # gloo gathers the new weights on the host
            source = param_bytes if master == 4 else master
            gather = sum(2 * largest_bucket(stage, cfg.bucket_bytes, param_bytes) // param_bytes * source
                         for stage in held)
            terms.append(Term("weight gather buffers", gather, "2 buffers of the largest bucket per rank (gloo)"))
    if hw.unified:
        terms.extend(Term(f"{devices[s].label} (device = host memory)", devices[s].total, devices[s].moment)
                     for s in ranks)
    if hw.process_host_bytes:
        terms.append(Term("process runtime", len(ranks) * hw.process_host_bytes,
                          f"{len(ranks)} process(es): torch + CUDA libraries"))
    return MemoryBudget(label="host", terms=terms, budget=int(cfg.max_host_fraction * cfg.host_memory),
                        capacity=cfg.host_memory, params=n_params)


def collective_device_bytes(cfg: PlanConfig, tensors: list[tuple[str, int]], param_bytes: int) -> int:
    """Device buffers of the engine's NCCL collectives, one bucket at a time: the reduce-scatter's input
    (host accumulation: the host sums copied over) and output shard, and the all-gather's bucket."""
    elements = largest_bucket(tensors, cfg.bucket_bytes, param_bytes) // param_bytes
    acc = 4 if cfg.accum_dtype == "fp32" else 2
    reduce_input = elements * acc if cfg.grad_accum_location != "device" else 0
    return reduce_input + elements * acc // cfg.data_parallel + elements * param_bytes


def largest_bucket(tensors: list[tuple[str, int]], bucket_bytes: int, param_bytes: int) -> int:
    """The largest of the engine's greedy buckets (backward order; a parameter larger than a bucket is
    its own), which sizes its staging buffers."""
    largest = size = 0
    for _, n in reversed(tensors):
        size = n * param_bytes if size and size + n * param_bytes > bucket_bytes else size + n * param_bytes
        largest = max(largest, size)
    return largest


def pinned_bytes(p: "Plan") -> int:
    """Host bytes in page-locked memory (the engine pins its flat buffers when the device is CUDA)."""
    if p.hardware.unified or not p.config.offload:
        return 0
    return sum(t.bytes for t in p.host.terms if not t.name.startswith(("optimizer moments", "process runtime")))


# ---------------------------------------------------------------------------------------------------
# the plan


def plan(cfg: PlanConfig) -> Plan:
    """Plans device memory per stage, host memory, and the step time for ``cfg``. With offload and
    ``grad_accum_location="auto"`` the location is the one the trainer takes
    (astrobio.memory.accumulation.choose_accumulation over the plan with host accumulation)."""
    if cfg.offload and cfg.grad_accum_location == "auto":
        from astrobio.memory.accumulation import choose_accumulation
        choice = choose_accumulation(plan(replace(cfg, grad_accum_location="host")), "auto")
        return plan(replace(cfg, grad_accum_location=choice.location))
    model = resolve_model(cfg)
    hw = get_hardware(cfg.hardware, mfu=cfg.mfu, host_link=cfg.host_link,
                      host_memory_bandwidth=cfg.host_memory_bandwidth)
    split = list(cfg.layers_per_stage) if cfg.layers_per_stage else even_split(model.n_layers, cfg.stages)
    if len(split) != cfg.stages:
        raise ValueError(f"layers_per_stage {split} has {len(split)} entries for {cfg.stages} stages")
    encoders, prefix_len = prefix_tensors(model.d_model, cfg.modalities)
    positions = cfg.seq_len + prefix_len
    if positions > model.max_seq_len:
        with_prefix = f" + {prefix_len} prefix positions" if prefix_len else ""
        raise ValueError(f"seq_len {cfg.seq_len}{with_prefix} exceeds the model's max_seq_len {model.max_seq_len}")
    param_dtype = cfg.param_dtype or ("fp32" if hw.unified else "bf16")
    param_bytes = 2 if param_dtype == "bf16" else 4
    precision = act.Precision.of(param_bytes, cfg.autocast, cpu=hw.unified)
    layers_only = stage_tensors(model, tuple(split))
    tensors = [[*layers_only[0], *encoders], *layers_only[1:]]  # the encoders live on stage 0
    tokens = act.Tokens(cfg.micro_batch_size, positions)
    devices = []
    for s, layers in enumerate(split):
        shape = StageShape(model, tokens, layers, s == 0, s == len(split) - 1, precision, cfg.kernels,
                           chunked_loss(cfg, hw))
        budget = plan_stage(cfg, hw, shape, s, tensors[s], param_bytes)
        budget.layers = (sum(split[:s]), sum(split[:s + 1]) - 1)
        devices.append(budget)
    host = plan_host(cfg, hw, tensors, devices, param_bytes)
    stage_params = [sum(n for _, n in t) for t in tensors]
    # the encoders run once per example, not per position: their FLOPs and bytes are left out of the time
    timing = estimate_step(replace(cfg, seq_len=positions), hw, model, split, layers_only, param_bytes)
    return Plan(cfg, model, hw, split, stage_params, devices, host, timing, notes=plan_notes(cfg, hw))


def plan_notes(cfg: PlanConfig, hw: HardwareProfile) -> list[str]:
    notes = []
    if cfg.schedule == "zb-h1":
        notes.append("ZB-H1 (astrobio.parallel.executor): a stage after the first keeps each micro-batch's graph and "
                     "its caught Linear-output gradients from its B until its W.")
    if hw.unified:
        notes.append("CPU: the devices are host memory; their peaks count against the host budget.")
    return notes
