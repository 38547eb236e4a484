"""What a user meets around the inference commands: a corrupt newest checkpoint is skipped out loud, a
missing or bad argument is one line naming the flag (exit 2), and ``python -m astrobio`` reports the build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from astrobio import evaluate as evaluate_cli
from astrobio import generate as generate_cli
from astrobio.cli import run_cli
from astrobio.model import build_model, get_config
from astrobio.train.checkpoint import Checkpointer


@pytest.fixture
def run_with_corrupt_newest(tmp_path):
    """Checkpoints at steps 2 and 4 of a tiny model; step 4's weights are truncated."""
    model = build_model(get_config("tiny"), seed=3)
    config = {"model": "tiny", "tokenizer": None, "seq_len": 64, "seed": 0, "data": "builtin:300"}
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last_k=2)
    for step in (2, 4):
        checkpointer.save(step, model.state_dict(), {"config": config, "step": step})
    weights = tmp_path / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    return tmp_path


def test_generate_and_evaluate_say_which_checkpoint_they_use_and_why(run_with_corrupt_newest, capsys):
    run = run_with_corrupt_newest
    assert run_cli(generate_cli.main, ["--checkpoint", str(run), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: skipping") and "step-4" in err[0] and "truncated" in err[0]
    assert err[1] == f"warning: using {run / 'checkpoints' / 'step-2'}, the newest valid checkpoint of {run}"
    result = evaluate_cli.evaluate(str(run), max_examples=2, max_batches=1, catalogue=None)
    assert result["checkpoint"].endswith("step-2")
    assert "step-4" in capsys.readouterr().err


def test_a_healthy_run_directory_is_used_silently(run_with_corrupt_newest, capsys):
    run = run_with_corrupt_newest
    (run / "checkpoints" / "step-4").rename(run / "checkpoints" / ".gone")
    assert run_cli(generate_cli.main, ["--checkpoint", str(run), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == ""


GEN = ["--checkpoint", "x", "--prompt", "a"]


@pytest.mark.parametrize("module, argv, expected", [
    (generate_cli, ["--checkpoint", "runs/x"], "the following arguments are required: --prompt"),
    (generate_cli, GEN + ["--top-p", "1.5"], "argument --top-p: must lie in (0, 1]"),
    (generate_cli, GEN + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (generate_cli, GEN + ["--temperature", "-1"], "argument --temperature: must be >= 0"),
    (generate_cli, GEN + ["--top-k", "two"], "argument --top-k: expected a whole number"),
    (evaluate_cli, ["--checkpoint", "x", "--max-examples", "0"], "argument --max-examples: must be >= 1"),
    (evaluate_cli, [], "the following arguments are required: --checkpoint"),
])
def test_bad_arguments_are_one_line_naming_the_flag(module, argv, expected, capsys):
    assert run_cli(module.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {expected}") and "--help" in captured.err


def build_report(env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "astrobio"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_build_report_names_versions_kernels_and_gpus():
    import triton

    from astrobio import ops
    report = build_report()
    assert f"torch      {torch.__version__}" in report and f"triton     {triton.__version__}" in report
    assert f"python     {sys.version.split()[0]}" in report
    cuda_line = next(line for line in report.splitlines() if line.strip().startswith("CUDA "))
    if not ops.has_cuda_kernel():
        assert "absent" in cuda_line or "no CUDA GPU" in cuda_line
    if not torch.cuda.is_available():
        assert report.rstrip().endswith("none visible to torch")
    else:
        assert torch.cuda.get_device_name(0) in report


def test_build_report_shows_the_simd_path_the_kernel_takes():
    from astrobio import ops
    if not ops.has_cpu_kernel():
        pytest.skip(f"astrobio._C did not load: {ops.extension_error()}")
    assert "SIMD path portable (forced by ASTROBIO_CPU_SIMD=portable" in build_report({"ASTROBIO_CPU_SIMD": "portable"})
