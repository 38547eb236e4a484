"""The training loop over parts assembled once (astrobio.train.builders.build_parts).

One optimizer step: the optimizer opens the step, the step runner runs the step's micro-batches (each
loss scaled by 1/accumulation, so the accumulated gradient is the full batch's), and the optimizer's
``end_step(lr)`` clips the global gradient norm and applies the update (a step with a non-finite
gradient is skipped and counted). Then the loop evaluates, logs and checkpoints as due.

The loop does not know whether it runs alone or as one rank of a pipeline, nor where the optimizer
keeps its state: the parts answer (their collectives are identities in one process).
``state_dict``/``load`` are what checkpoints hold.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from astrobio.train.builders import Parts
from astrobio.train.checkpoint import CheckpointError, optimizer_by_name
from astrobio.train.config import ConfigError, TrainConfig, micro_batches_per_step
from astrobio.train.data import DataBundle
from astrobio.train.logging import memory_stats
from astrobio.train.memory import memory_fields
from astrobio.train.resume import Resume
from astrobio.train.timeline import StepBreakdown


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


@dataclass
class Throughput:
    """Seconds and tokens of the steps since the last logged record."""

    seconds: float = 0.0
    tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Trainer:
    """Owns the parts and the loop's counters; see the module docstring."""

    def __init__(self, config: TrainConfig, data: DataBundle, parts: Parts):
        self.config, self.data = config, data
        self.device, self.ranks = parts.device, parts.ranks
        self.is_main = self.ranks.is_main
        self.model, self.prefix, self.names = parts.model, parts.prefix, parts.names
        self.optimizer, self.schedule, self.runner = parts.optimizer, parts.schedule, parts.runner
        self.checkpoint_writer, self.logger, self.profiler = parts.checkpoint_writer, parts.logger, parts.profiler
        self.timeline = parts.timeline
        self.speed = parts.speed  # the kernels in use and whether the blocks are compiled, for the summary
        self.last_breakdown: StepBreakdown | None = None
        self.last_breakdowns: list[StepBreakdown] | None = None  # every rank's, at the last logged step
        self.busy_s = self.stepped_s = 0.0  # the device's busy seconds and the steps' seconds, this process
        self.busy_by_stage: list[float] | None = None
        self.step = 0
        self.initial_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_loss: float | None = None
        self.lr = self.grad_norm = float("nan")
        self.skipped_steps = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.tokens_per_step = config.batch_size * config.seq_len

    def optimizer_state(self) -> dict:
        """This process's optimizer state, keyed by parameter name."""
        return optimizer_by_name(self.optimizer.state_dict(), self.names)

    def state_dict(self) -> dict:
        """The training state rank 0 saves (the optimizer's goes beside it: astrobio.train.local/pipeline)."""
        return {"step": self.step, "data": self.data.train_loader.state_dict(), "rng": rng_state(self.device),
                "schedule": self.schedule.state_dict(), "config": self.config.to_dict(),
                "trainer": {"initial_val_loss": self.initial_val_loss, "last_val_loss": self.last_val_loss,
                            "last_loss": self.last_loss, "skipped_steps": self.skipped_steps,
                            "train_time_s": self.train_time, "tokens_seen": self.tokens_seen},
                "prefix": self.prefix.state_dict() if self.prefix is not None else None}

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
            self.optimizer.load_checkpoint(resume.path, resume.state, self.names)
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

    def train(self) -> int | None:
        """Trains to ``--steps`` (or ``--stop-at-step``, or a signal); returns the signal that stopped the
        run, if one did."""
        steps = self.config.steps
        stop_at = min(steps, self.config.stop_at_step or steps)
        if self.step == 0:
            self.initial_val_loss = self.last_val_loss = self.runner.evaluate(self.data.val_batches)
            self.logger.log({"step": 0, "val_loss": self.initial_val_loss, **memory_stats(self.device),
                             **self.memory_sample(0, force=True)})
        since_logged = Throughput()
        # one bar for the job: rank 0's (every rank runs the same steps)
        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", mininterval=1.0, file=sys.stderr,
                   disable=not self.is_main)
        with StopSignal() as stop:
            while self.step < stop_at and not self.stopping(stop):
                since_logged.add(self.train_step(), self.tokens_per_step)
                record = self.after_step(stop_at, since_logged)
                if record is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
                bar.update(1)
            bar.close()
            if stop.received is not None or self.step < steps:
                self.finish_early(stop.received)
        self.busy_by_stage = self.ranks.gather(self.busy_s / self.stepped_s if self.stepped_s else None)
        self.logger.close()
        self.optimizer.close()
        return stop.received

    def train_step(self) -> float:
        """One optimizer step; returns its wall time in seconds."""
        start = time.perf_counter()
        self.timeline.start()
        lr = self.schedule(self.step)
        loader = self.data.train_loader
        with self.timeline.phase("data"):
            micro_batches = [next(loader) for _ in range(self.config.gradient_accumulation_steps)]
        self.optimizer.begin_step(len(micro_batches))
        loss = self.runner.forward_backward(micro_batches)
        stats = self.optimizer.end_step(lr)
        # after end_step: the replicas' gradient all-reduces on the same group may still be starting in it
        # (a bucket whose gradients were not all final in backward), and every rank must issue them in one
        # order
        self.last_loss = self.ranks.replica_mean(loss)
        breakdown = self.last_breakdown = self.timeline.finish()
        self.busy_s += breakdown.busy_fraction * breakdown.step_s
        self.stepped_s += breakdown.step_s
        self.grad_norm = stats.grad_norm
        self.skipped_steps += stats.skipped
        self.lr = lr
        self.step += 1
        seconds = time.perf_counter() - start
        self.train_time += seconds
        self.tokens_seen += self.tokens_per_step
        return seconds

    def after_step(self, stop_at: int, since_logged: Throughput) -> dict | None:
        """Evaluates, logs and checkpoints as due; returns the logged record (None when not logged)."""
        config, step = self.config, self.step
        last = step == stop_at
        evaluate = last or (config.eval_every_n_steps and step % config.eval_every_n_steps == 0)
        record = None
        memory = self.memory_sample(step)
        if evaluate or step % config.log_every_n_steps == 0:
            record = {"step": step, "epoch": round(self.epoch(), 4), "loss": self.last_loss, "lr": self.lr,
                      "grad_norm": self.grad_norm, "tokens_per_s": since_logged.tokens_per_s(),
                      "skipped_steps": self.skipped_steps, **memory_stats(self.device), **memory,
                      **self.runner.step_record(), "step_breakdown": self.gather_breakdowns()}
            if evaluate:
                self.last_val_loss = record["val_loss"] = self.runner.evaluate(self.data.val_batches)
            self.logger.log(record)
            since_logged.seconds, since_logged.tokens = 0.0, 0
        elif memory:
            self.logger.log({"step": step, **memory})
        if last or self.checkpoint_due():
            self.save()
        return record

    def gather_breakdowns(self) -> list[dict]:
        """Every rank's breakdown of the last step (a collective), as metrics records."""
        self.last_breakdowns = self.ranks.gather(self.last_breakdown)
        return [breakdown.record() for breakdown in self.last_breakdowns]

    def stopping(self, stop: StopSignal) -> bool:
        """Whether a signal asked to stop; with several stages, whether any rank got one (every rank
        then stops after the same step and writes its part of the checkpoint)."""
        received = [signum for signum in self.ranks.gather_all(stop.received) if signum is not None]
        if not received:
            # NOTE: a signal that arrived here during the gather stays set and goes into the next
            # step's gather; overwriting it with the gathered None lost Ctrl-C when every rank got it
            # while inside this gather (the ranks then trained on).
            return False
        stop.received = received[0]
        return True

    def memory_sample(self, step: int, force: bool = False) -> dict:
        """The profiler's sample as metrics keys when due (``force``: now), else {}; with several stages,
        rank 0 logs the other stages' samples as records of their own. The profiler also logs an alert
        as a warning."""
        sample = self.profiler.sample(step) if force else self.profiler.maybe_sample(step)
        if sample is None:
            return {}
        fields = memory_fields(sample)
        for other in self.ranks.gather(fields)[1:]:
            self.logger.log({"step": step, **other})
        return fields

    def epoch(self) -> float:
        return self.step * micro_batches_per_step(self.config) / self.data.train_loader.batches_per_epoch

    def checkpoint_due(self) -> bool:
        config, step = self.config, self.step
        if config.save_every_n_steps and step % config.save_every_n_steps == 0:
            return True
        if config.save_every_n_epochs:
            per_epoch = self.data.train_loader.batches_per_epoch * config.save_every_n_epochs
            accum = micro_batches_per_step(config)
            return step * accum // per_epoch > (step - 1) * accum // per_epoch
        return False

    def save(self) -> None:
        self.optimizer.synchronize()  # the last step's weights may still be on their way to the model
        self.last_checkpoint = self.checkpoint_writer.save(self.step, self.model.state_dict(),
                                                           self.optimizer_state, self.state_dict)

    def finish_early(self, signum: int | None) -> None:
        """Stopped by a signal or --stop-at-step: make sure the current step is checkpointed."""
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step}":
            self.save()
        if not self.is_main:
            return
        reason = f"signal {signal.Signals(signum).name}" if signum else f"--stop-at-step {self.step}"
        tqdm.write(f"stopped at step {self.step} of {self.config.steps} ({reason}); continue with "
                   f"--resume auto --output-dir {self.config.output_dir}", file=sys.stderr)
