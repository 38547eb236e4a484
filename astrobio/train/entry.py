"""``python -m astrobio.train``: prepares a run, starts it (one process, or the ranks of a pipeline job),
and reports it (plots, ``summary.json``, the task accuracy, the printed summary).

``prepare`` does everything that can fail on a bad configuration (flags, paths, data, the checkpoint to
resume, the memory preflight) before the output directory is touched; ``main`` turns those failures
into exit code 2. With ``--pipeline-stages`` or ``--data-parallel`` above 1 the job's replicas x stages
ranks are started with ``astrobio.parallel.launch.launch`` (spawned here, gloo on the CPU and NCCL on
GPUs; or one rank per process under ``torchrun``) and each runs ``rank_main``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from astrobio.cli import resolve_device
from astrobio.model import get_config
from astrobio.train.builders import build_parts
from astrobio.train.config import (ConfigError, TrainConfig, check_environment, micro_batches_per_step, parse_config,
                                   replicas)
from astrobio.train.data import DataBundle, ReplicaShard, build_data
from astrobio.train.devices import backend_for, limit_gpu_memory, local_ranks, rank_device
from astrobio.train.logging import memory_stats, read_metrics
from astrobio.train.memory import plot_memory_records, preflight_run, resolve_grad_accum_location
from astrobio.train.plots import plot_loss, plot_step_timeline
from astrobio.train.resume import Resume, find_resume, load_resume
from astrobio.train.trainer import Trainer

# Outputs of a run; --overwrite deletes exactly these.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "plots", "wandb")


# ------------------------------------------------------------------------------- preparing a run

def resolve_steps(config: TrainConfig, data: DataBundle) -> TrainConfig:
    """--epochs becomes a step count, now that the data's size is known."""
    if config.epochs is None:
        return config
    per_epoch = data.train_loader.batches_per_epoch // micro_batches_per_step(config)
    return replace(config, steps=config.epochs * per_epoch)


