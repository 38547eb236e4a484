"""Memory: the planner (what a configuration will hold, before it runs) and the profiler (what it does
hold, while it runs)."""

from astrobio.memory.budget import SCHEDULES, MemoryBudget, Plan, PlanConfig, Term
from astrobio.memory.hardware import PROFILES, HardwareProfile, get_hardware
from astrobio.memory.planner import plan
from astrobio.memory.preflight import PlanError, check_fits, preflight
from astrobio.memory.profiler import MemoryProfiler, plot_memory
from astrobio.memory.report import format_plan
from astrobio.memory.units import parse_bytes

__all__ = ["PROFILES", "SCHEDULES", "HardwareProfile", "MemoryBudget", "MemoryProfiler", "Plan", "PlanConfig",
           "PlanError", "Term", "check_fits", "format_plan", "get_hardware", "parse_bytes", "plan", "plot_memory", "preflight"]
