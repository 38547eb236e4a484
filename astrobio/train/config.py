"""The training configuration: one dataclass, its command-line flags, YAML/TOML files with the same keys,
and validation.

Precedence: the dataclass defaults, then a ``--config`` file, then the flags given on the command line.
Keys in a file are the flag names with or without the leading dashes, hyphens or underscores alike
(``micro-batch-size`` or ``micro_batch_size``). Every check here runs before the trainer writes anything;
a failure raises ``ConfigError``, which the CLI turns into exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from astrobio.model import PRESETS, get_config
from astrobio.model.presets import TRAINING_DEFAULTS

SCHEDULES = ("1f1b", "gpipe", "zb-h1")
MASTER_WEIGHTS = ("fp32", "bf16-sr")
ACCUM_DTYPES = ("fp32", "bf16")
GRAD_ACCUM_LOCATIONS = ("auto", "device", "host")
OFFLOAD_BY_DEFAULT = ("13b",)  # presets whose optimizer state does not fit next to the weights
DEVICES = ("cpu", "cuda", "auto")
KERNEL_CHOICES = ("auto", "eager", "fused")
COMPILE_CHOICES = ("auto", "on", "off")
COUNT_OR_AUTO = ("data_parallel",)  # string fields holding "auto" or a whole number
DEFAULT_STEPS = 400  # the default job: enough for tiny to learn hz and type (docs/TRAINING.md)


class ConfigError(ValueError):
    """A bad configuration: the message names the value, what was expected, and how to fix it."""


def flag(name: str) -> str:
    """The command-line flag of a config field: ``micro_batch_size`` -> ``--micro-batch-size``."""
    return "--" + name.replace("_", "-")


def option(default, help: str, kind: type | None = None, choices: tuple | None = None):
    """A config field with its flag's help text; ``kind`` is needed where the default is None."""
    kind = kind or type(default)
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass
class TrainConfig:
    model: str = option("tiny", "model preset", choices=tuple(PRESETS))
    steps: int | None = option(None, f"optimizer steps (default {DEFAULT_STEPS} unless --epochs is given)", int)
    epochs: int | None = option(None, "passes over the training split, instead of --steps", int)
    batch_size: int | None = option(None, "sequences per optimizer step, over all replicas (default replicas x "
                                    "micro-batch x accumulation)", int)
    micro_batch_size: int | None = option(None, "sequences per forward/backward (default 16, 4 with several "
                                          "pipeline stages, or the batch size / accumulation)", int)
    gradient_accumulation_steps: int | None = option(None, "micro-batches per optimizer step and replica (default "
                                                     "batch size / (replicas x micro-batch size), or 1)", int)
    seq_len: int = option(128, "tokens per training sequence")
    lr: float | None = option(None, "peak learning rate (default: the --model preset's, e.g. 3e-3 for tiny, "
                              "1e-4 for 13b)", float)
    min_lr: float | None = option(None, "learning rate at the end of the cosine decay (default: the --model "
                                  "preset's, or --lr / 10 when --lr is given)", float)
    warmup_steps: int | None = option(None, "linear warm-up steps before the cosine decay (default: the --model "
                                      "preset's)", int)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW)")
    beta1: float | None = option(None, "AdamW beta1 (default: the --model preset's)", float)
    beta2: float | None = option(None, "AdamW beta2 (default: the --model preset's)", float)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    use_8bit_optimizer: bool = option(True, "astrobio's 8-bit AdamW (off: torch.optim.AdamW)")
    use_mixed_precision: bool = option(False, "bf16 autocast for forward and backward")
    use_gradient_checkpointing: bool = option(False, "recompute each block's activations in backward")
    kernels: str = option("auto", "the model's layers and loss: fused (Triton kernels, chunked cross-entropy), "
                          "eager (PyTorch), or auto (fused on CUDA, eager on the CPU)", choices=KERNEL_CHOICES)
    compile: str = option("auto", "torch.compile each transformer block: on, off, or auto (on with CUDA, off on "
                          "the CPU)", choices=COMPILE_CHOICES)
    log_every_n_steps: int = option(1, "write a metrics.jsonl line every N steps")
    eval_every_n_steps: int = option(25, "validation loss every N steps (also at step 0 and the end; "
                                     "0 = only those)")
    eval_batches: int = option(4, "micro-batches of the validation split per evaluation (0 = all of it)")
    save_every_n_steps: int = option(50, "checkpoint every N steps (0 = only at the end)")
    save_every_n_epochs: int = option(0, "checkpoint every N epochs (0 = off)")
    keep_last_k: int = option(2, "checkpoints to keep")
    output_dir: str = option("runs/default", "where config.json, metrics.jsonl, checkpoints/ and plots/ go")
    resume: str | None = option(None, "a checkpoint directory, or 'auto' for the newest valid one in "
                                "--output-dir", str)
    overwrite: bool = option(False, "replace a previous run's outputs in --output-dir")
    stop_at_step: int | None = option(None, "stop (with a checkpoint) after this step, as if interrupted; "
                                      "the schedule still spans --steps", int)
    seed: int = option(0, "seed for initialisation and data order")
    data: str = option("builtin", "a data source URI: builtin, builtin:N, a file (OEC .xml/.xml.gz, .txt, .jsonl, "
                       ".csv) or http(s)://... (docs/DATA_SOURCES.md)")
    modalities: str = option("text", "comma-separated: text, and catalogue and/or graph prefix encoders")
    tokenizer: str | None = option(None, "a Hugging Face tokenizer.json (default: bytes)", str)
    device: str = option("cpu", "cpu, cuda, or auto (cuda when available)", choices=DEVICES)
    wandb_project: str | None = option(None, "log to Weights & Biases under this project (offline unless "
                                       "WANDB_MODE or WANDB_API_KEY say otherwise)", str)
    wandb_name: str | None = option(None, "W&B run name", str)
    pipeline_stages: int | None = option(None, "pipeline stages: processes started here (gloo on the CPU, NCCL on "
                                         "GPUs), or torchrun's (default 1)", int)
    data_parallel: str = option("auto", "replicas of the pipeline, each training on its own share of every step's "
                                "micro-batches: K, or auto (torchrun's ranks / --pipeline-stages; started "
                                "plainly: 2 on a CPU of 2 or more cores with --modalities text and no "
                                "--pipeline-stages, else 1)", str)
    schedule: str = option("1f1b", "pipeline schedule", choices=SCHEDULES)
    pipeline_timeout: float = option(60.0, "seconds a pipeline rank waits for a silent peer before it stops")
    use_cpu_offloading: bool | None = option(None, "keep optimizer state, master weights and gradient "
                                             "accumulators in host memory (default: on for 13b, else off)", bool)
    master_weights: str = option("fp32", "offloaded master weights: fp32, or bf16 with stochastic rounding",
                                 choices=MASTER_WEIGHTS)
    accum_dtype: str = option("fp32", "offloaded gradient accumulators", choices=ACCUM_DTYPES)
    grad_accum_location: str = option("auto", "where offloaded gradients are summed over micro-batches: device "
                                      "(sent to the host once per step), host (every micro-batch's are sent), "
                                      "or auto (device where the memory planner fits the accumulators)",
                                      choices=GRAD_ACCUM_LOCATIONS)
    gpu_memory_limit: str | None = option(None, "cap each process's GPU memory, e.g. 24GiB (ranks sharing a GPU "
                                          "each get this cap; the memory preflight plans against it)", str)
    force: bool = option(False, "start even where the memory preflight predicts the run will not fit")
    profile_every_n_steps: int | None = option(None, "memory profile every N steps (default: "
                                               "--log-every-n-steps)", int)
    memory_alert_fraction: float = option(0.9, "alert when device memory passes this fraction")

    def to_dict(self) -> dict:
        """The config as written to config.json, checkpoints and W&B: ``data`` without credentials."""
        from astrobio.data.sources import redact_uri
        return {**asdict(self), "data": redact_uri(self.data)}


