"""Where the offload engine accumulates gradients when the trainer asks for ``auto``: on the device when
the stage's accumulators fit beside what the plan already holds, else on the host."""

from __future__ import annotations

import math

import pytest
import torch

from astrobio.memory import PlanConfig, plan
from astrobio.memory.accumulation import accumulator_bytes, choose_accumulation

GIB = 2 ** 30


def plan_13b(**changes):
    options = dict(model="13b", stages=1, hardware="h200", host_memory=128 * GIB, master_weights="bf16-sr",
                   accum_dtype="bf16", micro_batches=16)
    return plan(PlanConfig(**{**options, **changes}))


def test_accumulators_are_one_per_parameter_in_the_accumulation_dtype():
    for dtype, width in (("fp32", 4), ("bf16", 2)):
        p = plan_13b(accum_dtype=dtype, stages=2)
        assert [accumulator_bytes(p, s) for s in range(2)] == [n * width for n in p.stage_params]


def test_auto_takes_the_device_exactly_when_the_accumulators_fit():
    reference = plan_13b()
    needed = reference.devices[0].total + accumulator_bytes(reference, 0)
    fraction = reference.config.max_device_fraction
    roomy = plan_13b(gpu_memory=math.ceil(needed / fraction) + 4096)
    tight = plan_13b(gpu_memory=math.floor(needed / fraction) - 4096)
    assert roomy.devices[0].total == tight.devices[0].total == reference.devices[0].total
    assert choose_accumulation(roomy).location == "device"
    choice = choose_accumulation(tight)
    assert choice.location == "host" and not choice.fits_on_device
    assert "every micro-batch" in choice.line() and "stage 0" in choice.line()


def test_13b_on_two_a5000_accumulates_on_the_host_and_on_an_h200_on_the_device():
    assert choose_accumulation(plan_13b()).location == "device"
    a5000 = plan(PlanConfig(model="13b", stages=2, hardware="a5000", host_memory=256 * GIB))
    assert choose_accumulation(a5000).location == "host"


def test_cpu_training_accumulates_on_the_host_and_an_explicit_choice_is_kept():
    cpu = plan(PlanConfig(model="tiny", stages=1, hardware="cpu", seq_len=128, host_memory=8 * GIB))
    assert choose_accumulation(cpu, "auto").location == "host"
    kept = choose_accumulation(cpu, "device")
    assert kept.location == "device" and kept.requested == "device" and "as requested" in kept.reason
    assert choose_accumulation(plan_13b(), "host").location == "host"


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="choose one of auto, device, host"):
        choose_accumulation(plan_13b(), "gpu")
    with pytest.raises(ValueError, match="CPU offload only"):
        choose_accumulation(plan_13b(offload=False, stages=2))


# ------------------------------------------------------------------------------------ through the trainer

def train_args(out, *extra):
    return ["--pipeline-stages", "1", "--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4",
            "--eval-batches", "1", "--steps", "4", "--use-cpu-offloading", "--gradient-accumulation-steps", "3",
            "--max-grad-norm", "0.5", "--output-dir", str(out), *extra]


def test_the_trainer_trains_alike_with_either_location_and_reports_it(tmp_path, capsys):
    from astrobio.train import parse_config, run
    from astrobio.train.logging import read_metrics

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    summaries = {where: run(parse_config(train_args(tmp_path / where, "--grad-accum-location", where)))
                 for where in ("device", "host", "auto")}
    assert losses(tmp_path / "device") == losses(tmp_path / "host") == losses(tmp_path / "auto")
    assert [summaries[w]["grad_accum_location"] for w in ("device", "host", "auto")] == ["device", "host", "host"]
    assert "gradient accumulation: host (auto)" in capsys.readouterr().out  # the CPU: the device is host memory
    saved = summaries["auto"]
    assert saved["checkpoint_save_bytes"] > 0 and saved["checkpoint_save_gb_per_s"] > 0


def test_an_explicit_device_location_that_will_not_fit_is_refused(monkeypatch):
    """13B in two stages on GPUs of 24 GiB: a stage's bf16 accumulators (12.2 GiB) cannot join its weights."""
    import astrobio.train.memory as memory
    from astrobio.train import parse_config
    from astrobio.train.config import ConfigError
    cuda = torch.device("cuda")
    monkeypatch.setattr(memory, "gpu_budget", lambda config, device: ("a5000", 24 * GIB))
    monkeypatch.setattr(memory, "host_total", lambda: 256 * GIB)
    args = ["--model", "13b", "--pipeline-stages", "2", "--seq-len", "2048", "--micro-batch-size", "1",
            "--master-weights", "bf16-sr", "--accum-dtype", "bf16", "--grad-accum-location"]
    with pytest.raises(ConfigError, match=r"device: as requested \(stage \d would hold .* does not fit\)"):
        memory.resolve_grad_accum_location(parse_config(args + ["device"]), 32768, cuda)
    assert memory.resolve_grad_accum_location(parse_config(args + ["auto"]), 32768, cuda,
                                              log=None).grad_accum_location == "host"
    forced = memory.resolve_grad_accum_location(parse_config(args + ["device", "--force"]), 32768, cuda, log=None)
    assert forced.grad_accum_location == "device"
