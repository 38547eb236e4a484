"""A failing rank stops the whole pipeline job quickly, with an error naming the failed stage, and
leaves no process behind: a rank that raises, one killed mid-step, one that hangs, and Ctrl-C."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astrobio.model import build_stage, get_config
from astrobio.parallel.executor import run_pipeline_step
from astrobio.parallel.launch import LaunchError, launch
from astrobio.parallel.schedules import Action

CONFIG = get_config("tiny", d_model=32, n_heads=2, ffn_hidden=64)
TIMEOUT_S = 4.0


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def micro_batches(m=6):
    tokens = torch.randint(0, CONFIG.vocab_size, (m, 2, 9), generator=torch.Generator().manual_seed(0))
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def injected(rank, at, fault):
    """An on_action hook that makes ``rank`` fail just before ``at``."""
    def on_action(action):
        if action == at:
            if fault == "raise":
                raise ValueError(f"injected fault before {action}")
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    return on_action


def faulty_step(ctx, pid_dir, fault_rank, at, fault, steps=100):
    (Path(pid_dir) / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    stage = build_stage(CONFIG, ctx.rank, [2, 2])
    hook = injected(ctx.rank, at, fault) if ctx.rank == fault_rank else None
    for _ in range(steps):  # the fault comes in the first step; a rank that misses it would spin here
        run_pipeline_step(stage, "1f1b", micro_batches(), loss_fn, guard=ctx.guard, on_action=hook)


def assert_all_gone(pid_dir):
    pids = [int(p.read_text()) for p in Path(pid_dir).glob("rank*.pid")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def run_fault(tmp_path, fault_rank, at, fault):
    with pytest.raises(LaunchError) as err:
        launch(faulty_step, 2, (str(tmp_path), fault_rank, at, fault), timeout_s=TIMEOUT_S, backend="gloo")
    assert_all_gone(tmp_path)
    return str(err.value)


def test_rank_that_raises_stops_the_other(tmp_path):
    message = run_fault(tmp_path, 0, Action("B", 1), "raise")
    first, *rest = message.splitlines()
    assert first.startswith("pipeline job failed at stage 0 (rank 0): ValueError: injected fault before B1")
    # stage 1 stopped by itself (it was not killed by the launcher), naming stage 0
    assert any("stage 0 (rank 0) failed: ValueError" in line for line in rest)
    assert "did not stop" not in message


def test_rank_killed_mid_step_stops_the_other(tmp_path):
    message = run_fault(tmp_path, 1, Action("F", 3), "kill")
    assert message.splitlines()[0] == "pipeline job failed at stage 1 (rank 1): stage 1 (rank 1) died with signal SIGKILL"
    assert "stage 1 (rank 1) failed: died with signal SIGKILL" in message
    assert "did not stop" not in message


def test_hung_rank_is_found_by_heartbeat(tmp_path):
    """A stopped rank neither exits nor beats: the other stops after the fault timeout and the launcher
    kills the hung one."""
    message = run_fault(tmp_path, 1, Action("B", 2), "stop")
    assert message.splitlines()[0].startswith("pipeline job failed at stage 1 (rank 1): stage 1 (rank 1) sent no "
                                              "heartbeat")
    assert "stage 1 (rank 1) did not stop" in message


def test_ctrl_c_stops_every_rank(tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_pipeline_faults as t; "
              f"from astrobio.parallel.launch import launch; "
              f"launch(t.faulty_step, 2, ({str(tmp_path)!r}, -1, None, None, 10 ** 6), timeout_s=30, backend='gloo')")
    # as from a terminal: a test run started in the background (`cmd &` in a script) has SIGINT ignored,
    # and the job would inherit that
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            assert parent.poll() is None, parent.stderr.read()
            time.sleep(0.1)
        time.sleep(0.5)  # mid-step: without a fault the ranks step until they are stopped
        parent.send_signal(signal.SIGINT)
        try:
            parent.wait(timeout=60)  # ~1 s on a quiet machine
        except subprocess.TimeoutExpired:
            parent.kill()
            pytest.fail("the job did not stop within 60 s of Ctrl-C; its stderr:\n" + parent.communicate()[1][-3000:])
    finally:
        parent.kill()
    assert parent.returncode != 0
    assert "KeyboardInterrupt" in parent.stderr.read()
    assert_all_gone(tmp_path)



def split_backward_faults(ctx=None) -> int:
    """Page faults of 3 micro-batches of ZB-H1's split backward (B, then W) on the tiny model's last
    stage, after 3 that settle the heap."""
    from astrobio.parallel.weight_pass import WeightSplit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    stage = build_stage(get_config("tiny"), 1, [2, 2])
    split = WeightSplit(stage)

    def micro_batch():
        x = torch.randn(8, 256, 128, requires_grad=True)
        split.recording = calls = []
        loss = F.cross_entropy(stage(x).flatten(0, 1), torch.zeros(8 * 256, dtype=torch.long))
        split.recording = None
        split.input_backward(loss, None, x, calls)
        split.weight_backward(calls)

    for _ in range(3):
        micro_batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        micro_batch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_rank_processes_reuse_freed_memory():
    """glibc hands freed tensors back to the kernel and faults them in again page by page (thousands of
    faults per micro-batch of ZB-H1's split backward in a plain process); a rank keeps them."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_pipeline_faults as t; "
              f"print(t.split_backward_faults())")
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env=plain_env).stdout)
    ranks = launch(split_backward_faults, 1, timeout_s=60, backend="gloo")
    assert plain > 3000
    assert all(faults < plain / 5 for faults in ranks.values()), (plain, ranks)


def result_then_crash_in_teardown(ctx, crash_rank: int) -> int:
    """Returns its rank; the rank ``crash_rank`` then aborts while closing its process group."""
    if ctx.rank == crash_rank:
        import importlib
        importlib.import_module("astrobio.parallel.launch").close_rank = lambda ctx: os.abort()
    return ctx.rank


def test_a_rank_that_crashes_after_its_result_is_reported_not_hidden(capfd):
    """A rank that ends badly after sending its result (a native thread at exit) is named on stderr; the
    job's results stand. The ranks that end cleanly leave without the interpreter's teardown (exit 0)."""
    results = launch(result_then_crash_in_teardown, 2, (1,), timeout_s=TIMEOUT_S, backend="gloo")
    assert results == {0: 0, 1: 1}
    err = capfd.readouterr().err
    assert "stage 1 (rank 1) sent its result but then exited with signal SIGABRT" in err
    assert "stage 0" not in err
