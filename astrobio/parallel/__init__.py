"""Pipeline parallelism: schedules as data, a simulator, an executor over torch.distributed
point-to-point (its transport, ZB-H1's weight pass, measured traces), a launcher with fault handling,
and a Gantt chart of measured traces (docs/PIPELINE.md)."""

from astrobio.parallel.executor import StepResult, run_pipeline_step
from astrobio.parallel.faults import FaultGuard, PeerFailure
from astrobio.parallel.launch import LaunchError, RankContext, launch
from astrobio.parallel.schedules import KINDS, Action, Schedule, schedule, theoretical_bubble
from astrobio.parallel.simulate import Costs, DeadlockError, simulate
from astrobio.parallel.trace import TraceEvent, gather_traces, measured_bubble, simulated_bubble
from astrobio.parallel.transport import p2p_latency

__all__ = ["KINDS", "Action", "Costs", "DeadlockError", "FaultGuard", "LaunchError", "PeerFailure", "RankContext",
           "Schedule", "StepResult", "TraceEvent", "gather_traces", "launch", "measured_bubble", "p2p_latency",
           "run_pipeline_step", "schedule", "simulate", "simulated_bubble", "theoretical_bubble"]
