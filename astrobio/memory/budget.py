"""What a memory plan is made of: its configuration (``PlanConfig``), the terms a budget sums (``Term``,
``MemoryBudget``: one per stage's device and one for the host), and the result (``Plan``).
astrobio.memory.planner computes them; astrobio.memory.report prints them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from astrobio.memory.hardware import GIB, HardwareProfile
from astrobio.memory.timing import StepTime
from astrobio.model import ModelConfig
from astrobio.model.encoders import check_modalities
from astrobio.parallel.schedules import normalize_kind

SCHEDULES = ("gpipe", "1f1b", "zb-h1")
MiB = 2 ** 20
ENGINE_BUCKET_BYTES = 32 * MiB  # astrobio.optim.offload.OffloadEngine's default


@dataclass(frozen=True)
class PlanConfig:
    model: str | ModelConfig = "13b"
    stages: int = 2
    data_parallel: int = 1             # pipeline replicas; with offload each holds 1/K of the optimizer state
    ranks_per_machine: int | None = None  # ranks (GPUs) per machine; default: one replica's stages
    layers_per_stage: tuple[int, ...] | None = None
    seq_len: int = 2048                # tokens per sequence (a prefix adds its positions)
    modalities: tuple[str, ...] = ()   # prefix encoders on stage 0: catalogue, graph (text needs none)
    micro_batch_size: int = 1
    micro_batches: int = 32            # micro-batches per optimizer step (gradient accumulation)
    schedule: str = "1f1b"
    checkpointing: bool = True
    offload: bool = True               # optimizer state, master weights, gradient accumulators on the host
    master_weights: str = "fp32"       # fp32 | bf16-sr
    accum_dtype: str = "fp32"          # gradient accumulators: fp32 | bf16
    grad_accum_location: str = "host"  # with offload, where gradients sum: host | device | auto
    optimizer: str = "adamw8bit"       # adamw8bit | adamw (torch, fp32 or param-dtype moments)
    param_dtype: str | None = None     # bf16 | fp32; default bf16 on a GPU, fp32 on the CPU
    autocast: bool = False             # bf16 activations over fp32 weights (autocast keeps bf16 copies)
    hardware: str = "a5000"
    gpu_memory: int | None = None      # bytes per device; default: the hardware profile's
    host_memory: int = 256 * GIB
    max_device_fraction: float = 0.90  # the planner's device budget, and the profiler's alert line
    max_host_fraction: float = 0.90
    bucket_bytes: int = ENGINE_BUCKET_BYTES  # the offload engine's bucket: its host staging buffers' size
    staging_buffers: int = 2           # host staging buffers per stage (one filling, one accumulating)
    device_grads_in_flight: int = 2    # gradients on the device at once: one produced, one copying out
    loss_chunks: int = 1               # eager loss: head + cross-entropy computed in this many pieces
    kernels: str = "eager"             # the model's layers and loss: eager | fused (astrobio.model.use_kernels)
    vocab_size: int | None = None      # for presets that take the tokenizer's
    mfu: float | None = None           # hardware overrides
    host_link: float | None = None
    host_memory_bandwidth: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "modalities", check_modalities(self.modalities))
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULES:
            try:  # the pipeline's aliases (ZB_H1, zbh1, ...); anything else is refused below
                object.__setattr__(self, "schedule", normalize_kind(self.schedule))
            except ValueError:
                pass
        choices = {"schedule": SCHEDULES, "master_weights": ("fp32", "bf16-sr"), "accum_dtype": ("fp32", "bf16"),
                   "grad_accum_location": ("auto", "device", "host"),
                   "optimizer": ("adamw8bit", "adamw"), "param_dtype": (None, "bf16", "fp32"),
                   "kernels": ("eager", "fused")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of "
                                 f"{', '.join(str(a) for a in allowed if a is not None)}")
        for name in ("stages", "data_parallel", "seq_len", "micro_batch_size", "micro_batches", "loss_chunks",
                     "staging_buffers", "device_grads_in_flight", "bucket_bytes", "host_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        ranks = self.stages * self.data_parallel
        if self.ranks_per_machine is not None and not (1 <= self.ranks_per_machine <= ranks
                                                       and ranks % self.ranks_per_machine == 0):
            raise ValueError(f"ranks_per_machine={self.ranks_per_machine} must divide the job's {ranks} ranks "
                             f"({self.stages} stages x {self.data_parallel} replicas)")

    @property
    def machine_ranks(self) -> int:
        """Ranks per machine (default: the stages of one pipeline replica)."""
        return self.ranks_per_machine or self.stages


@dataclass
class Term:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class MemoryBudget:
    """Terms held at the peak moment, their sum, and the budget it must stay under."""
    label: str
    terms: list[Term]
    budget: int
    capacity: int
    moment: str = ""
    params: int = 0
    layers: tuple[int, int] = (0, 0)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass
class Plan:
    config: PlanConfig
    model: ModelConfig
    hardware: HardwareProfile
    split: list[int]
    stage_params: list[int]
    devices: list[MemoryBudget]
    host: MemoryBudget
    timing: StepTime
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.host.fits and (self.hardware.unified or all(d.fits for d in self.devices))

    @property
    def total_params(self) -> int:
        return sum(self.stage_params)

    def to_dict(self) -> dict:
        config = asdict(self.config)
        config["model"] = self.config.model if isinstance(self.config.model, str) else asdict(self.model)
        return {"config": config, "model": asdict(self.model), "hardware": asdict(self.hardware),
                "split": self.split, "stage_params": self.stage_params, "total_params": self.total_params,
                "fits": self.fits, "devices": [budget_dict(d) for d in self.devices],
                "host": budget_dict(self.host), "timing": asdict(self.timing), "notes": self.notes}


def budget_dict(b: MemoryBudget) -> dict:
    return {"label": b.label, "moment": b.moment, "params": b.params, "layers": list(b.layers),
            "terms": [asdict(t) for t in b.terms], "total": b.total, "budget": b.budget,
            "capacity": b.capacity, "fits": b.fits}
