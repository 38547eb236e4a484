"""The trainer with the other helpers' pieces plugged in: the memory preflight and profiler, the
multimodal prefix, and the CPU offload engine (the pipeline is in test_train_integration_pipeline.py)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import pytest

from astrobio.memory import plan
from astrobio.memory.units import gib
from astrobio.train import main, parse_config, run
from astrobio.train.memory import plan_config
from astrobio.train.logging import read_metrics

MIB = 1 << 20


def small_args(out: Path, *extra: str) -> list[str]:
    return ["--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4", "--eval-batches", "1",
            "--output-dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# ------------------------------------------------------------------------------ memory preflight

def test_preflight_refuses_a_run_that_will_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("astrobio.train.memory.host_total", lambda: 8 * MIB)
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: this configuration will not fit: host needs")
    config = parse_config(small_args(out, "--steps", "2"))
    expected = plan(plan_config(config, 259, __import__("torch").device("cpu")))
    over = expected.host.total - expected.host.budget
    assert over > 0 and f"{gib(over)} over its budget of {gib(expected.host.budget)}" in err
    assert "what would change it" in err and "--force" in err
    assert not out.exists()  # refused before anything was written


def test_force_runs_anyway(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("astrobio.train.memory.host_total", lambda: 8 * MIB)
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "2", "--force")) == 0
    assert "warning: --force: starting although this configuration will not fit" in capsys.readouterr().err
    assert len(losses(out)) == 2


def test_a_13b_run_is_refused_on_this_host(tmp_path, capsys):
    assert main(["--model", "13b", "--output-dir", str(tmp_path / "run"), "--data", "builtin:50"]) == 2
    err = capsys.readouterr().err
    assert "will not fit" in err and "over its budget" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------ memory profiler

class FakeWandb:
    """Stands in for the wandb module (with a module spec, so the config check finds it)."""

    def __init__(self):
        self.logged = []
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(self, **kwargs):
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        pass


def test_profiler_samples_every_n_steps_with_alerts(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    run(parse_config(small_args(out, "--steps", "6", "--log-every-n-steps", "3", "--profile-every-n-steps", "2",
                                "--memory-alert-fraction", "0.001", "--wandb-project", "astro")))
    records = read_metrics(out / "metrics.jsonl")
    sampled = [r for r in records if "device_reserved_bytes" in r]
    assert [r["step"] for r in sampled] == [0, 2, 4, 6]
    assert [r["step"] for r in records if "loss" in r] == [3, 6]  # logging keeps its own cadence
    status = Path("/proc/self/status").read_text()
    rss_now = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
    for r in sampled:
        # on the CPU the device is host memory: the sample is this process's resident set
        assert r["device_reserved_bytes"] == r["host_rss_bytes"] and 0.3 * rss_now < r["host_rss_bytes"] < 3 * rss_now
        assert r["device_peak_bytes"] >= r["device_allocated_bytes"] and r["stage"] == 0
        assert "above the 0% threshold" in r["memory_alert"]  # 0.1% of the machine's memory is passed at once
    assert any("memory_alert" in data for _, data in fake.logged)
    assert (out / "plots" / "memory.png").stat().st_size > 1000
