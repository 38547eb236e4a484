"""The memory profiler: what a training process does hold, every N steps.

``MemoryProfiler(device, every_n_steps, alert_fraction=0.9, stage=0)``; ``maybe_sample(step)`` samples
when the step is due and returns the sample (a flat dict the trainer merges into ``metrics.jsonl`` and
W&B) or None; ``sample(step)`` samples now. A sample holds:

- ``host_rss_bytes`` / ``host_peak_bytes``: the process's resident set now and its high-water mark
  (VmRSS / VmHWM of /proc/self/status; ``resource.getrusage`` peak where /proc is absent);
- ``pinned_bytes``: page-locked host memory: from the caller's ``pinned_bytes`` callable (the offload
  engine knows its buffers), else torch's pinned-memory allocator statistics once CUDA is initialised;
- on CUDA ``device_allocated_bytes``, ``device_reserved_bytes``, ``device_peak_bytes`` (the caching
  allocator's allocated, reserved and peak allocated) and ``device_total_bytes``; on the CPU the device
  is host memory, so these are the resident set, the high-water mark and the machine's MemTotal;
- ``device``: the device sampled (``cpu``, ``cuda:0``);
- ``alert``: None, or a line saying the device passed ``alert_fraction`` of its memory (reserved bytes
  on CUDA, the resident set on the CPU), also logged as a warning.

``plot(path)`` renders the timeline (one panel per stage when given other stages' samples).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from astrobio.memory.units import GIB

log = logging.getLogger("astrobio.memory")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_rss() -> int:
    """Resident set of this process now, in bytes (the peak where /proc is unavailable)."""
    now = _status_kib("VmRSS")
    return now if now is not None else host_peak()


def host_peak() -> int:
    """High-water mark of the resident set, in bytes."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def host_total() -> int:
    """Physical memory of the machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def torch_pinned_bytes() -> int | None:
    """Bytes held by torch's pinned host allocator, or None when CUDA is not in use."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return int(torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0))


class MemoryProfiler:
    def __init__(self, device: torch.device | str = "cpu", every_n_steps: int = 10, alert_fraction: float = 0.9,
                 stage: int = 0, capacity: int | None = None, pinned_bytes: Callable[[], int] | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not 0 < alert_fraction <= 1:
            raise ValueError(f"alert_fraction must be in (0, 1], got {alert_fraction}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.every_n_steps, self.alert_fraction, self.stage = every_n_steps, alert_fraction, stage
        self.capacity = capacity or self._default_capacity()
        self.pinned_bytes = pinned_bytes
        self.samples: list[dict] = []

    def _default_capacity(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return host_total()

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def maybe_sample(self, step: int) -> dict | None:
        return self.sample(step) if self.due(step) else None

    def sample(self, step: int) -> dict:
        record = {"step": step, "stage": self.stage, "device": str(self.device), "time": time.time(),
                  "host_rss_bytes": host_rss(), "host_peak_bytes": host_peak(),
                  "pinned_bytes": self.pinned_bytes() if self.pinned_bytes else torch_pinned_bytes()}
        record.update(self._device_stats(record))
        record["alert"] = self._alert(record)
        if record["alert"]:
            log.warning(record["alert"])
        self.samples.append(record)
        return record

    def _device_stats(self, record: dict) -> dict:
        if self.device.type == "cuda":
            return {"device_allocated_bytes": torch.cuda.memory_allocated(self.device),
                    "device_reserved_bytes": torch.cuda.memory_reserved(self.device),
                    "device_peak_bytes": torch.cuda.max_memory_allocated(self.device),
                    "device_total_bytes": self.capacity}
        return {"device_allocated_bytes": record["host_rss_bytes"], "device_reserved_bytes": record["host_rss_bytes"],
                "device_peak_bytes": record["host_peak_bytes"], "device_total_bytes": self.capacity}

    def _alert(self, record: dict) -> str | None:
        used = record["device_reserved_bytes"]
        if used <= self.alert_fraction * self.capacity:
            return None
        what = "reserved" if self.device.type == "cuda" else "resident"
        return (f"memory alert: stage {self.stage} ({self.device}) {what} {used / GIB:.2f} GiB = "
                f"{used / self.capacity:.0%} of {self.capacity / GIB:.2f} GiB, above the "
                f"{self.alert_fraction:.0%} threshold at step {record['step']}")

    def plot(self, path: str | os.PathLike, other_stages: list[dict] = ()) -> Path:
        """Writes the memory timeline PNG; ``other_stages``: samples from other ranks (e.g. read back
        from their metrics), drawn in their own panels."""
        return plot_memory(self.samples + list(other_stages), path, self.alert_fraction)


def plot_memory(samples: list[dict], path: str | os.PathLike, alert_fraction: float = 0.9) -> Path:
    """One panel per stage: device allocated / reserved / peak and host RSS in GiB against the step (on
    the CPU, where the device is host memory, the resident set and its peak), with the alert line once
    memory comes within a factor of two of it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("no memory samples to plot; call sample() first")
    stages = sorted({s["stage"] for s in samples})
    fig, axes = plt.subplots(len(stages), 1, figsize=(8, 3.2 * len(stages)), squeeze=False, sharex=True)
    for ax, stage in zip(axes[:, 0], stages):
        rows = sorted((s for s in samples if s["stage"] == stage), key=lambda s: s["step"])
        steps = [r["step"] for r in rows]
        on_cuda = str(rows[-1].get("device", "cuda")).startswith("cuda")
        curves = ((("device_allocated_bytes", "device allocated"), ("device_reserved_bytes", "device reserved"),
                   ("device_peak_bytes", "device peak"), ("host_rss_bytes", "host RSS")) if on_cuda
                  else (("host_rss_bytes", "host RSS (the device)"), ("host_peak_bytes", "host peak RSS")))
        for key, label in curves:
            ax.plot(steps, [r[key] / GIB for r in rows], marker=".", label=label)
        alert_line = alert_fraction * rows[-1]["device_total_bytes"] / GIB
        if max(r["device_reserved_bytes"] for r in rows) / GIB > alert_line / 2:  # else it squashes the curves
            ax.axhline(alert_line, color="red", linestyle="--", label=f"alert ({alert_fraction:.0%} of device)")
        ax.set_title(f"stage {stage}")
        ax.set_ylabel("GiB")
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
