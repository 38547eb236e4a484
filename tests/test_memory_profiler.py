"""The memory profiler: samples hold the host resident set, alerts fire past the threshold, plots are written."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from astrobio.memory import MemoryProfiler, plot_memory


# NOTE: run in a fresh process, with one thread. In the test run's own process, memory that earlier tests
# left behind can be freed between the two samples (a garbage collection of their reference cycles, their
# leftover threads) and hide the growth. And since Linux 6.2 the resident-set counters are per CPU, which
# some kernels read for VmRSS without summing: pages faulted by many threads on many CPUs may not show yet
# (up to a batch of pages per CPU); touched from one thread, at most one batch is missing.
# The high-water mark is read back from /proc here, by the test's own parser: getrusage's ru_maxrss is no
# reference in a child process, as Linux carries the parent's high-water mark into it across exec.
GROWTH = """
import json, torch
from astrobio.memory import MemoryProfiler
torch.set_num_threads(1)
profiler = MemoryProfiler("cpu", every_n_steps=1)
before = profiler.sample(0)
block = torch.ones(64 * 2 ** 20, dtype=torch.uint8)  # touch 64 MiB
after = profiler.sample(1)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"before": before, "after": after, "hwm_kib": int(status["VmHWM"].split()[0])}))
"""


def test_sample_reports_host_memory_and_sees_growth():
    result = subprocess.run([sys.executable, "-c", GROWTH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)  # the sample goes into metrics.jsonl as is
    before, after = measured["before"], measured["after"]
    assert after["host_rss_bytes"] - before["host_rss_bytes"] >= 48 * 2 ** 20
    assert after["host_peak_bytes"] == pytest.approx(measured["hwm_kib"] * 1024, rel=0.05)
    assert after["host_peak_bytes"] >= after["host_rss_bytes"]
    assert after["pinned_bytes"] is None  # no CUDA in use here
    assert after["device_total_bytes"] > after["host_rss_bytes"]
    assert after["alert"] is None


def test_every_n_steps_decides_when_to_sample():
    profiler = MemoryProfiler("cpu", every_n_steps=5)
    taken = [s for s in range(12) if profiler.maybe_sample(s) is not None]
    assert taken == [0, 5, 10]
    assert [s["step"] for s in profiler.samples] == taken


def test_alert_fires_past_the_threshold_and_is_logged(caplog):
    quiet = MemoryProfiler("cpu", alert_fraction=1.0)
    assert quiet.sample(0)["alert"] is None
    loud = MemoryProfiler("cpu", alert_fraction=0.001, stage=1)
    with caplog.at_level(logging.WARNING, logger="astrobio.memory"):
        record = loud.sample(7)
    assert record["alert"] and "stage 1" in record["alert"] and "step 7" in record["alert"]
    assert record["alert"] in caplog.text


def test_pinned_bytes_come_from_the_caller_when_given():
    profiler = MemoryProfiler("cpu", pinned_bytes=lambda: 12345)
    assert profiler.sample(0)["pinned_bytes"] == 12345


def test_plot_is_written_with_a_panel_per_stage(tmp_path):
    profiler = MemoryProfiler("cpu", every_n_steps=1, stage=0)
    for step in range(3):
        profiler.sample(step)
    other = [dict(s, stage=1) for s in profiler.samples]
    path = profiler.plot(tmp_path / "plots" / "memory.png", other_stages=other)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="no memory samples"):
        plot_memory([], tmp_path / "empty.png")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryProfiler("cpu", every_n_steps=0)
    with pytest.raises(ValueError, match="alert_fraction"):
        MemoryProfiler("cpu", alert_fraction=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sample_tracks_the_allocator():
    profiler = MemoryProfiler("cuda", every_n_steps=1)
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    record = profiler.sample(0)
    assert record["device_allocated_bytes"] >= x.numel()
    assert record["device_reserved_bytes"] >= record["device_allocated_bytes"]
    assert record["device_total_bytes"] == torch.cuda.get_device_properties(0).total_memory
