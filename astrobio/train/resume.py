"""Which checkpoint a run resumes from (``--resume auto`` or a directory), verified and checked against
the run's config before anything is written."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from astrobio.train.checkpoint import MANIFEST, CheckpointError, Checkpointer, IoStats, load_checkpoint
from astrobio.train.config import ConfigError, TrainConfig, flag

# A resumed run must match its checkpoint in these keys (the rest, e.g. --steps or --lr, may change).
# The global batch (--batch-size) must match, not how it is split: a run resumes with another
# --data-parallel and --gradient-accumulation-steps of the same product, on the same data position.
RESUME_KEYS = ("model", "seq_len", "micro_batch_size", "batch_size", "data", "tokenizer",
               "seed", "use_8bit_optimizer", "modalities", "use_cpu_offloading", "master_weights", "accum_dtype")


@dataclass
class Resume:
    """A verified checkpoint: its directory, the model's weights, the training state, its step, and the
    bytes and seconds of verifying and opening it."""

    path: Path
    model_state: dict
    state: dict
    step: int
    load_io: IoStats = field(default_factory=IoStats)


def find_resume(config: TrainConfig) -> Resume | None:
    """The verified checkpoint to resume from (None: start fresh)."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        path, skipped = Checkpointer(Path(config.output_dir) / "checkpoints", config.keep_last_k).latest_valid()
        for line in skipped:
            print(f"warning: skipping {line}", file=sys.stderr)
        if path is None:
            if skipped:
                raise ConfigError(f"--resume auto: no valid checkpoint in {config.output_dir}/checkpoints "
                                  f"({len(skipped)} corrupt); delete them or drop --resume to start over")
            return None
    else:
        path = checkpoint_in(Path(config.resume))
    return load_resume(config, path)


def checkpoint_in(path: Path) -> Path:
    """``--resume PATH``: a checkpoint directory as it is, or a run directory's newest valid checkpoint."""
    if (path / MANIFEST).exists() or not (path / "checkpoints").is_dir():
        return path  # a checkpoint (load_checkpoint says what is wrong with it, if anything)
    found, skipped = Checkpointer(path / "checkpoints", keep_last_k=1).latest_valid()
    for line in skipped:
        print(f"warning: skipping {line}", file=sys.stderr)
    if found is None:
        raise ConfigError(f"--resume {path}: the run directory holds no valid checkpoint in {path}/checkpoints; "
                          f"pass one of its checkpoints/step-N, or drop --resume to start over")
    return found


def load_resume(config: TrainConfig, path: str | Path) -> Resume:
    """The verified checkpoint at ``path``, checked against this run's config."""
    path = Path(path)
    io = IoStats()
    try:
        model_state, state, step = load_checkpoint(path, stats=io)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    check_resume_matches(config, state["config"], path)
    return Resume(path, model_state, state, step, io)


def check_resume_matches(config: TrainConfig, saved: dict, path: Path) -> None:
    ours = config.to_dict()  # as saved: the data URI without credentials
    for key in RESUME_KEYS:
        if saved.get(key, TrainConfig.__dataclass_fields__[key].default) != ours[key]:
            raise ConfigError(f"checkpoint {path} was trained with {flag(key)} {saved.get(key)!r} but this run "
                              f"has {ours[key]!r}; pass {flag(key)} {saved.get(key)} to resume it, or use "
                              f"another --output-dir")