def previous_run(output_dir: Path) -> str | None:
    found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    return ", ".join(found) if found else None


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 when started plainly)."""
    from astrobio.parallel.launch import under_torchrun
    return int(os.environ["RANK"]) if under_torchrun() else 0


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
    device = resolve_device(config.device)
    planned = preflight_run(config, data.vocab_size, device)
    config = resolve_grad_accum_location(config, data.vocab_size, device, planned)
    return resolve_steps(config, data), data, resume


def create_outputs(config: TrainConfig, resume: Resume | None) -> None:
    """The output directory with this run's config.json (after --overwrite removed the previous run's
    outputs). A directory the checks could not foresee failing (e.g. under /proc, where even root cannot
    create one) is a bad configuration too."""
    out = Path(config.output_dir)
    try:
        if config.overwrite and resume is None:
            for name in RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    except OSError as error:
        raise ConfigError(f"--output-dir {config.output_dir} cannot be written: {error.strerror or error}; "
                          f"choose another --output-dir") from None


# ------------------------------------------------------------------------------------ running it

def completed_run(config: TrainConfig) -> dict | None:
    """The summary of the run already in --output-dir when it is this very run (the same config.json),
    finished (every step, not stopped by a signal) and checkpointed; None otherwise. Running the same
    command twice (e.g. the README's default job) then reports that run instead of refusing."""
    if config.resume is not None or config.overwrite:
        return None
    out = Path(config.output_dir)
    try:
        saved = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    finished = summary.get("steps") == summary.get("of_steps") and not summary.get("stopped_by_signal")
    checkpoint = summary.get("checkpoint")
    if saved != config.to_dict() or not finished or not checkpoint or not Path(checkpoint).is_dir():
        return None
    return summary


def run(config: TrainConfig) -> dict | None:
    """Prepares, trains, and returns the summary (also written to summary.json); with several pipeline
    stages, runs the job's ranks (the summary is rank 0's; None in torchrun's other processes). When
    --output-dir already holds this run, complete, returns its summary (``already_complete``)."""
    done = completed_run(config)
    if done is not None:
        return {**done, "already_complete": True} if torchrun_rank() == 0 else None
    config, data, resume = prepare(config)
    if torchrun_rank() == 0:
        create_outputs(config, resume)
    if resume is not None and torchrun_rank() == 0:
        print(f"resumed from {resume.path} (step {resume.step})")
    if config.pipeline_stages * replicas(config) > 1:
        summary = run_pipeline(config, data, resume)
    else:
        device = resolve_device(config.device)
        limit_gpu_memory(config, device)
        trainer = Trainer(config, data, build_parts(config, data, device))
        summary = train_and_report(trainer, resume)
    return add_task_accuracy(config, summary)


def train_and_report(trainer: Trainer, resume: Resume | None) -> dict | None:
    """Resumes (or starts the metrics afresh), trains, and on the main rank draws the plots and writes
    the summary; returns the summary (None on other ranks)."""
    if resume is not None:
        trainer.load(resume)
    else:
        trainer.logger.truncate_after(-1)
    started = time.perf_counter()
    signum = trainer.train()
    if not trainer.is_main:
        return None
    plot = write_plots(trainer)
    return write_summary(trainer, time.perf_counter() - started, plot, signum, resume)


def rank_main(ctx, config: TrainConfig, data: DataBundle, resume_path: str | None) -> dict | None:
    """One rank of the job: the trainer over this rank's stage, on its replica's share of the data;
    rank 0 returns the summary."""
    from astrobio.train.pipeline import Ranks
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the launcher's SIG_IGN is inherited
    device = rank_device(resolve_device(config.device), ctx.local_rank)  # with NCCL, ctx.device
    limit_gpu_memory(config, device)
    ranks = Ranks(ctx, replicas(config))
    data = replace(data, train_loader=ReplicaShard(data.train_loader, ranks.replica, ranks.replicas))
    trainer = Trainer(config, data, build_parts(config, data, device, ranks))
    return train_and_report(trainer, load_resume(config, resume_path) if resume_path is not None else None)


def run_pipeline(config: TrainConfig, data: DataBundle, resume: Resume | None) -> dict | None:
    """Starts (or, under torchrun, joins) the job of replicas x stages ranks; returns rank 0's summary
    (None on other ranks)."""
    from astrobio.parallel.launch import launch
    from astrobio.parallel.replicas import Layout
    layout = Layout(replicas(config), config.pipeline_stages)
    with interrupts_left_to_ranks():
        results = launch(rank_main, layout.world_size, args=(config, data, str(resume.path) if resume else None),
                         backend=backend_for(resolve_device(config.device), local_ranks(config)),
                         timeout_s=config.pipeline_timeout, name_rank=layout.name)
    return results.get(0)


@contextlib.contextmanager
def interrupts_left_to_ranks():
    """Ctrl-C reaches every process of the terminal's group: the spawned ranks agree to stop after the
    same step and checkpoint (exit 130), so the launching process ignores SIGINT meanwhile rather than
    tear them down. (Under torchrun, torchrun handles it.)"""
    from astrobio.parallel.launch import under_torchrun
    if under_torchrun() or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------- reporting

def write_plots(trainer: Trainer) -> Path:
    """plots/loss.png, plots/memory.png, plots/step_timeline.png and the step runner's own (pipeline.png);
    returns the loss plot."""
    config = trainer.config
    records = read_metrics(trainer.logger.path)
    plots = Path(config.output_dir) / "plots"
    plot = plot_loss(records, plots / "loss.png")
    plot_memory_records(records, plots / "memory.png", config.memory_alert_fraction)
    if trainer.last_breakdowns is not None:
        plot_step_timeline(trainer.last_breakdowns, plots / "step_timeline.png")
    trainer.runner.write_plots(plots)
    return plot


def checkpoint_io(trainer: Trainer, resume: Resume | None) -> dict:
    """Bytes, seconds and GB/s of this process's checkpoint saves and of the load it resumed from."""
    fields = {}
    loaded = resume.load_io if resume is not None else None
    for kind, io in (("save", trainer.checkpoint_writer.checkpointer.save_io), ("load", loaded)):
        if io is not None and io.bytes:
            fields.update({f"checkpoint_{kind}_bytes": io.bytes, f"checkpoint_{kind}_s": io.seconds,
                           f"checkpoint_{kind}_gb_per_s": io.gbps})
    return fields


def write_summary(trainer: Trainer, wall_time: float, plot: Path, signum: int | None,
                  resume: Resume | None = None) -> dict:
    out = Path(trainer.config.output_dir)
    summary = {
        "steps": trainer.step, "of_steps": trainer.config.steps, "stopped_by_signal": signum,
        "tokens_per_s": trainer.tokens_seen / max(trainer.train_time, 1e-9),
        "final_train_loss": trainer.last_loss, "final_val_loss": trainer.last_val_loss,
        "initial_val_loss": trainer.initial_val_loss,
        "val_loss_ratio": (trainer.last_val_loss / trainer.initial_val_loss
                           if trainer.last_val_loss is not None and trainer.initial_val_loss else None),
        "skipped_steps": trainer.skipped_steps, "wall_time_s": wall_time, "train_time_s": trainer.stepped_s,
        "train_time_since_step_0_s": trainer.train_time,
        "device": trainer.device.type, "kernels": trainer.speed.kernels, "compiled": trainer.speed.compiled,
        "device_busy_fraction": trainer.busy_by_stage,
        "grad_accum_location": trainer.config.grad_accum_location if trainer.config.use_cpu_offloading else None,
        **{k: v for k, v in memory_stats(trainer.device).items() if "peak" in k},
        **checkpoint_io(trainer, resume),
        "output_dir": str(out), "metrics": str(out / "metrics.jsonl"), "plot": str(plot),
        "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# The summary's probes reload the final checkpoint on the CPU in fp32: past this size that costs minutes
# and tens of GB of host memory at the end of a run.
PROBE_MAX_PARAMETERS = 2_000_000_000


def preset_parameters(preset: str) -> int:
    """The parameter count of a model preset, from a build on the meta device (no memory)."""
    from astrobio.model import build_model, get_config
    return build_model(get_config(preset), device="meta").num_parameters()


def add_task_accuracy(config: TrainConfig, summary: dict | None, examples: int = 200) -> dict | None:
    """The final checkpoint's task accuracy on held-out built-in records (``python -m astrobio.evaluate``
    gives the full report): the model completes ``hz`` and ``type`` from the record before them. Read
    from the checkpoint, so it works for any stage count; text runs on the built-in corpus only."""
    if (summary is None or not summary.get("checkpoint") or summary.get("stopped_by_signal")
            or config.modalities != "text" or not config.data.startswith("builtin")):
        return summary
    if preset_parameters(config.model) > PROBE_MAX_PARAMETERS:
        print(f"task accuracy: not probed after a {config.model} run (the probes reload the model on the CPU); "
              f"run python -m astrobio.evaluate --checkpoint {summary['output_dir']}", file=sys.stderr)
        return summary
    from astrobio.inference.evaluation import builtin_probes
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
    busy = [(stage, fraction) for stage, fraction in enumerate(summary.get("device_busy_fraction") or [])
            if fraction is not None]
    if busy:
        per_stage = ", ".join(f"stage {stage} {fraction:.1%}" for stage, fraction in busy)
        lines.append(f"{summary['device'] + ' busy':18s} {per_stage} of the step time")
    if summary.get("grad_accum_location"):
        lines.append(f"grad accumulation  on the {summary['grad_accum_location']}")
    for kind in ("save", "load"):
        if f"checkpoint_{kind}_bytes" in summary:
            lines.append(f"checkpoint {kind:7s} {summary[f'checkpoint_{kind}_bytes'] / 1e9:.2f} GB in "
                         f"{summary[f'checkpoint_{kind}_s']:.1f} s ({summary[f'checkpoint_{kind}_gb_per_s']:.2f} GB/s)")
    for probe in summary.get("task_accuracy", []):
        lines.append(f"accuracy ({probe['field']:4s})    {probe['accuracy']:.1%} (95% CI {probe['ci_low']:.1%}-"
                     f"{probe['ci_high']:.1%}, n={probe['examples']}) on held-out records; majority class "
                     f"'{probe['majority_label']}' {probe['majority_baseline']:.1%}")
    time = f"time               {summary['wall_time_s']:.1f} s ({summary['train_time_s']:.1f} s in steps"
    if summary["train_time_since_step_0_s"] > summary["train_time_s"] + 0.05:  # a resumed run
        time += f"; {summary['train_time_since_step_0_s']:.1f} s in steps since step 0"
    out = Path(summary["output_dir"])
    plots = Path(summary["plot"]).parent
    files = ["config.json", "metrics.jsonl", "summary.json",
             f"{shown(plots, out)}/ ({', '.join(sorted(p.stem for p in plots.glob('*.png')))})"]
    if summary["checkpoint"]:
        files.append(shown(Path(summary["checkpoint"]), out))
    lines += [time + ")", f"outputs            {out}/: {', '.join(files)}"]
    return "\n".join(lines)


def shown(path: Path, out: Path) -> str:
    """``path`` relative to the output directory when it lies inside it, else as it is."""
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)


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
    if summary.get("already_complete"):
        print(f"{summary['output_dir']} already holds this run, complete ({summary['steps']} of "
              f"{summary['of_steps']} steps); its summary follows. Pass --overwrite to train it again, "
              f"--steps N with --resume auto to train on, or another --output-dir.")
    print(format_summary(summary))
    signum = summary["stopped_by_signal"]
    return 128 + signum if signum else 0  # the shell's convention for a process stopped by a signal
