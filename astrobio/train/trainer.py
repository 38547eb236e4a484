"""The trainer behind ``python -m astrobio.train``: a loop over parts made by small builders.

    build_data        tokenizer, packed training loader, fixed validation batches
    build_model       RebuiltLLMIntegration from a preset, seeded
    build_optimizer   astrobio's 8-bit AdamW (default) or torch.optim.AdamW
    build_schedule    linear warm-up, then cosine decay to --min-lr
    build_step_runner how one step's micro-batches run forward and backward (one process here; the
                      pipeline plugs in as another StepRunner)
    build_checkpointer, build_logger

One optimizer step: the step runner runs the step's micro-batches, each loss scaled by 1/accumulation
so the accumulated gradient is the full batch's; then ``optimizer_step`` clips the global gradient
norm and applies the update (a step with a non-finite gradient is skipped and counted).

``prepare`` does everything that can fail on a bad configuration (flags, paths, data, the checkpoint to
resume) before the output directory is touched; ``main`` turns those failures into exit code 2.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from astrobio.model import build_model as build_transformer
from astrobio.model import get_config
from astrobio.train.checkpoint import (CheckpointError, Checkpointer, load_checkpoint, optimizer_by_index,
                                      optimizer_by_name, write_part)
from astrobio.train.data import DataBundle, build_data
from astrobio.train.config import ConfigError, TrainConfig, check_environment, parse_config, prefix_len
from astrobio.train.logging import MetricsLogger, NullLogger, memory_stats, read_metrics
from astrobio.train.memory import build_profiler, memory_fields, plot_memory_records, preflight_run, weights_dtype
from astrobio.train.pipeline import (PipelineStepRunner, SingleProcess, bubble_of, plot_pipeline, run_pipeline,
                                     torchrun_rank)
from astrobio.train.plots import plot_loss

# A resumed run must match its checkpoint in these keys (the rest, e.g. --steps or --lr, may change).
RESUME_KEYS = ("model", "seq_len", "micro_batch_size", "gradient_accumulation_steps", "data", "tokenizer",
               "seed", "use_8bit_optimizer", "modalities", "use_cpu_offloading", "master_weights", "accum_dtype")
# Outputs of a run; --overwrite deletes exactly these.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "plots", "wandb")

Batch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------- builders

def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    model = build_transformer(get_config(config.model, vocab_size=vocab_size), seed=config.seed, device=device,
                              dtype=weights_dtype(config, device))
    model.gradient_checkpointing = config.use_gradient_checkpointing
    return model


def build_offload_engine(config: TrainConfig, named: list[tuple[str, nn.Parameter]], module: nn.Module | None,
                         index_offset: int = 0):
    """astrobio.optim.offload.OffloadEngine over ``named``: master weights, 8-bit moments and gradient
    accumulators on the host; clipping and skip-on-non-finite inside its ``end_step``. ``module``: the
    module whose forward waits per bucket for the updated weights (None: ``end_step`` waits)."""
    from astrobio.optim.offload import OffloadEngine
    return OffloadEngine(named, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
                         max_grad_norm=config.max_grad_norm or None, accum_dtype=config.accum_dtype,
                         master_weights=config.master_weights, module=module, seed=config.seed,
                         index_offset=index_offset)


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    betas = (config.beta1, config.beta2)
    if config.use_8bit_optimizer:
        from astrobio.optim import AdamW8bit
        return AdamW8bit(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)


class WarmupCosine:
    """Learning rate of the step with 0-based index ``step``: linear warm-up over ``warmup`` steps to
    ``peak``, then a half cosine down to ``floor`` at step ``total``. A pure function of the step, so
    resuming needs only the step count."""

    def __init__(self, peak: float, floor: float, warmup: int, total: int):
        self.peak, self.floor, self.warmup, self.total = peak, floor, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"peak": self.peak, "floor": self.floor, "warmup": self.warmup, "total": self.total}


def build_schedule(config: TrainConfig) -> WarmupCosine:
    return WarmupCosine(config.lr, config.min_lr, config.warmup_steps, config.steps)


def build_checkpointer(config: TrainConfig) -> Checkpointer:
    return Checkpointer(Path(config.output_dir) / "checkpoints", config.keep_last_k)


def build_logger(config: TrainConfig) -> MetricsLogger:
    return MetricsLogger(config.output_dir, config.to_dict(), config.wandb_project, config.wandb_name)


# ------------------------------------------------------------------------------------ running steps

def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class StepRunner(Protocol):
    """Runs micro-batches through the model. ``forward_backward`` accumulates gradients into ``.grad``
    (each micro-batch's loss scaled by 1/len(micro_batches)) and returns the step's mean loss;
    ``evaluate`` returns the mean loss without gradients."""

    def forward_backward(self, micro_batches: list[Batch]) -> float: ...

    def evaluate(self, batches: list[Batch]) -> float: ...


class LocalStepRunner:
    """All micro-batches through one whole model in this process. With ``prefix`` (a MultimodalPrefix)
    the micro-batches are MultimodalBatch: the prefix embeddings go before the tokens and the loss
    covers the token positions only."""

    def __init__(self, model: nn.Module, device: torch.device, mixed_precision: bool,
                 prefix: nn.Module | None = None):
        self.model = model
        self.device = device
        self.mixed_precision = mixed_precision
        self.prefix = prefix

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)

    def train(self, mode: bool) -> None:
        for module in (self.model, self.prefix):
            if module is not None:
                module.train(mode)

    def loss(self, batch) -> torch.Tensor:
        """One micro-batch's mean loss."""
        if self.prefix is None:
            inputs, targets = batch
            return lm_loss(self.model(inputs.to(self.device)), targets.to(self.device))
        from astrobio.model.encoders import prefix_lm_loss
        batch = batch.to(self.device)
        logits = self.model(batch.tokens, prefix=self.prefix(**batch.prefix_inputs()))
        return prefix_lm_loss(logits, batch.targets, self.prefix.prefix_len)

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        self.train(True)
        scale = 1.0 / len(micro_batches)
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with self.autocast():
                loss = self.loss(batch) * scale
            loss.backward()
            total += loss.detach()
        return total.item()

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        self.train(False)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with self.autocast():
                total += self.loss(batch)
        return (total / len(batches)).item()


def build_stage_model(config: TrainConfig, vocab_size: int, device: torch.device, stage: int) -> tuple[nn.Module, int]:
    """This rank's pipeline stage (the whole model's initial weights and parameter names), and how many
    parameters the stages before it hold (the offload engine's rounding-seed offset)."""
    from astrobio.model import build_stage, even_split
    model_config = get_config(config.model, vocab_size=vocab_size)
    split = even_split(model_config.n_layers, config.pipeline_stages)
    module = build_stage(model_config, stage, split, seed=config.seed, device=device,
                         dtype=weights_dtype(config, device))
    module.gradient_checkpointing = config.use_gradient_checkpointing
    before = sum(len(list(build_stage(model_config, s, split, device="meta").parameters())) for s in range(stage))
    return module, before


def build_prefix(config: TrainConfig, device: torch.device) -> nn.Module | None:
    """The multimodal prefix encoders of ``--modalities`` (None for text alone)."""
    from astrobio.model.encoders import build_prefix as build_prefix_module
    from astrobio.model.encoders import check_modalities
    modalities = check_modalities(config.modalities)
    if not modalities:
        return None
    return build_prefix_module(get_config(config.model).d_model, modalities, seed=config.seed, device=device)


def trainable(model: nn.Module, prefix: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the optimizer updates: the model's, then the prefix's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if prefix is not None:
        named += [(f"prefix.{n}", p) for n, p in prefix.named_parameters() if p.requires_grad]
    return named


def build_step_runner(config: TrainConfig, model: nn.Module, device: torch.device,
                      prefix: nn.Module | None = None, ranks=None) -> StepRunner:
    if config.pipeline_stages > 1:
        return PipelineStepRunner(model, ranks, config.schedule, device, config.use_mixed_precision, lm_loss,
                                  prefix, prefix_len(config))
    return LocalStepRunner(model, device, config.use_mixed_precision, prefix)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   max_grad_norm: float, sum_across=None) -> tuple[float, bool]:
    """Clips the global gradient norm to ``max_grad_norm`` (0: no clipping) and steps; returns the
    norm before clipping and whether the step was skipped for a non-finite gradient. ``sum_across``
    turns this process's squared norm into the whole model's (pipeline stages: an all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).item()
    if sum_across is not None:
        norm = math.sqrt(sum_across(norm * norm))
    finite = math.isfinite(norm)
    scale = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 and finite else 1.0
    if hasattr(optimizer, "skipped_steps"):  # AdamW8bit scales in its kernel and skips by itself
        optimizer.step(grad_scale=scale, found_inf=not finite)
    elif finite:
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, not finite


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (it then checkpoints and stops);
    a second signal to this process interrupts at once.

    NOTE: with several ranks, ``received`` is also set from a peer's signal (``Trainer.stopping``); the
    Ctrl-C that reaches this process a moment later is the same request, not a second one, so only the
    signals delivered here are counted."""

    def __init__(self):
        self.received: int | None = None
        self.delivered = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.delivered += 1
        if self.delivered > 1:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ trainer

@dataclass
class Resume:
    path: Path
    model_state: dict
    state: dict
    step: int


class Trainer:
    """Owns the parts and the loop; ``state_dict``/``load_state_dict`` are what checkpoints hold."""

    def __init__(self, config: TrainConfig, data: DataBundle, device: torch.device, ranks=None):
        self.config = config
        self.data = data
        self.device = device
        self.ranks = ranks or SingleProcess()
        self.is_main = self.ranks.is_main
        if config.pipeline_stages > 1:
            self.model, index_offset = build_stage_model(config, data.vocab_size, device, self.ranks.stage)
        else:
            self.model, index_offset = build_model(config, data.vocab_size, device), 0
        self.prefix = build_prefix(config, device) if self.ranks.stage == 0 else None  # the encoders: stage 0
        named = trainable(self.model, self.prefix)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if config.use_cpu_offloading:
            # the prefix runs outside the model's hooked forward, so then end_step waits for every bucket
            self.optimizer = build_offload_engine(config, named, self.model if self.prefix is None else None,
                                                  index_offset)
        else:
            self.optimizer = build_optimizer(config, self.params)
        self.schedule = build_schedule(config)
        self.runner = build_step_runner(config, self.model, device, self.prefix, self.ranks)
        self.checkpointer = build_checkpointer(config)
        self.logger = build_logger(config) if self.is_main else NullLogger()
        self.profiler = build_profiler(config, device, self.ranks.stage)
        self.step = 0
        self.initial_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_loss: float | None = None
        self.lr = self.grad_norm = float("nan")
        self.skipped_steps = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_traces: list | None = None
        self.tokens_per_step = config.batch_size * config.seq_len

    def optimizer_state(self) -> dict:
        """This process's optimizer (or offload engine) state, keyed by parameter name."""
        return optimizer_by_name(self.optimizer.state_dict(), self.names)

    def state_dict(self) -> dict:
        """The training state rank 0 saves (with one stage, the optimizer's too)."""
        state = {"step": self.step, "data": self.data.train_loader.state_dict(), "rng": rng_state(self.device),
                 "schedule": self.schedule.state_dict(), "config": self.config.to_dict(),
                 "trainer": {"initial_val_loss": self.initial_val_loss, "last_val_loss": self.last_val_loss,
                             "last_loss": self.last_loss, "skipped_steps": self.skipped_steps,
                             "train_time_s": self.train_time, "tokens_seen": self.tokens_seen},
                 "prefix": self.prefix.state_dict() if self.prefix is not None else None}
        if self.ranks.world_size == 1:
            state["optimizer"] = self.optimizer_state()
        return state

    def load(self, resume: Resume) -> None:
        """Restores a checkpoint written with any number of stages: this stage takes its own parameters
        and their optimizer state by name."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in resume.model_state]
        if missing:
            raise ConfigError(f"checkpoint {resume.path} has no weights for {missing[0]} (and {len(missing) - 1} "
                              f"more); it was saved for another model")
        self.model.load_state_dict({k: resume.model_state[k] for k in own})
        if self.prefix is not None:
            self.prefix.load_state_dict(resume.state["prefix"])
        try:
            self.optimizer.load_state_dict(optimizer_by_index(resume.state["optimizer"], self.names))
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
        self.data.train_loader.load_state_dict(resume.state["data"])
        load_rng_state(resume.state["rng"], self.device)
        self.step = resume.step
        info = resume.state["trainer"]
        self.initial_val_loss, self.last_val_loss = info["initial_val_loss"], info["last_val_loss"]
        self.last_loss, self.skipped_steps = info["last_loss"], info["skipped_steps"]
        self.train_time, self.tokens_seen = info["train_time_s"], info["tokens_seen"]
        self.last_checkpoint = resume.path
        self.logger.truncate_after(self.step)

    # ---- the loop

    def train(self) -> dict | None:
        started = time.perf_counter()
        steps = self.config.steps
        stop_at = min(steps, self.config.stop_at_step or steps)
        if self.step == 0:
            self.initial_val_loss = self.last_val_loss = self.runner.evaluate(self.data.val_batches)
            self.logger.log({"step": 0, "val_loss": self.initial_val_loss, **memory_stats(self.device),
                             **self.memory_sample(0, force=True)})
        window = [0.0, 0]  # seconds, tokens since the last logged record
        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", mininterval=1.0, file=sys.stderr)
        with StopSignal() as stop:
            while self.step < stop_at and not self.stopping(stop):
                seconds = self.train_step()
                window[0] += seconds
                window[1] += self.tokens_per_step
                record = self.after_step(stop_at, window)
                if record is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
                bar.update(1)
            bar.close()
            if stop.received is not None or self.step < steps:
                self.finish_early(stop.received)
        self.logger.close()
        if self.config.use_cpu_offloading:
            self.optimizer.close()
        if not self.is_main:
            return None
        records = read_metrics(self.logger.path)
        plots = Path(self.config.output_dir) / "plots"
        plot = plot_loss(records, plots / "loss.png")
        plot_memory_records(records, plots / "memory.png", self.config.memory_alert_fraction)
        if self.last_traces is not None:
            plot_pipeline(self.last_traces, plots / "pipeline.png", self.config)
        return self.summary(time.perf_counter() - started, plot, stop.received)

    def train_step(self) -> float:
        """One optimizer step; returns its wall time in seconds."""
        start = time.perf_counter()
        lr = self.schedule(self.step)
        loader = self.data.train_loader
        micro_batches = [next(loader) for _ in range(self.config.gradient_accumulation_steps)]
        if self.config.use_cpu_offloading:
            self.optimizer.begin_step(len(micro_batches))
            self.last_loss = self.runner.forward_backward(micro_batches)
            stats = self.optimizer.end_step(lr=lr, sum_across=self.global_sum())
            self.grad_norm, skipped = stats.grad_norm, stats.skipped
        else:
            set_lr(self.optimizer, lr)
            self.last_loss = self.runner.forward_backward(micro_batches)
            self.grad_norm, skipped = optimizer_step(self.optimizer, self.params, self.config.max_grad_norm,
                                                     self.global_sum())
        self.skipped_steps += skipped
        self.lr = lr
        self.step += 1
        seconds = time.perf_counter() - start
        self.train_time += seconds
        self.tokens_seen += self.tokens_per_step
        return seconds

    def after_step(self, stop_at: int, window: list) -> dict | None:
        """Evaluates, logs and checkpoints as due; returns the logged record (None when not logged)."""
        config, step = self.config, self.step
        last = step == stop_at
        evaluate = last or (config.eval_every_n_steps and step % config.eval_every_n_steps == 0)
        record = None
        memory = self.memory_sample(step)
        if evaluate or step % config.log_every_n_steps == 0:
            record = {"step": step, "epoch": round(self.epoch(), 4), "loss": self.last_loss, "lr": self.lr,
                      "grad_norm": self.grad_norm, "tokens_per_s": window[1] / max(window[0], 1e-9),
                      "skipped_steps": self.skipped_steps, **memory_stats(self.device), **memory,
                      **self.pipeline_fields()}
            if evaluate:
                self.last_val_loss = record["val_loss"] = self.runner.evaluate(self.data.val_batches)
            self.logger.log(record)
            window[:] = [0.0, 0]
        elif memory:
            self.logger.log({"step": step, **memory})
        if last or self.checkpoint_due():
            self.save()
        return record

    def stopping(self, stop: StopSignal) -> bool:
        """Whether a signal asked to stop; with several stages, whether any rank got one (every rank
        then stops after the same step and writes its part of the checkpoint)."""
        if self.ranks.world_size == 1:
            return stop.received is not None
        received = [signum for signum in self.ranks.gather(stop.received) if signum is not None]
        if not received:
            # NOTE: a signal that arrived here during the gather stays set and goes into the next
            # step's gather; overwriting it with the gathered None lost Ctrl-C when every rank got it
            # while inside this gather (the ranks then trained on).
            return False
        stop.received = received[0]
        return True

    def global_sum(self):
        """How the squared gradient norm becomes the whole model's (None: this process holds it all)."""
        return self.ranks.sum_across if self.ranks.world_size > 1 else None

    def memory_sample(self, step: int, force: bool = False) -> dict:
        """The profiler's sample as metrics keys when due (``force``: now), else {}; with several stages,
        rank 0 logs the other stages' samples as records of their own. The profiler also logs an alert
        as a warning."""
        sample = self.profiler.sample(step) if force else self.profiler.maybe_sample(step)
        if sample is None:
            return {}
        fields = memory_fields(sample)
        if self.ranks.world_size > 1:
            for other in self.ranks.gather(fields)[1:]:
                self.logger.log({"step": step, **other})
        return fields

    def pipeline_fields(self) -> dict:
        """The measured bubble of the last step (a collective with several stages, else {})."""
        if self.ranks.world_size == 1:
            return {}
        self.last_traces = self.runner.gather_traces()
        return {"pipeline_bubble": round(bubble_of(self.last_traces), 4)}

    def epoch(self) -> float:
        return self.step * self.config.gradient_accumulation_steps / self.data.train_loader.batches_per_epoch

    def checkpoint_due(self) -> bool:
        config, step = self.config, self.step
        if config.save_every_n_steps and step % config.save_every_n_steps == 0:
            return True
        if config.save_every_n_epochs:
            per_epoch = self.data.train_loader.batches_per_epoch * config.save_every_n_epochs
            accum = config.gradient_accumulation_steps
            return step * accum // per_epoch > (step - 1) * accum // per_epoch
        return False

    def save(self) -> None:
        if self.config.use_cpu_offloading:
            self.optimizer.synchronize()  # the weights of the last step are on their way to the model
        if self.ranks.world_size == 1:
            self.last_checkpoint = self.checkpointer.save(self.step, self.model.state_dict(), self.state_dict())
            return
        self.save_parts()

    def save_parts(self) -> None:
        """Each stage writes its part into the temporary directory; rank 0 then writes the shared state
        and the manifest, and renames (the same atomic save as with one stage)."""
        stage, ckpt = self.ranks.stage, self.checkpointer
        tmp = ckpt.begin(self.step) if self.is_main else ckpt.root / f".tmp-step-{self.step}"
        self.ranks.barrier()
        write_part(tmp, f"model-stage{stage}.safetensors", self.model.state_dict(), f"optimizer-stage{stage}",
                   self.optimizer_state())
        self.ranks.barrier()
        if self.is_main:
            write_part(tmp, None, None, "state", self.state_dict())
            ckpt.finish(tmp, self.step)
        self.ranks.barrier()
        self.last_checkpoint = ckpt.root / f"step-{self.step}"

    def finish_early(self, signum: int | None) -> None:
        """Stopped by a signal or --stop-at-step: make sure the current step is checkpointed."""
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step}":
            self.save()
        if not self.is_main:
            return
        reason = f"signal {signal.Signals(signum).name}" if signum else f"--stop-at-step {self.step}"
        tqdm.write(f"stopped at step {self.step} of {self.config.steps} ({reason}); continue with "
                   f"--resume auto --output-dir {self.config.output_dir}", file=sys.stderr)

    def summary(self, wall_time: float, plot: Path, signum: int | None) -> dict:
        out = Path(self.config.output_dir)
        summary = {
            "steps": self.step, "of_steps": self.config.steps, "stopped_by_signal": signum,
            "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9),
            "final_train_loss": self.last_loss, "final_val_loss": self.last_val_loss,
            "initial_val_loss": self.initial_val_loss,
            "val_loss_ratio": (self.last_val_loss / self.initial_val_loss
                               if self.last_val_loss is not None and self.initial_val_loss else None),
            "skipped_steps": self.skipped_steps, "wall_time_s": wall_time, "train_time_s": self.train_time,
            **{k: v for k, v in memory_stats(self.device).items() if "peak" in k},
            "output_dir": str(out), "metrics": str(out / "metrics.jsonl"), "plot": str(plot),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


# ------------------------------------------------------------------------------- preparing a run

def find_resume(config: TrainConfig) -> Resume | None:
    """The verified checkpoint to resume from (None: start fresh)."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        path, skipped = build_checkpointer(config).latest_valid()
        for line in skipped:
            print(f"warning: skipping {line}", file=sys.stderr)
        if path is None:
            if skipped:
                raise ConfigError(f"--resume auto: no valid checkpoint in {config.output_dir}/checkpoints "
                                  f"({len(skipped)} corrupt); delete them or drop --resume to start over")
            return None
    else:
        path = Path(config.resume)
    return load_resume(config, path)


def load_resume(config: TrainConfig, path: str | Path) -> Resume:
    """The verified checkpoint at ``path``, checked against this run's config."""
    path = Path(path)
    try:
        model_state, state, step = load_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    check_resume_matches(config, state["config"], path)
    return Resume(path, model_state, state, step)


def check_resume_matches(config: TrainConfig, saved: dict, path: Path) -> None:
    ours = config.to_dict()  # as saved: the data URI without credentials
    for key in RESUME_KEYS:
        if saved.get(key, TrainConfig.__dataclass_fields__[key].default) != ours[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"checkpoint {path} was trained with {key}={saved.get(key)!r} but this run has "
                              f"{ours[key]!r}; pass {flag} {saved.get(key)} to resume it, or use "
                              f"another --output-dir")


def resolve_steps(config: TrainConfig, data: DataBundle) -> TrainConfig:
    """--epochs becomes a step count, now that the data's size is known."""
    if config.epochs is None:
        return config
    per_epoch = data.train_loader.batches_per_epoch // config.gradient_accumulation_steps
    return replace(config, steps=config.epochs * per_epoch)


def previous_run(output_dir: Path) -> str | None:
    found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    return ", ".join(found) if found else None


def prepare(config: TrainConfig) -> tuple[TrainConfig, DataBundle, Resume | None]:
    """Every check that can refuse the run, in order, with nothing written yet."""
    check_environment(config)
    resume = find_resume(config)
    existing = previous_run(Path(config.output_dir))
    # NOTE: under torchrun rank 0 may already have created the outputs when another rank gets here
    if existing and config.resume is None and not config.overwrite and torchrun_rank() == 0:
        raise ConfigError(f"--output-dir {config.output_dir} already holds a run ({existing}); pass "
                          f"--resume auto to continue it, --overwrite to replace it, or another --output-dir")
    data = build_data(config)
    model_vocab = get_config(config.model, vocab_size=data.vocab_size).vocab_size
    if model_vocab < data.vocab_size:
        raise ConfigError(f"the tokenizer has {data.vocab_size} tokens but model {config.model!r} only "
                          f"{model_vocab}; use a smaller tokenizer or another --model")
    preflight_run(config, data.vocab_size, resolve_device(config))
    return resolve_steps(config, data), data, resume


def create_outputs(config: TrainConfig, resume: Resume | None) -> None:
    out = Path(config.output_dir)
    if config.overwrite and resume is None:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")


def run(config: TrainConfig) -> dict | None:
    """Prepares, trains, and returns the summary (also written to summary.json); with several pipeline
    stages, runs the job's ranks (the summary is rank 0's; None in torchrun's other processes)."""
    config, data, resume = prepare(config)
    if torchrun_rank() == 0:
        create_outputs(config, resume)
    if resume is not None and torchrun_rank() == 0:
        print(f"resumed from {resume.path} (step {resume.step})")
    if config.pipeline_stages > 1:
        return add_task_accuracy(config, run_pipeline(config, (config, data, resume)))
    trainer = Trainer(config, data, resolve_device(config))
    if resume is not None:
        trainer.load(resume)
    else:
        trainer.logger.truncate_after(-1)
    return add_task_accuracy(config, trainer.train())


def add_task_accuracy(config: TrainConfig, summary: dict | None, examples: int = 200) -> dict | None:
    """The final checkpoint's task accuracy on held-out built-in records (``python -m astrobio.evaluate``
    gives the full report): the model completes ``hz`` and ``type`` from the record before them. Read
    from the checkpoint, so it works for any stage count; text runs on the built-in corpus only."""
    if (summary is None or not summary.get("checkpoint") or summary.get("stopped_by_signal")
            or config.modalities != "text" or not config.data.startswith("builtin")):
        return summary
    from astrobio.evaluate import builtin_probes
    from astrobio.inference.loading import load_model, load_tokenizer_for
    model, train_config, _ = load_model(summary["checkpoint"])
    probes = builtin_probes(model, load_tokenizer_for(train_config), train_config, config.seq_len, examples)
    summary["task_accuracy"] = [probe.to_dict() for probe in probes]
    Path(summary["output_dir"], "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)
    lines = [
        f"steps              {summary['steps']} of {summary['of_steps']}",
        f"tokens/s           {summary['tokens_per_s']:.0f}",
        f"train loss (final) {num(summary['final_train_loss'], '.4f')}",
        f"val loss           {num(summary['initial_val_loss'], '.4f')} at step 0 -> "
        f"{num(summary['final_val_loss'], '.4f')} ({num(summary['val_loss_ratio'], '.1%')} of step 0)",
        f"peak host memory   {summary['peak_rss_mib']:.0f} MiB (RSS)",
    ]
    if "cuda_peak_mib" in summary:
        lines.append(f"peak device memory {summary['cuda_peak_mib']:.0f} MiB")
    for probe in summary.get("task_accuracy", []):
        lines.append(f"accuracy ({probe['field']:4s})    {probe['accuracy']:.1%} (95% CI {probe['ci_low']:.1%}-"
                     f"{probe['ci_high']:.1%}, n={probe['examples']}) on held-out records; majority class "
                     f"'{probe['majority_label']}' {probe['majority_baseline']:.1%}")
    lines += [f"time               {summary['wall_time_s']:.1f} s ({summary['train_time_s']:.1f} s in steps)",
              f"outputs            {summary['output_dir']}: config.json, metrics.jsonl, summary.json, "
              f"{summary['plot']}, {summary['checkpoint']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from astrobio.parallel.launch import LaunchError, PeerFailure
    try:
        summary = run(parse_config(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (LaunchError, PeerFailure) as error:
        # on a line of its own: a rank's progress bar may have been cut off without its newline
        print(f"\nerror: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(format_summary(summary))
    signum = summary["stopped_by_signal"]
    return 128 + signum if signum else 0  # the shell's convention for a process stopped by a signal