FIELDS = {f.name: f for f in fields(TrainConfig)}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message):
        raise ConfigError(f"{message} (see python -m astrobio.train --help)")


def build_parser() -> argparse.ArgumentParser:
    """Flags named after the fields; absent flags stay absent (SUPPRESS) so a --config file can fill them."""
    parser = _Parser(prog="python -m astrobio.train", description="Train RebuiltLLMIntegration.",
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="a YAML or TOML file with the same keys as these flags")
    for name, f in FIELDS.items():
        meta = f.metadata
        help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {f.default})"
        if meta["kind"] is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag(name), type=meta["kind"], choices=meta["choices"], help=help_text,
                                metavar=None if meta["choices"] else name.upper())
    return parser


def read_config_file(path: str) -> dict:
    """The file's keys, normalised to field names; unknown keys and wrong types are errors."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found; pass an existing .yaml, .yml or .toml file")
    try:
        if file.suffix == ".toml":
            raw = tomllib.loads(file.read_text())
        elif file.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(file.read_text()) or {}
        else:
            raise ConfigError(f"config file {path!r} must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid {file.suffix[1:].upper()}: {reason}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    values = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown key {key!r} in {path}; valid keys are the flag names, e.g. "
                              f"micro_batch_size (see --help)")
        values[name] = coerce(name, value, path)
    return values


def coerce(name: str, value, source: str):
    """A file value checked against the field's kind (ints are accepted where floats are expected)."""
    meta = FIELDS[name].metadata
    kind, choices = meta["kind"], meta["choices"]
    if name in COUNT_OR_AUTO and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # e.g. data_parallel: 2 in a YAML file
    ok = (value is None and FIELDS[name].default is None) or (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name} in {source} must be {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{name} in {source} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < --config file < command-line flags, then resolved and validated."""
    args = vars(build_parser().parse_args(argv))
    values = read_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    return validate(resolve_batch(resolve_replicas(resolve_stages(TrainConfig(**values)))))


def resolve_stages(config: TrainConfig) -> TrainConfig:
    """The default layout, where ``--pipeline-stages`` is not given: one stage. Started plainly on the
    CPU with text and ``--data-parallel auto`` (the default job), two whole-model replicas, one process
    per core, where the machine has two cores and the batch splits over them; a step then takes 16
    sequences (8 per replica) unless the batch flags say otherwise. Two replicas trained tiny 1.34x
    faster on two cores than the 2-stage pipeline, whose ranks wait for each other about a quarter of
    each step (docs/TRAINING.md)."""
    if config.pipeline_stages is not None:
        return config
    from astrobio.model.encoders import check_modalities
    try:
        text_only = not check_modalities(config.modalities)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    config = replace(config, pipeline_stages=1)
    if not (text_only and computes_on_cpu(config.device) and config.data_parallel == "auto"
            and torchrun_world_size() is None and usable_cores() >= 2):
        return config
    batch = (config.batch_size, config.micro_batch_size, config.gradient_accumulation_steps)
    two = replace(config, data_parallel="2", batch_size=16 if batch == (None, None, None) else config.batch_size)
    try:
        resolve_batch(two)
    except ConfigError:
        return config  # e.g. --batch-size 9: one process takes it
    return two


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when this process is a rank started by torchrun, else None."""
    from astrobio.parallel.launch import under_torchrun
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else None


def resolve_replicas(config: TrainConfig) -> TrainConfig:
    """``--data-parallel`` as a number: auto is torchrun's ranks / the stages (1 when started plainly,
    where the ranks are spawned here: replicas x stages of them). Under torchrun the ranks must be
    exactly replicas x stages."""
    value, stages, world = config.data_parallel, config.pipeline_stages, torchrun_world_size()
    if stages is not None and stages < 1:
        return config  # check_counts names the bad --pipeline-stages
    if str(value) == "auto":
        if world is not None and world % stages:
            raise ConfigError(f"torchrun started {world} ranks, which do not split into pipelines of "
                              f"--pipeline-stages {stages}; start a multiple of {stages} ranks "
                              f"(--nnodes x --nproc-per-node) or give another --pipeline-stages")
        replicas = world // stages if world is not None else 1
    else:
        replicas = int(value) if str(value).isdigit() else 0
        if replicas < 1:
            raise ConfigError(f"--data-parallel must be auto or a whole number >= 1, got {value!r}")
        if world is not None and world != replicas * stages:
            raise ConfigError(f"torchrun started {world} ranks but --data-parallel {replicas} x --pipeline-stages "
                              f"{stages} needs {replicas * stages}; start {replicas * stages} ranks (--nnodes x "
                              f"--nproc-per-node) or pass --data-parallel auto")
    return replace(config, data_parallel=str(replicas))


def replicas(config: TrainConfig) -> int:
    """The data-parallel degree of a resolved config (``--data-parallel``)."""
    return int(resolve_replicas(config).data_parallel)


def micro_batches_per_step(config: TrainConfig) -> int:
    """Micro-batches one optimizer step takes from the data, over all replicas."""
    return replicas(config) * config.gradient_accumulation_steps


def resolve_batch(config: TrainConfig) -> TrainConfig:
    """Fills whichever of batch size (over all replicas), micro-batch size and accumulation steps (per
    replica) is missing; any two given determine the third, and all three given must agree."""
    batch, micro, accum = config.batch_size, config.micro_batch_size, config.gradient_accumulation_steps
    k = replicas(config)
    per = f" x {k} replicas" if k > 1 else ""
    for name, value in (("batch_size", batch), ("micro_batch_size", micro),
                        ("gradient_accumulation_steps", accum)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
    if batch is None and micro is None and accum is None and config.pipeline_stages > 1:
        micro, accum = 4, 4  # the same 16 sequences a step, as 4 micro-batches to fill the pipeline
    if batch is None:
        micro = micro or 16
        accum = accum or 1
        batch = k * micro * accum
    elif micro is None:
        accum = accum or 1
        if batch % (k * accum):
            raise ConfigError(f"--gradient-accumulation-steps {accum}{per} does not divide --batch-size {batch}; "
                              f"choose a divisor of {batch}")
        micro = batch // (k * accum)
    else:
        if batch % (k * micro):
            hint = (f"choose a divisor of {batch} (e.g. {largest_divisor(batch, micro)})" if k == 1
                    else f"choose a --batch-size that is a multiple of {k * micro}")
            raise ConfigError(f"--micro-batch-size {micro}{per} does not divide --batch-size {batch}; {hint}")
        if accum is not None and k * micro * accum != batch:
            raise ConfigError(f"--batch-size {batch} != --micro-batch-size {micro} x --gradient-accumulation-steps "
                              f"{accum}{per}; give two of the three, or make them agree")
        accum = batch // (k * micro)
    return replace(config, batch_size=batch, micro_batch_size=micro, gradient_accumulation_steps=accum)


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def validate(config: TrainConfig) -> TrainConfig:
    """Checks that need no data and write nothing; returns the config with ``steps`` defaulted."""
    check_choices(config)
    config = resolve_optimizer_defaults(config)
    check_counts(config)
    check_optimizer(config)
    check_model(config)
    if config.steps is not None and config.epochs is not None:
        raise ConfigError(f"give --steps ({config.steps}) or --epochs ({config.epochs}), not both")
    if config.steps is None and config.epochs is None:
        config = replace(config, steps=DEFAULT_STEPS)
    if config.use_cpu_offloading is None:
        config = replace(config, use_cpu_offloading=config.model in OFFLOAD_BY_DEFAULT)
    check_offload(config)
    return config


def computes_on_cpu(device: str) -> bool:
    import torch
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def resolve_optimizer_defaults(config: TrainConfig) -> TrainConfig:
    """The --model preset's learning rates, warm-up and betas where no flag or file gave them
    (astrobio.model.presets.TRAINING_DEFAULTS); with --lr given, --min-lr defaults to a tenth of it."""
    defaults = TRAINING_DEFAULTS[config.model]
    lr = defaults.lr if config.lr is None else config.lr
    min_lr = defaults.min_lr if config.lr is None else config.lr / 10
    given = {"lr": lr, "min_lr": min_lr if config.min_lr is None else config.min_lr,
             "warmup_steps": defaults.warmup_steps if config.warmup_steps is None else config.warmup_steps,
             "beta1": defaults.betas[0] if config.beta1 is None else config.beta1,
             "beta2": defaults.betas[1] if config.beta2 is None else config.beta2}
    return replace(config, **given)


def check_choices(config: TrainConfig) -> None:
    for name, f in FIELDS.items():
        choices, value = f.metadata["choices"], getattr(config, name)
        if choices and value not in choices:
            raise ConfigError(f"unknown {flag(name)} {value!r}; choose one of {', '.join(choices)}")


def check_counts(config: TrainConfig) -> None:
    positive = ("seq_len", "log_every_n_steps", "keep_last_k", "pipeline_stages", "steps", "epochs",
                "stop_at_step", "profile_every_n_steps")
    non_negative = ("warmup_steps", "eval_every_n_steps", "eval_batches", "save_every_n_steps",
                    "save_every_n_epochs", "seed")
    for name in positive:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(config, name)}")


def check_optimizer(config: TrainConfig) -> None:
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {config.lr}")
    if not (math.isfinite(config.min_lr) and 0 <= config.min_lr <= config.lr):
        raise ConfigError(f"--min-lr must be in [0, --lr {config.lr}], got {config.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"{flag(name)} must be in [0, 1), got {getattr(config, name)}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not config.pipeline_timeout > 0:
        raise ConfigError(f"--pipeline-timeout must be > 0 seconds, got {config.pipeline_timeout}")
    if not 0 < config.memory_alert_fraction <= 1:
        raise ConfigError(f"--memory-alert-fraction must be in (0, 1], got {config.memory_alert_fraction}")
    if not (math.isfinite(config.max_grad_norm) and config.max_grad_norm >= 0):
        raise ConfigError(f"--max-grad-norm must be >= 0 (0 = no clipping), got {config.max_grad_norm}")


def prefix_len(config: TrainConfig) -> int:
    """Prefix positions the --modalities add before the tokens (0 for text alone)."""
    from astrobio.model.encoders import prefix_positions
    try:
        return prefix_positions(config.modalities)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_model(config: TrainConfig) -> None:
    max_seq_len = get_config(config.model).max_seq_len
    prefix = prefix_len(config)
    if config.pipeline_stages > get_config(config.model).n_layers:
        raise ConfigError(f"--pipeline-stages {config.pipeline_stages} exceeds model {config.model!r}'s "
                          f"{get_config(config.model).n_layers} layers; use fewer stages")
    if config.seq_len + prefix > max_seq_len:
        with_prefix = f" + {prefix} prefix positions ({config.modalities})" if prefix else ""
        raise ConfigError(f"--seq-len {config.seq_len}{with_prefix} exceeds model {config.model!r}'s max_seq_len "
                          f"{max_seq_len}; use --seq-len {max_seq_len - prefix} or less")


def check_offload(config: TrainConfig) -> None:
    if config.use_cpu_offloading and not config.use_8bit_optimizer:
        raise ConfigError("--use-cpu-offloading runs the 8-bit AdamW on the host; drop --no-use-8bit-optimizer "
                          "or pass --no-use-cpu-offloading")
    if not config.use_cpu_offloading:
        for name in ("master_weights", "accum_dtype"):
            if getattr(config, name) != "fp32":
                raise ConfigError(f"{flag(name)} {getattr(config, name)} applies to offloaded optimizer state; add "
                                  f"--use-cpu-offloading or use {flag(name)} fp32")


def check_environment(config: TrainConfig) -> None:
    """Checks against the file system and installed packages (still writing nothing)."""
    check_output_dir(config.output_dir)
    local = not config.data.startswith("builtin") and "://" not in config.data and "#" not in config.data
    if local and not Path(config.data).is_file():
        raise ConfigError(f"--data file {config.data!r} not found; pass an existing file, a URL or 'builtin'")
    if config.tokenizer is not None and not Path(config.tokenizer).exists():
        raise ConfigError(f"--tokenizer {config.tokenizer!r} not found; pass a tokenizer.json or its folder")
    if config.resume not in (None, "auto") and not Path(config.resume).is_dir():
        raise ConfigError(f"--resume {config.resume!r} is not a directory; pass a run's --output-dir, one of "
                          f"its checkpoints/step-N, or 'auto'")
    import torch
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    if config.gpu_memory_limit is not None and (config.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(f"--gpu-memory-limit {config.gpu_memory_limit} caps a GPU, but this run computes on "
                          f"the CPU; drop it, or use --device cuda on a machine with a GPU")
    if config.wandb_project is not None:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"--wandb-project {config.wandb_project!r} needs wandb, which is not "
                              f"installed; pip install wandb, or drop --wandb-project")


def check_output_dir(path: str) -> None:
    """The directory, or its nearest existing ancestor, must be a writable directory."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output-dir {path!r} exists and is not a directory; choose another path")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {path!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {path!r} is not writable ({str(existing)!r} denies writing); "
                          f"choose a writable --output-dir")
