"""The trainer's memory checks: the planner's preflight before anything is allocated, and the profiler's
samples while the run goes (astrobio.memory; docs/MEMORY.md).

``preflight_run`` maps the training config onto a ``PlanConfig`` for this machine (the ``cpu`` profile
with this host's memory, or the GPU's own size; the weights in ``weights_dtype``, the dtype the trainer
builds them in; the ``--modalities`` prefix encoders on stage 0) and refuses a configuration the planner
says will not fit with a ``ConfigError`` of one line: the budget that is over, by how much, its largest
term, and the planned changes that would fit. ``--force`` turns the refusal into a warning.

``resolve_grad_accum_location`` replaces ``--grad-accum-location auto`` by the planner's choice
(astrobio.memory.accumulation: the device where the stage's accumulators fit beside the rest).

``memory_fields`` turns a profiler sample into the keys a ``metrics.jsonl`` record carries.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from astrobio.memory import MemoryProfiler, Plan, PlanConfig, PlanError, check_fits, plan, plot_memory
from astrobio.memory.accumulation import choose_accumulation
from astrobio.memory.profiler import host_total
from astrobio.train.config import ConfigError, TrainConfig, replicas
from astrobio.train.speed import planned_kernels

# profiler sample keys that go into metrics.jsonl as they are ("alert" becomes "memory_alert" when set);
# "device" tells plots/memory.png which curves mean something there (on the CPU the device is host memory)
SAMPLE_KEYS = ("stage", "device", "host_rss_bytes", "host_peak_bytes", "pinned_bytes", "device_allocated_bytes",
               "device_reserved_bytes", "device_peak_bytes", "device_total_bytes")


def hardware_of(device: torch.device) -> tuple[str, int | None]:
    """The planner's hardware profile for ``device`` and its memory in bytes (None: the profile's)."""
    if device.type != "cuda":
        return "cpu", None
    props = torch.cuda.get_device_properties(device)
    return ("h200" if "H200" in props.name else "a5000"), props.total_memory


def gpu_budget(config: TrainConfig, device: torch.device) -> tuple[str, int | None]:
    """The hardware profile, and the device memory one process plans with: ``--gpu-memory-limit``, or
    its share of a GPU that several ranks use (astrobio.train.devices)."""
    from astrobio.train.devices import process_gpu_budget
    hardware, total = hardware_of(device)
    return hardware, None if total is None else process_gpu_budget(config, total)


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of the weights the device computes with. With CPU offload on a GPU: bf16 (the offload
    engine keeps the master weights on the host and uploads each step's new weights in the parameters'
    dtype, so the device holds 2 bytes per parameter; docs/MEMORY.md). Otherwise fp32. The prefix
    encoders stay fp32 either way."""
    return torch.bfloat16 if config.use_cpu_offloading and device.type == "cuda" else torch.float32


def plan_config(config: TrainConfig, vocab_size: int, device: torch.device) -> PlanConfig:
    """What this run will hold, in the planner's terms: the weights in ``weights_dtype``, the prefix
    encoders of ``--modalities`` on stage 0 and their positions before the tokens, the replicas (an
    offloaded state is sharded over them) and the ranks on this machine."""
    from astrobio.model.encoders import check_modalities
    hardware, gpu_memory = gpu_budget(config, device)
    param_dtype = "bf16" if weights_dtype(config, device) == torch.bfloat16 else "fp32"
    from astrobio.train.devices import local_ranks
    return PlanConfig(model=config.model, vocab_size=vocab_size, stages=config.pipeline_stages,
                      data_parallel=replicas(config), ranks_per_machine=local_ranks(config), seq_len=config.seq_len, modalities=check_modalities(config.modalities),
                      micro_batch_size=config.micro_batch_size, micro_batches=config.gradient_accumulation_steps,
                      schedule=config.schedule, checkpointing=config.use_gradient_checkpointing,
                      offload=bool(config.use_cpu_offloading), master_weights=config.master_weights,
                      accum_dtype=config.accum_dtype, optimizer="adamw8bit" if config.use_8bit_optimizer else "adamw",
                      param_dtype=param_dtype, autocast=config.use_mixed_precision, hardware=hardware,
                      gpu_memory=gpu_memory, host_memory=host_total(), kernels=planned_kernels(config, device))


def one_line(error: PlanError) -> str:
    """The planner's refusal (several lines) as one line for the CLI."""
    text = ""
    for line in (line.strip().lstrip("- ") for line in str(error).splitlines() if line.strip()):
        text += line + (" " if line.endswith(":") else "; ")
    return text + "or pass --force to start anyway"


def preflight_run(config: TrainConfig, vocab_size: int, device: torch.device) -> Plan:
    """Plans the run; raises ConfigError (one line) when it will not fit, unless ``--force``."""
    try:
        p = plan(plan_config(config, vocab_size, device))
    except ValueError as error:
        raise ConfigError(f"memory planner: {error}") from None
    try:
        check_fits(p)
    except PlanError as error:
        if not config.force:
            raise ConfigError(one_line(error)) from None
        print(f"warning: --force: starting although {one_line(error)}", file=sys.stderr)
    return p


def resolve_grad_accum_location(config: TrainConfig, vocab_size: int, device: torch.device,
                                planned: Plan | None = None, log=print) -> TrainConfig:
    """``config`` with ``--grad-accum-location auto`` decided from the plan (``planned``, or planned here),
    the choice and its reason logged. An explicit ``device`` whose accumulators will not fit beside the
    rest on a GPU is refused (ConfigError; a warning with ``--force``). Without offload, or with ``host``,
    ``config`` as it is."""
    if not config.use_cpu_offloading or config.grad_accum_location == "host":
        return config
    planned = planned or plan(plan_config(config, vocab_size, device))
    choice = choose_accumulation(planned, config.grad_accum_location)
    if choice.location == "device" and not choice.fits_on_device and not planned.hardware.unified:
        message = (f"--grad-accum-location device: {choice.reason}; use --grad-accum-location auto or host")
        if not config.force:
            raise ConfigError(message)
        print(f"warning: --force: starting although {message}", file=sys.stderr)
    if log is not None:
        log(choice.line())
    return replace(config, grad_accum_location=choice.location)


def build_profiler(config: TrainConfig, device: torch.device, stage: int = 0, pinned_bytes=None) -> MemoryProfiler:
    every = config.profile_every_n_steps or config.log_every_n_steps
    return MemoryProfiler(device, every, config.memory_alert_fraction, stage=stage, pinned_bytes=pinned_bytes)


def memory_fields(sample: dict) -> dict:
    """A profiler sample as metrics.jsonl keys; ``memory_alert`` only when the alert fired."""
    fields = {key: sample[key] for key in SAMPLE_KEYS if sample.get(key) is not None}
    if sample.get("alert"):
        fields["memory_alert"] = sample["alert"]
    return fields


def plot_memory_records(records: list[dict], path, alert_fraction: float):
    """plots/memory.png from the metrics records that hold profiler samples (None when there are none)."""
    samples = [r for r in records if "device_reserved_bytes" in r]
    return plot_memory(samples, path, alert_fraction) if samples else None
