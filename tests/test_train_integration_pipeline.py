"""The trainer over 2 pipeline stages (2 gloo ranks on 127.0.0.1): the same losses as one process,
checkpoints that re-split between 1 and 2 stages, the measured bubble, offload per rank, and a rank
that dies."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from astrobio.model import build_model, get_config

from astrobio.train import parse_config, run
from astrobio.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
BASE = ("--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4", "--gradient-accumulation-steps", "4",
        "--eval-batches", "2", "--steps", "6", "--warmup-steps", "2")


def args(out: Path, *extra: str) -> list[str]:
    """One stage unless ``extra`` says otherwise (the last --pipeline-stages wins)."""
    return [*BASE, "--pipeline-stages", "1", "--output-dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run(parse_config(args(out)))
    return out


def test_two_stages_train_as_one_and_resume_across_stage_counts(tmp_path, one_stage):
    from astrobio.inference.loading import load_model
    reference = losses(one_stage)
    two = tmp_path / "two"
    summary = run(parse_config(args(two, "--pipeline-stages", "2", "--stop-at-step", "3")))
    assert summary["steps"] == 3
    parts = tmp_path / "two" / "checkpoints" / "step-3"
    manifest = json.loads((parts / "manifest.json").read_text())
    assert {"model-stage0.safetensors", "model-stage1.safetensors", "optimizer-stage0.json",
            "optimizer-stage1.json", "state.json"} <= set(manifest["files"])
    # the inference loader reads the stage files under the whole model's names
    loaded = load_model(parts)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    whole = build_model(get_config("tiny", vocab_size=259)).state_dict()
    stored = {**load_file(parts / "model-stage0.safetensors"), **load_file(parts / "model-stage1.safetensors")}
    assert set(stored) == set(whole) == set(loaded.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, stored[name]), name
    # 2 stages -> resume with 1
    run(parse_config(args(two, "--resume", "auto")))
    # 1 stage -> resume with 2
    one_then_two = tmp_path / "one_then_two"
    run(parse_config(args(one_then_two, "--stop-at-step", "3")))
    run(parse_config(args(one_then_two, "--resume", "auto", "--pipeline-stages", "2")))
    for out in (two, one_then_two):
        assert losses(out) == pytest.approx(reference, rel=1e-5, abs=1e-6)  # fp32: the norm is summed in parts
    records = read_metrics(two / "metrics.jsonl")
    bubbles = [r["pipeline_bubble"] for r in records if "pipeline_bubble" in r]
    assert len(bubbles) == 3 and all(0 < b < 1 for b in bubbles)
    assert {r.get("stage") for r in records if "device_reserved_bytes" in r} == {0, 1}  # both stages profiled
    assert (two / "plots" / "pipeline.png").stat().st_size > 1000
    assert (two / "plots" / "memory.png").stat().st_size > 1000


@pytest.mark.parametrize("schedule", ["zb-h1"])  # gpipe differs from 1f1b in its order only (H5's tests)
def test_other_schedules_compute_the_same_losses(tmp_path, one_stage, schedule):
    out = tmp_path / schedule
    run(parse_config(args(out, "--pipeline-stages", "2", "--schedule", schedule, "--steps", "6",
                          "--stop-at-step", "2")))
    assert losses(out) == pytest.approx(losses(one_stage)[:2], rel=1e-5)


def test_offload_per_rank_matches_one_process(tmp_path):
    offload = ("--use-cpu-offloading", "--stop-at-step", "3")
    run(parse_config(args(tmp_path / "one", *offload)))
    run(parse_config(args(tmp_path / "two", *offload, "--pipeline-stages", "2")))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def spawned_ranks(parent: int) -> list[int]:
    """The pids of the processes ``parent`` spawned for its ranks, oldest first."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def kill_a_rank_in_training(train_args: list[str], out: Path, ranks: int, victim: int,
                            start_s: float) -> tuple[int, list[str], str]:
    """Starts ``python -m astrobio.train`` with ``train_args`` (writing to ``out``), waits up to
    ``start_s`` for its first training loss, SIGKILLs spawned rank ``victim`` of its ``ranks`` and lets it
    stop; returns its exit code, its ``error:`` lines and its stderr, once no rank outlives it."""
    proc = subprocess.Popen([sys.executable, "-m", "astrobio.train", *train_args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + start_s
        while not any("loss" in r for r in read_metrics(out / "metrics.jsonl")):
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start training"
            time.sleep(0.2)
        spawned = spawned_ranks(proc.pid)
        assert len(spawned) == ranks
        os.kill(spawned[victim], signal.SIGKILL)  # ranks start in order: the victim-th one started
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not spawned_ranks(proc.pid)
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]  # tqdm ends lines in \r
    return proc.returncode, errors, err


def test_a_dead_rank_stops_the_job_with_one_line(tmp_path):
    out = tmp_path / "run"
    code, errors, err = kill_a_rank_in_training(
        args(out, "--pipeline-stages", "2", "--steps", "100000", "--pipeline-timeout", "10",
             "--save-every-n-steps", "0"), out, ranks=2, victim=1, start_s=90)
    assert code == 1 and len(errors) == 1, err[-2000:]
    assert "stage 1" in errors[0] and "SIGKILL" in errors[0]


def test_ctrl_c_stops_both_stages_after_the_same_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "astrobio.train", *args(out, "--pipeline-stages", "2",
                             "--steps", "100000", "--save-every-n-steps", "0")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any("loss" in r for r in read_metrics(out / "metrics.jsonl")):
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start training"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT
    # the ranks end cleanly: nothing left for multiprocessing to clean up, no native teardown message
    for words in ("leaked semaphore", "terminate called", "warning: stage"):
        assert words not in err, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]
    assert summary["stopped_by_signal"] == signal.SIGINT and 0 < step < 100000
    files = json.loads((out / "checkpoints" / f"step-{step}" / "manifest.json").read_text())["files"]
    assert {"model-stage0.safetensors", "model-stage1.safetensors"} <= set(files)  # both stages at one step
