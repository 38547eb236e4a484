"""The trainer's --kernels and --compile: parsing, the auto defaults, the fallback where a mode cannot run,
and that a run with either trains to the eager run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astrobio.train import ConfigError, main, parse_config
from astrobio.train.speed import requested_compile, requested_kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def tiny_run(out: Path, *extra: str) -> list[str]:
    """Three optimizer steps of tiny in one process (torch AdamW: no 8-bit rounding to amplify the
    compiled blocks' last-bit differences)."""
    return ["--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4", "--eval-batches", "1",
            "--pipeline-stages", "1", "--steps", "3", "--no-use-8bit-optimizer", "--output-dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_flags_default_to_auto_and_parse():
    config = parse_config([])
    assert (config.kernels, config.compile) == ("auto", "auto")
    config = parse_config(["--kernels", "fused", "--compile", "off"])
    assert (config.kernels, config.compile) == ("fused", "off")


def test_config_file_sets_kernels_and_compile(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("kernels: eager\ncompile: 'on'\n")
    config = parse_config(["--config", str(path)])
    assert (config.kernels, config.compile) == ("eager", "on")


@pytest.mark.parametrize("flags, named", [(["--kernels", "triton"], "--kernels"),
                                          (["--compile", "yes"], "--compile")])
def test_unknown_values_are_refused(flags, named):
    with pytest.raises(ConfigError, match=named):
        parse_config(flags)


@pytest.mark.parametrize("kernels, compile_, device, expected", [
    ("auto", "auto", CPU, ("fused", False)),  # the C++ layer kernels; compiling costs more than it gains
    ("auto", "auto", "offload on cpu", ("eager", False)),
    ("auto", "auto", CUDA, ("fused", True)),
    ("fused", "on", CPU, ("fused", True)),  # an explicit flag wins
    ("eager", "off", CUDA, ("eager", False)),
    ("auto", "auto", "offload on cuda", ("eager", False)),  # not yet run with the offload hooks on a GPU
    ("fused", "on", "offload on cuda", ("fused", True)),
])
def test_auto_is_fused_without_offload_and_compiled_on_cuda_only(kernels, compile_, device, expected):
    flags = ["--kernels", kernels, "--compile", compile_]
    if isinstance(device, str):
        flags, device = flags + ["--use-cpu-offloading"], CUDA if device.endswith("cuda") else CPU
    config = parse_config(flags)
    assert (requested_kernels(config, device), requested_compile(config, device)) == expected


def test_fused_on_the_cpu_without_the_extension_falls_back_to_eager(tmp_path, capsys, monkeypatch):
    from astrobio import ops
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "has_cpu_kernel", lambda: False)
    assert main(tiny_run(tmp_path / "eager", "--kernels", "eager")) == 0
    capsys.readouterr()
    assert main(tiny_run(tmp_path / "fused", "--kernels", "fused")) == 0
    err = capsys.readouterr().err
    assert "fused kernels off" in err and "C++ CPU kernels cannot run" in err
    assert summary(tmp_path / "fused")["kernels"] == "eager"
    assert summary(tmp_path / "fused")["compiled"] is False
    assert losses(tmp_path / "fused") == losses(tmp_path / "eager")


@pytest.mark.slow
def test_compiled_blocks_train_to_the_eager_losses(tmp_path):
    """Inductor's CPU code reorders fp32 reductions: the losses agree to 1e-4 relative, not bit for bit."""
    assert main(tiny_run(tmp_path / "eager", "--compile", "off")) == 0
    assert main(tiny_run(tmp_path / "compiled", "--compile", "on")) == 0
    assert summary(tmp_path / "compiled")["compiled"] is True
    assert summary(tmp_path / "eager")["compiled"] is False
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_fused_kernels_under_the_interpreter_train_to_the_eager_losses(tmp_path):
    """The Triton kernels and the chunked loss on CPU tensors (TRITON_INTERPRET=1, set before Triton is
    imported, hence a process of its own): the same losses as eager to 1e-5 relative."""
    assert main(tiny_run(tmp_path / "eager", "--kernels", "eager", "--steps", "2")) == 0
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-m", "astrobio.train",
                    *tiny_run(tmp_path / "fused", "--kernels", "fused", "--steps", "2")],
                   env=env, check=True, capture_output=True, timeout=600)
    assert summary(tmp_path / "fused")["kernels"] == "fused"
    eager, fused = losses(tmp_path / "eager"), losses(tmp_path / "fused")
    assert len(eager) == len(fused) == 2
    assert fused == pytest.approx(eager, rel=1e-5)
