"""The memory planner: what each pipeline stage's device and the host will hold, before anything runs.

``plan(PlanConfig(...)) -> Plan`` counts parameters from the model built on the meta device (per
stage; with ``modalities``, the prefix encoders from ``build_prefix(..., device="meta")`` on stage 0,
and their prefix positions before the tokens), activations from the layer's shapes
(astrobio.memory.activations), optimizer state per tensor from the 8-bit specification's block layout,
and estimates the step time (astrobio.memory.timing).
Refusing what will not fit is astrobio.memory.preflight's job.

A stage's device peak is taken at the worst moment of its steady-state step: the backward of the
last in-flight micro-batch, walked layer by layer (the loss, then each block from the last), with the
other in-flight micro-batches' activations, the gradients alive at that moment and the resident terms;
and, when the optimizer runs on the device, the optimizer step itself.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

from astrobio.memory import activations as act
from astrobio.memory.hardware import GIB, HardwareProfile, get_hardware
from astrobio.memory.timing import StepTime, estimate_step
from astrobio.model import ModelConfig, build_stage, even_split, get_config
from astrobio.model.encoders import build_prefix, check_modalities
from astrobio.spec.adamw8bit import BLOCK_SIZE, MIN_8BIT_NUMEL
from astrobio.parallel.schedules import compute_order, normalize_kind

SCHEDULES = ("gpipe", "1f1b", "zb-h1")
MiB = 2 ** 20
ENGINE_BUCKET_BYTES = 32 * MiB  # astrobio.optim.offload.OffloadEngine's default
PREFIX = "prefix."  # the prefix encoders' parameter names, as the trainer names them


@dataclass(frozen=True)
class PlanConfig:
    model: str | ModelConfig = "13b"
    stages: int = 2
    layers_per_stage: tuple[int, ...] | None = None
    seq_len: int = 2048                # tokens per sequence (a prefix adds its positions)
    modalities: tuple[str, ...] = ()   # prefix encoders on stage 0: catalogue, graph (text needs none)
    micro_batch_size: int = 1
    micro_batches: int = 32            # micro-batches per optimizer step (gradient accumulation)
    schedule: str = "1f1b"
    checkpointing: bool = True
    offload: bool = True               # optimizer state, master weights, gradient accumulators on the host
    master_weights: str = "fp32"       # fp32 | bf16-sr
    accum_dtype: str = "fp32"          # host gradient accumulators: fp32 | bf16
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
    loss_chunks: int = 1
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
                   "optimizer": ("adamw8bit", "adamw"), "param_dtype": (None, "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of "
                                 f"{', '.join(str(a) for a in allowed if a is not None)}")
        for name in ("stages", "seq_len", "micro_batch_size", "micro_batches", "loss_chunks",
                     "staging_buffers", "device_grads_in_flight", "bucket_bytes", "host_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


@dataclass
class StageShape:
    model: ModelConfig
    tokens: act.Tokens
    layers: int
    is_first: bool
    is_last: bool
    precision: act.Precision


def splits_backward(schedule: str, stage: int) -> bool:
    """ZB-H1 splits B and W on every stage but the first (the executor: stage 0 has no input to wait for)."""
    return schedule == "zb-h1" and stage > 0


def occupancy(schedule: str, stages: int, stage: int, micro_batches: int) -> list[tuple[int, int]]:
    """For each backward of the stage, in the schedule's order: how many other micro-batches it holds
    waiting for their B, and how many waiting for their W (from astrobio.parallel's schedule)."""
    split = splits_backward(schedule, stage)
    waiting_b: set[int] = set()
    waiting_w: set[int] = set()
    out = []
    for op, mb in compute_order(normalize_kind(schedule), stage, stages, micro_batches):
        if op == "F":
            waiting_b.add(mb)
        elif op == "B":
            waiting_b.discard(mb)
            out.append((len(waiting_b), len(waiting_w)))
            if split:
                waiting_w.add(mb)
        else:
            waiting_w.discard(mb)
    return out


def micro_batch_activations(s: StageShape, checkpointing: bool) -> int:
    """What one micro-batch leaves on a stage between its forward and its backward. A sent output is
    released once sent (the executor keeps its autograd edge only); a received input is kept for B."""
    m, t, p = s.model, s.tokens, s.precision
    if checkpointing:
        head = act.head_saved_bytes(m, t, p) if s.is_last else 0
        return s.layers * act.hidden_bytes(m, t, p) + head
    per_layer = act.block_saved_bytes(m, t, p) + act.block_input_saved(m, t, p)
    held_input = act.hidden_bytes(m, t, p) if (not s.is_first and p.residual < act.FP32) else 0
    head = act.head_saved_bytes(m, t, p) if s.is_last else 0
    return s.layers * per_layer + held_input + head


def caught_grad_bytes(s: StageShape, layers: int) -> int:
    """Gradients of Linear outputs that a split backward keeps for W: q, k, v, o, down (h wide),
    gate, up (f wide) per block; the logits' gradient on the last stage."""
    m, t, e = s.model, s.tokens.count, s.precision.matmul
    head = e * t * m.vocab_size if s.is_last else 0
    return layers * e * t * (5 * m.d_model + 2 * m.ffn_hidden) + head


def w_pending_bytes(s: StageShape, checkpointing: bool) -> int:
    """A micro-batch between its B and its W: the retained graph (its activations, and on the last
    stage the loss's fp32 log-probabilities) and the caught output gradients."""
    loss_saved = act.FP32 * s.tokens.count * s.model.vocab_size if s.is_last else 0
    return micro_batch_activations(s, checkpointing) + loss_saved + caught_grad_bytes(s, s.layers)


def module_key(name: str) -> str:
    """``layers.7.attn.wq.weight`` -> ``7``; ``embed.weight`` -> ``embed``."""
    return name.split(".")[1] if name.startswith("layers.") else name.split(".")[0]


def layer_grad_bytes(tensors: list[tuple[str, int]], grad_bytes: int) -> dict[str, int]:
    """Gradient bytes per block (keyed by its global index) and for the rest (embed, norm, head)."""
    out: dict[str, int] = {}
    for name, n in tensors:
        out[module_key(name)] = out.get(module_key(name), 0) + grad_bytes * n
    return out


def backward_moments(s: StageShape, cfg: PlanConfig, grads: dict[str, int], others: int, split: bool,
                     grads_resident: bool, grad_in_flight) -> list[tuple[str, int, int, int]]:
    """(moment, activations, loss working set, gradients) through one micro-batch's backward.

    Under a split backward (ZB-H1) the graph is retained for W, so nothing is freed as B proceeds and
    the caught Linear-output gradients pile up."""
    m, t, p = s.model, s.tokens, s.precision
    full = micro_batch_activations(s, cfg.checkpointing)
    layer_keys = sorted((k for k in grads if k.isdigit()), key=int)
    accumulated = sum(grads.values()) if (grads_resident and cfg.micro_batches > 1) else 0
    out = []
    done = 0
    if s.is_last:
        loss = act.loss_working_bytes(m, t, cfg.loss_chunks)
        # no gradient of this micro-batch exists yet; then the head's backward holds the logits'
        # gradient in the activation dtype and produces the head's (largest) weight gradient
        out.append(("backward of the loss", others + full, loss, accumulated))
        done = grads.get("head", 0) + grads.get("norm", 0)
        logits_grad = -(-p.matmul * t.count * m.vocab_size // cfg.loss_chunks)
        out.append(("backward of the head", others + full, logits_grad,
                    (accumulated or done) if grads_resident else grad_in_flight("head")))
    hidden = act.hidden_bytes(m, t, p)
    # under checkpointing the block input is the checkpoint itself, already counted in ``hidden``
    saved = act.block_saved_bytes(m, t, p) + (0 if cfg.checkpointing else act.block_input_saved(m, t, p))
    transient = act.block_backward_transient(m, t, p)
    head_saved = act.head_saved_bytes(m, t, p) if s.is_last else 0
    retained_loss = act.FP32 * t.count * m.vocab_size if (split and s.is_last) else 0
    for i in range(s.layers - 1, -1, -1):
        if split:
            held = full + retained_loss + caught_grad_bytes(s, s.layers - i) + transient
            held += saved if cfg.checkpointing else 0
        elif cfg.checkpointing:
            held = (i + 1) * hidden + saved + transient
        else:
            held = full - (s.layers - 1 - i) * saved - head_saved + transient
        done += grads[layer_keys[i]]
        g = (accumulated or done) if grads_resident else grad_in_flight(layer_keys[i])
        out.append((f"backward of block {layer_keys[i]}", others + held, 0, g))
    if s.is_first:
        g = (accumulated or sum(grads.values())) if grads_resident else grad_in_flight("embed")
        out.append(("backward of the embedding", others, 0, g))
    if s.is_first and "prefix" in grads:
        g = (accumulated or sum(grads.values())) if grads_resident else grad_in_flight("prefix")
        out.append(("backward of the prefix encoders", others, 0, g))
    return out


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


@dataclass
class PeakMoment:
    name: str
    activations: int
    loss: int
    gradients: int
    casts: int      # autocast's bf16 copies of fp32 weights
    waiting_b: int  # other micro-batches held, waiting for their B
    waiting_w: int  # ... waiting for their W

    @property
    def total(self) -> int:
        return self.activations + self.loss + self.gradients + self.casts


@dataclass
class CastCopies:
    """Bytes of autocast's bf16 copies of fp32 matrix weights: of the whole stage (the cache at the end
    of a forward, and what a graph without checkpointing saves), of one block (a recomputed block's
    graph) and of the head (saved outside the checkpointed blocks)."""
    stage: int = 0
    block: int = 0
    head: int = 0

    @classmethod
    def of(cls, cfg: PlanConfig, tensors: list[tuple[str, int]], param_bytes: int) -> "CastCopies":
        if not (cfg.autocast and param_bytes == 4):
            return cls()
        matrices = {name: n for name, n in tensors if name.endswith("weight") and "norm" not in name
                    and not name.startswith("embed")}
        per_block = layer_grad_bytes([(k, n) for k, n in matrices.items() if k.startswith("layers.")], 2)
        return cls(stage=2 * sum(matrices.values()), block=max(per_block.values(), default=0),
                   head=2 * matrices.get("head.weight", 0))


def peak_moment(cfg: PlanConfig, s: StageShape, stage: int, tensors: list[tuple[str, int]],
                param_bytes: int) -> PeakMoment:
    """The moment of the step when the stage's activations, loss and gradients add up the most."""
    grads = layer_grad_bytes(tensors, param_bytes)
    largest = largest_gradient(tensors, param_bytes)

    def grad_in_flight(key: str) -> int:
        """The engine copies each gradient out and frees it: the largest of ``key``'s being produced
        while the previous one copies."""
        return cfg.device_grads_in_flight * largest[key]

    per_mb, per_w = micro_batch_activations(s, cfg.checkpointing), w_pending_bytes(s, cfg.checkpointing)
    n_b, n_w = max(occupancy(cfg.schedule, cfg.stages, stage, cfg.micro_batches),
                   key=lambda bw: bw[0] * per_mb + bw[1] * per_w)
    others = n_b * per_mb + n_w * per_w
    split = splits_backward(cfg.schedule, stage)
    casts = CastCopies.of(cfg, tensors, param_bytes)
    held_casts = (n_b + n_w) * (casts.head if cfg.checkpointing else casts.stage)
    own_casts = casts.block + casts.head if cfg.checkpointing else casts.stage
    moments = [PeakMoment(name, a, loss, g, held_casts + own_casts, n_b, n_w) for name, a, loss, g
               in backward_moments(s, cfg, grads, others, split, not cfg.offload, grad_in_flight)]
    accumulated = sum(grads.values()) if (not cfg.offload and cfg.micro_batches > 1) else 0
    if casts.stage:
        moments.append(PeakMoment("end of a forward", others + per_mb, 0, accumulated, held_casts + casts.stage,
                                  n_b, n_w))
    if not cfg.offload:
        moments.append(PeakMoment("optimizer step", 0, 0, sum(grads.values()), 0, n_b, n_w))
    return max(moments, key=lambda moment: moment.total)


def plan_stage(cfg: PlanConfig, hw: HardwareProfile, s: StageShape, stage: int,
               tensors: list[tuple[str, int]], param_bytes: int) -> MemoryBudget:
    peak = peak_moment(cfg, s, stage, tensors, param_bytes)
    terms = resident_terms(cfg, tensors, param_bytes)
    if peak.casts:
        terms.append(Term("autocast bf16 weight copies", peak.casts, "autocast's casts of fp32 weights, at the peak moment"))
    grad_detail = (f"{cfg.device_grads_in_flight} in flight, streamed to the host" if cfg.offload
                   else "resident on the device, at the peak moment")
    terms.append(Term("gradients", peak.gradients, grad_detail))
    how = ("layer-boundary checkpoints + one block's recompute working set" if cfg.checkpointing
           else "every block's saved tensors")
    waiting_w = f", {peak.waiting_w} more waiting for W" if peak.waiting_w else ""
    terms.append(Term("activations", peak.activations,
                      f"{peak.waiting_b + 1} micro-batch(es) in flight ({cfg.schedule}{waiting_w}); {how}"))
    terms.append(Term("logits + loss", peak.loss, f"last stage, {cfg.loss_chunks} chunk(s); at the peak moment"))
    allocated = sum(t.bytes for t in terms)
    terms.append(Term("allocator slack", int(hw.allocator_slack * allocated), f"{hw.allocator_slack:.0%} of allocated"))
    if hw.context_bytes:
        terms.append(Term("CUDA context", hw.context_bytes, "context, cuBLAS workspace, NCCL buffers"))
    capacity = cfg.gpu_memory or hw.device_memory
    return MemoryBudget(label=f"stage {stage}", terms=terms, budget=int(cfg.max_device_fraction * capacity),
                        capacity=capacity, moment=peak.name, params=sum(n for _, n in tensors))


# ---------------------------------------------------------------------------------------------------
# host


def plan_host(cfg: PlanConfig, hw: HardwareProfile, tensors: list[list[tuple[str, int]]],
              devices: list[MemoryBudget], param_bytes: int) -> MemoryBudget:
    """Host terms as astrobio.optim.offload.OffloadEngine lays them out: per bucket flat master,
    accumulator and (fp32 master over bf16 weights) bf16 upload buffers, pinned on a CUDA machine;
    a pool of gradient staging buffers of the largest bucket's size; moments per parameter."""
    numels = [n for stage in tensors for _, n in stage]
    n_params = sum(numels)
    terms = []
    if cfg.offload:
        master = 4 if cfg.master_weights == "fp32" else 2
        terms.append(Term(f"master weights ({cfg.master_weights})", master * n_params,
                          "fp32" if master == 4 else "bf16, stochastic rounding; also the upload source"))
        terms.append(Term(f"optimizer moments ({cfg.optimizer})", moments_bytes(numels, cfg.optimizer, 4),
                          "8-bit m, v + fp32 absmax per 256" if cfg.optimizer == "adamw8bit" else "fp32 m, v"))
        acc = 4 if cfg.accum_dtype == "fp32" else 2
        terms.append(Term(f"gradient accumulators ({cfg.accum_dtype})", acc * n_params, "summed over micro-batches"))
        if master == 4 and param_bytes == 2:  # not for the fp32 prefix encoders
            uploaded = sum(n for stage in tensors for name, n in stage if not name.startswith(PREFIX))
            terms.append(Term("bf16 upload copy", 2 * uploaded,
                              "new weights written by the step, copied to the device"))
        staging = sum(cfg.staging_buffers * largest_bucket(stage, cfg.bucket_bytes, param_bytes) for stage in tensors)
        terms.append(Term("gradient staging", staging, f"{cfg.staging_buffers} buffers of the largest bucket per stage"))
    if hw.unified:
        terms.extend(Term(f"{d.label} (device = host memory)", d.total, d.moment) for d in devices)
    if hw.process_host_bytes:
        terms.append(Term("process runtime", cfg.stages * hw.process_host_bytes,
                          f"{cfg.stages} process(es): torch + CUDA libraries"))
    return MemoryBudget(label="host", terms=terms, budget=int(cfg.max_host_fraction * cfg.host_memory),
                        capacity=cfg.host_memory, params=n_params)


def largest_bucket(tensors: list[tuple[str, int]], bucket_bytes: int, param_bytes: int) -> int:
    """The largest of the engine's greedy buckets (backward order; a parameter larger than a bucket is
    its own), which sizes its staging buffers."""
    largest = size = 0
    for _, n in reversed(tensors):
        size = n * param_bytes if size and size + n * param_bytes > bucket_bytes else size + n * param_bytes
        largest = max(largest, size)
    return largest


def largest_gradient(tensors: list[tuple[str, int]], param_bytes: int) -> dict[str, int]:
    """The largest parameter gradient of each block (keyed by its index) and of embed, norm, head."""
    out: dict[str, int] = {}
    for name, n in tensors:
        out[module_key(name)] = max(out.get(module_key(name), 0), param_bytes * n)
    return out


def pinned_bytes(p: "Plan") -> int:
    """Host bytes in page-locked memory (the engine pins its flat buffers when the device is CUDA)."""
    if p.hardware.unified or not p.config.offload:
        return 0
    return sum(t.bytes for t in p.host.terms if not t.name.startswith(("optimizer moments", "process runtime")))


# ---------------------------------------------------------------------------------------------------
# the plan


def plan(cfg: PlanConfig) -> Plan:
    """Plans device memory per stage, host memory, and the step time for ``cfg``."""
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
    precision = act.Precision.of(param_bytes, cfg.autocast)
    layers_only = stage_tensors(model, tuple(split))
    tensors = [[*layers_only[0], *encoders], *layers_only[1:]]  # the encoders live on stage 0
    tokens = act.Tokens(cfg.micro_batch_size, positions)
    devices = []
    for s, layers in enumerate(split):
        shape = StageShape(model, tokens, layers, s == 0, s == len(split) - 1, precision)
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
