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
from astrobio.optim.offload_timings import TimingsRecorder
from astrobio.train.timeline import DEVICE, HOST, STALL, WEIGHT_WAIT, StepTimeline
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
        for step in range(3):
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
            stall = breakdown.phases_s.get(STALL, {})
            if "--use-cpu-offloading" in extra and step > 0:  # the forward waits for last step's weights
                assert set(stall) == {WEIGHT_WAIT} and 0 <= stall[WEIGHT_WAIT] <= device["forward"]
                stalls = [i for i in breakdown.intervals if i.lane == STALL]
                forwards = [i for i in breakdown.intervals if i.lane == DEVICE and i.phase == "forward"]
                assert all(any(f.start <= s.start <= s.end <= f.end for f in forwards) for s in stalls)
            else:
                assert stall == {}
            busy = sum(device.values()) - sum(stall.values())
            assert breakdown.busy_fraction == pytest.approx(busy / breakdown.step_s)
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


def test_stalls_of_the_compute_stream_are_not_busy():
    timeline = StepTimeline(torch.device("cpu"))
    with timeline.phase("forward", device_work=True):
        time.sleep(0.02)
    forward = timeline.intervals[0]
    # fake waits for weights inside the forward, 4 ms and 6 ms, in the clock the engine reports on the CPU
    timeline.add_stall(timeline.origin + forward.start, timeline.origin + forward.start + 0.004)
    timeline.add_stall(timeline.origin + forward.end - 0.006, timeline.origin + forward.end)
    breakdown = timeline.finish()
    assert breakdown.phases_s[STALL] == {WEIGHT_WAIT: pytest.approx(0.010)}
    busy = breakdown.phases_s[DEVICE]["forward"] - 0.010
    assert breakdown.busy_fraction == pytest.approx(busy / breakdown.step_s)
    assert breakdown.record()["phases_s"][STALL][WEIGHT_WAIT] == pytest.approx(0.010, abs=1e-6)
    assert timeline.stall_marks == []  # the next step starts afresh


class FakeEvent:
    """A CUDA event's timing interface: milliseconds since an arbitrary origin."""

    def __init__(self, ms: float):
        self.ms, self.synchronized = ms, False

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.ms - self.ms


def test_the_engine_sums_the_stalls_of_a_step_when_its_record_closes():
    recorder = TimingsRecorder("device", cuda=True)
    recorder.add("weight_wait_s", 0.001)  # the host hardly waits on a GPU: the stream does
    pairs = [(FakeEvent(10.0), FakeEvent(250.0)), (FakeEvent(300.0), FakeEvent(301.5))]
    recorder.add_stall(None)  # nothing to wait for
    for pair in pairs:
        recorder.add_stall(pair)
    closed = recorder.roll()
    assert closed.stream_stall_s == pytest.approx(0.2415) and closed.weight_wait_s == pytest.approx(0.001)
    assert pairs[-1][1].synchronized  # read once, after the last wait
    assert recorder.roll().stream_stall_s == 0.0  # the next record starts afresh
    on_cpu = TimingsRecorder("host")
    on_cpu.add("weight_wait_s", 0.3)
    assert on_cpu.roll().stream_stall_s == pytest.approx(0.3)  # no streams: the host's wait for weights


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
