"""The step breakdown (astrobio.train.timeline): every step's phases add up to its wall time, the
device's busy fraction is its compute over the step, and a run logs and draws them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from astrobio.train import parse_config
from astrobio.train.builders import build_parts
from astrobio.train.data import build_data
from astrobio.train.timeline import DEVICE, HOST, StepTimeline
from astrobio.train.trainer import Trainer


def small_trainer(tmp_path: Path, *extra: str) -> Trainer:
    config = parse_config(["--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4",
                           "--gradient-accumulation-steps", "3", "--pipeline-stages", "1", "--steps", "4",
                           "--output-dir", str(tmp_path), *extra])
    data = build_data(config)
    return Trainer(config, data, build_parts(config, data, torch.device("cpu")))


@pytest.mark.parametrize("extra", [(), ("--no-use-8bit-optimizer",), ("--use-cpu-offloading",)])
def test_the_phases_add_up_to_the_measured_step_time(tmp_path, extra):
    trainer = small_trainer(tmp_path, *extra)
    try:
        for _ in range(3):
            seconds = trainer.train_step()  # the loop's own clock, around the whole step
            breakdown = trainer.last_breakdown
            host = breakdown.phases_s[HOST]
            assert sum(host.values()) == pytest.approx(seconds, rel=0.05)
            assert host["forward"] > 0 and host["backward"] > 0
            expected = {"offload_end_step"} if "--use-cpu-offloading" in extra else {"norm_clip", "optimizer"}
            assert expected <= set(host)
            # on the CPU the device lane is the compute's wall time: forward and backward at least
            device = breakdown.phases_s[DEVICE]
            for phase in ("forward", "backward"):
                assert 0 < device[phase] <= host[phase] and device[phase] == pytest.approx(host[phase], rel=0.05)
            assert breakdown.busy_fraction == pytest.approx(sum(device.values()) / breakdown.step_s)
            assert 0 < breakdown.busy_fraction <= 1
            assert len([i for i in breakdown.intervals if i.lane == HOST and i.phase == "forward"]) == 3
    finally:
        trainer.logger.close()
        trainer.optimizer.close()


def test_busy_fraction_counts_device_work_only():
    timeline = StepTimeline(torch.device("cpu"))
    with timeline.phase("data"):
        time.sleep(0.03)
    with timeline.phase("forward", device_work=True):
        time.sleep(0.01)
    breakdown = timeline.finish()
    assert set(breakdown.phases_s[DEVICE]) == {"forward"}
    expected = breakdown.phases_s[DEVICE]["forward"] / breakdown.step_s
    assert breakdown.busy_fraction == pytest.approx(expected)
    assert timeline.intervals == []  # the next step starts afresh


def test_a_run_logs_the_breakdown_and_draws_the_timeline(tmp_path):
    from astrobio.train import run
    summary = run(parse_config(["--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4",
                                "--gradient-accumulation-steps", "2", "--eval-batches", "2", "--pipeline-stages",
                                "2", "--steps", "3", "--output-dir", str(tmp_path)]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "step_breakdown" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for record in logged:
        assert [b["stage"] for b in record["step_breakdown"]] == [0, 1]
        for b in record["step_breakdown"]:
            host = b["phases_s"]["host"]
            assert sum(host.values()) == pytest.approx(b["step_s"], rel=0.05)
            assert {"forward", "backward", "pipeline_wait"} <= set(host)
    assert len(summary["device_busy_fraction"]) == 2 and all(0 < f <= 1 for f in summary["device_busy_fraction"])
    assert (tmp_path / "plots" / "step_timeline.png").stat().st_size > 1000
