"""Pipeline schedules as data, checked by replaying them in the simulator."""

import random
from dataclasses import replace
from fractions import Fraction

import pytest

from astrobio.parallel.schedules import Action, schedule, theoretical_bubble
from astrobio.parallel.simulate import Costs, DeadlockError, simulate

KINDS = ("gpipe", "1f1b", "zb-h1")


def test_two_stage_bubbles_match_theory():
    """F = B = W = 1 (a whole backward is 2): GPipe and 1F1B idle 3 units per stage of 99, ZB-H1 1 of 97."""
    m = 32
    gpipe, one_f, zb = (simulate(schedule(k, 2, m)) for k in KINDS)
    assert Fraction(gpipe.bubble).limit_denominator(1000) == Fraction(1, 33)
    assert Fraction(one_f.bubble).limit_denominator(1000) == Fraction(1, 33)
    assert gpipe.makespan == one_f.makespan == 3 * m + 3
    assert zb.makespan == 3 * m + 1
    assert Fraction(zb.bubble).limit_denominator(1000) == Fraction(1, 97)
    assert 0.3 < zb.bubble / one_f.bubble < 0.35


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stages,m", [(1, 4), (2, 1), (2, 5), (3, 7), (4, 4), (4, 16), (8, 32)])
def test_any_stage_count_runs_and_matches_formula(kind, stages, m):
    result = simulate(schedule(kind, stages, m))
    if m >= stages:  # the closed forms assume a full steady state
        assert result.bubble == pytest.approx(theoretical_bubble(kind, stages, m), abs=1e-12)
    # every micro-batch is computed exactly once per stage
    for rows in result.timeline:
        done = sorted((a.op, a.micro_batch) for a, _, _ in rows)
        ops = ("F", "B", "W") if kind == "zb-h1" else ("F", "B")
        assert done == sorted((op, i) for op in ops for i in range(m))


def test_in_flight_activations():
    """1F1B holds at most p - s micro-batches on stage s (2 on stage 0 of 2); GPipe holds all."""
    assert simulate(schedule("1f1b", 2, 32)).peak_in_flight == [2, 1]
    assert simulate(schedule("gpipe", 2, 32)).peak_in_flight == [32, 32]
    assert max(simulate(schedule("zb-h1", 2, 32)).peak_in_flight) <= 2
    assert simulate(schedule("1f1b", 4, 32)).peak_in_flight == [4, 3, 2, 1]


def test_dependencies_hold_in_the_timeline():
    """A forward never starts before the previous stage's forward of that micro-batch ends, a backward
    never before the next stage's backward, and W never before B on the same stage."""
    costs = Costs(f=1.0, b=1.3, w=0.7, comm=0.25)
    for kind in KINDS:
        result = simulate(schedule(kind, 3, 6), costs)
        when = {(s, a.op, a.micro_batch): (start, end) for s, rows in enumerate(result.timeline)
                for a, start, end in rows}
        for (s, op, i), (start, _) in when.items():
            if op == "F" and s > 0:
                assert start >= when[(s - 1, "F", i)][1] + costs.comm
            if op == "B" and s < 2:
                assert start >= when[(s + 1, "B", i)][1] + costs.comm
            if op == "W":
                assert start >= when[(s, "B", i)][1]


def test_unequal_costs_favour_zero_bubble():
    costs = Costs(f=1.0, b=1.0, w=1.0, comm=0.1)
    one_f = simulate(schedule("1f1b", 2, 32), costs)
    zb = simulate(schedule("zb-h1", 2, 32), costs)
    assert zb.makespan < one_f.makespan


def drop(sched, stage, action):
    actions = list(sched.actions)
    actions[stage] = tuple(a for a in actions[stage] if a != action)
    return replace(sched, actions=tuple(actions))


def test_missing_receive_is_a_deadlock():
    sched = drop(schedule("1f1b", 2, 8), 1, Action("RECV_ACT", 3, 0))
    with pytest.raises(DeadlockError) as err:
        simulate(sched)
    assert err.value.blocked == {0: "B3 waits for GRAD 3, which stage 1 never sends",
                                 1: "F3 consumes ACT 3 but posts no RECV_ACT for it"}


def test_missing_send_is_a_deadlock():
    sched = drop(schedule("gpipe", 2, 4), 1, Action("SEND_GRAD", 0, 0))
    with pytest.raises(DeadlockError) as err:
        simulate(sched)
    assert err.value.blocked == {0: "B0 waits for GRAD 0, which stage 1 never sends"}


def test_mispaired_order_is_rejected():
    sched = schedule("gpipe", 2, 3)
    stage1 = list(sched.actions[1])
    i, j = stage1.index(Action("RECV_ACT", 0, 0)), stage1.index(Action("RECV_ACT", 1, 0))
    stage1[i], stage1[j] = stage1[j], stage1[i]
    with pytest.raises(ValueError, match="order"):
        simulate(replace(sched, actions=(sched.actions[0], tuple(stage1))))


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        schedule("interleaved", 2, 4)
    with pytest.raises(ValueError, match="at least 1 micro-batch"):
        schedule("1f1b", 2, 0)


def test_measured_bubble_and_gantt_agree_with_the_simulator(tmp_path):
    """A trace laid out exactly as simulated measures the simulated bubble, and renders to a PNG."""
    from astrobio.parallel.executor import TraceEvent, measured_bubble, simulated_bubble
    from astrobio.parallel.gantt import render_gantt

    sched = schedule("zb-h1", 2, 8)
    sim = simulate(sched, Costs(f=1.0, b=1.5, w=0.5, comm=0.2))
    traces = [[TraceEvent(a.op, a.micro_batch, 10.0 + start, 10.0 + end) for a, start, end in rows]
              for rows in sim.timeline]
    assert measured_bubble(traces) == pytest.approx(sim.bubble)
    # measured per-action costs replayed without communication: less bubble than with it
    assert simulated_bubble(sched, traces) < sim.bubble
    path = tmp_path / "plots" / "pipeline.png"
    assert render_gantt(traces, path, simulated_bubble=sim.bubble) == pytest.approx(sim.bubble)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", KINDS)
def test_replaying_each_action_reproduces_a_trace_with_uneven_costs(kind):
    """Computations that vary from micro-batch to micro-batch: a trace laid out as the simulator lays it
    out measures the bubble that replaying its own durations gives back, while replaying each stage's
    mean cost misses the idle time that the variation causes in 1F1B and ZB-H1, which tie every
    forward of one stage to a backward of the other (GPipe's long runs of F or B absorb it)."""
    from astrobio.parallel.executor import TraceEvent, measured_bubble, simulated_bubble

    sched = schedule(kind, 2, 16)
    gen = random.Random(0)
    costs = {(s, op, i): gen.choice((0.5, 2.0)) for s in range(2) for op in "FBW" for i in range(16)}
    sim = simulate(sched, Costs(comm=0.1, per_action=costs))
    traces = [[TraceEvent(a.op, a.micro_batch, start, end) for a, start, end in rows] for rows in sim.timeline]
    assert measured_bubble(traces) == pytest.approx(sim.bubble)
    assert simulated_bubble(sched, traces, 0.1) == pytest.approx(sim.bubble)
    if kind != "gpipe":
        assert simulated_bubble(sched, traces, 0.1, per_action=False) < sim.bubble - 0.05
