"""The trainer with the other helpers' pieces plugged in: the memory preflight and profiler, the
multimodal prefix, and the CPU offload engine (the pipeline is in test_train_integration_pipeline.py)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path

import pytest
import torch

from astrobio.memory import plan
from astrobio.model import build_model, get_config
from astrobio.memory.units import gib
from astrobio.train import main, parse_config, run
from astrobio.train.memory import plan_config
from astrobio.train.logging import read_metrics

MIB = 1 << 20


def small_args(out: Path, *extra: str) -> list[str]:
    return ["--pipeline-stages", "1", "--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4",
            "--eval-batches", "1", "--output-dir", str(out), *extra]


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
    expected = plan(plan_config(config, 259, torch.device("cpu")))
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
    assert main(["--model", "13b", "--output-dir", str(tmp_path / "run"), "--data", "builtin:50",
                 "--pipeline-stages", "1"]) == 2
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


# ------------------------------------------------------------------------------------ multimodal

MULTIMODAL = ("--modalities", "text,catalogue,graph", "--data", "builtin:60", "--seq-len", "48",
              "--micro-batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2")


def multimodal_args(out: Path, *extra: str) -> list[str]:
    return [*MULTIMODAL, "--output-dir", str(out), *extra]


def test_multimodal_run_learns_trains_the_prefix_and_resumes_exactly(tmp_path):
    from astrobio.model.encoders import build_prefix
    from astrobio.train.checkpoint import load_checkpoint
    straight = tmp_path / "straight"
    summary = run(parse_config(multimodal_args(straight, "--steps", "8")))
    assert summary["final_val_loss"] < 0.9 * summary["initial_val_loss"]
    _, state, _ = load_checkpoint(straight / "checkpoints" / "step-8")
    initial = build_prefix(128, ("catalogue", "graph"), seed=0).state_dict()
    assert set(state["prefix"]) == set(initial)
    changed = [k for k in initial if not torch.equal(state["prefix"][k], initial[k])]
    assert len(changed) > len(initial) // 2  # the optimizer updates the encoders
    # the optimizer covers the model's and the prefix's parameters
    model_params = len(list(build_model(get_config("tiny", vocab_size=259)).parameters()))
    assert len(state["optimizer"]["state"]) == model_params + len(list(build_prefix(128, ("catalogue", "graph"))
                                                                         .parameters()))

    resumed = tmp_path / "resumed"
    run(parse_config(multimodal_args(resumed, "--steps", "8", "--stop-at-step", "4")))
    run(parse_config(multimodal_args(resumed, "--steps", "8", "--resume", "auto")))
    assert losses(resumed) == losses(straight)  # bit for bit


def test_multimodal_prefix_counts_against_max_seq_len(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(multimodal_args(out, "--seq-len", "510")) == 2
    err = capsys.readouterr().err
    assert "--seq-len 510 + 4 prefix positions (text,catalogue,graph) exceeds model 'tiny'" in err
    assert "--seq-len 508 or less" in err and not out.exists()


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/served that records the Authorization headers it gets."""
    import http.server
    import threading
    served = tmp_path / "served"
    served.mkdir()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_http_data_with_credentials_stores_only_the_redacted_uri(tmp_path, http_server, monkeypatch):
    from astrobio.data import load_records
    served, host, seen = http_server
    (served / "corpus.txt").write_text("\n\n".join(load_records("builtin:120")))
    monkeypatch.setenv("ASTROBIO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    uri = f"http://reader:hunter2secret@{host}/corpus.txt"
    run(parse_config(small_args(out, "--steps", "2", "--data", uri)))  # the last --data wins
    assert any(h and h.startswith("Basic ") for h in seen)  # the credentials were used ...
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert any(p.name == "state.json" for p in written)
    for path in written:  # ... and never stored
        assert "hunter2secret" not in path.read_text() and "reader:" not in path.read_text(), path
    assert json.loads((out / "config.json").read_text())["data"] == f"http://***@{host}/corpus.txt"


# ----------------------------------------------------------------------------------- CPU offload

def test_offload_is_on_by_default_for_13b_only():
    assert parse_config(["--model", "13b"]).use_cpu_offloading is True
    assert parse_config(["--model", "13b", "--no-use-cpu-offloading"]).use_cpu_offloading is False
    assert parse_config([]).use_cpu_offloading is False
    assert parse_config(["--use-cpu-offloading"]).use_cpu_offloading is True


OFFLOAD = ("--use-cpu-offloading", "--gradient-accumulation-steps", "2", "--max-grad-norm", "0.5")


def test_offload_trains_like_the_in_process_8bit_adamw(tmp_path):
    run(parse_config(small_args(tmp_path / "local", "--steps", "6", "--gradient-accumulation-steps", "2",
                                "--max-grad-norm", "0.5")))
    run(parse_config(small_args(tmp_path / "offload", "--steps", "6", *OFFLOAD)))
    local, offload = losses(tmp_path / "local"), losses(tmp_path / "offload")
    # the same 8-bit AdamW on the same accumulated, clipped gradients (the norm is summed in another order)
    assert offload == pytest.approx(local, rel=1e-4) and offload[-1] < offload[0]


@pytest.mark.parametrize("steps, precision", [(20, ()), (6, ("--master-weights", "bf16-sr", "--accum-dtype", "bf16"))])
def test_offload_resume_is_exact(tmp_path, steps, precision):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--steps", str(steps), "--save-every-n-steps", "0", *OFFLOAD, *precision)
    run(parse_config(small_args(straight, *args)))
    run(parse_config(small_args(resumed, *args, "--stop-at-step", str(steps // 2))))
    run(parse_config(small_args(resumed, *args, "--resume", "auto")))
    assert len(losses(straight)) == steps
    assert losses(resumed) == losses(straight)  # bit for bit: masters, moments and the rounding seeds restored
