"""Pipeline parallelism: schedules as data, a simulator, an executor over torch.distributed
point-to-point, a launcher with fault handling, and a Gantt chart of measured traces (docs/PIPELINE.md)."""

from astrobio.parallel.executor import (StepResult, TraceEvent, gather_traces, measured_bubble, run_pipeline_step,
                                        simulated_bubble)
from astrobio.parallel.launch import FaultGuard, LaunchError, PeerFailure, RankContext, launch
from astrobio.parallel.schedules import KINDS, Action, Schedule, schedule, theoretical_bubble
from astrobio.parallel.simulate import Costs, DeadlockError, simulate

__all__ = ["KINDS", "Action", "Costs", "DeadlockError", "FaultGuard", "LaunchError", "PeerFailure", "RankContext",
           "Schedule", "StepResult", "TraceEvent", "gather_traces", "launch", "measured_bubble", "run_pipeline_step",
           "schedule", "simulate", "simulated_bubble", "theoretical_bubble"]
