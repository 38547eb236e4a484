"""Metrics: ``metrics.jsonl`` (one JSON object per logged step), memory readings, optional W&B.

W&B is imported only when ``--wandb-project`` is given. It runs offline unless the environment says
otherwise (``WANDB_MODE``, or ``WANDB_API_KEY`` for online); the run config it receives is the training
config, which holds no credentials.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

MIB = 1 << 20


def memory_stats(device: torch.device) -> dict[str, float]:
    """Host RSS now and at its peak, and the device's allocated / peak bytes on CUDA, in MiB."""
    stats = {"rss_mib": current_rss() / MIB,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB}
    if device.type == "cuda":
        stats["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / MIB
        stats["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return {k: round(v, 1) for k, v in stats.items()}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors them to W&B when a project is given."""

    def __init__(self, output_dir: str | os.PathLike, config: dict, wandb_project: str | None = None,
                 wandb_name: str | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.wandb_run = None
        if wandb_project is not None:
            import wandb
            self.wandb_run = wandb.init(project=wandb_project, name=wandb_name, config=config,
                                        dir=str(output_dir), mode=wandb_mode())

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after ``step`` (left by a run that went past its last checkpoint)."""
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.file.close()
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self.file = open(self.path, "a")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullLogger:
    """The logger of a pipeline rank other than 0: it writes nothing (rank 0 logs for the job)."""

    path = None

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
