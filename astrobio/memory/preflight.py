"""Preflight: refuse a configuration the planner predicts will not fit, and say what would.

``check_fits(plan)`` raises ``PlanError`` naming each device or host budget that is over, by how much,
its largest terms, and the changes that would fit (micro-batch, checkpointing, offload, schedule,
stages, master weights, accumulators), each of them planned, not guessed. ``preflight(config, force)``
plans and checks in one call, for the trainer (which exits with code 2 on ``PlanError``).
"""

from __future__ import annotations

from dataclasses import replace

from astrobio.memory.budget import MemoryBudget, Plan, PlanConfig
from astrobio.memory.planner import plan
from astrobio.memory.units import gib
from astrobio.model import ModelConfig


class PlanError(ValueError):
    """The configuration will not fit; the message says where, by how much, and what to change."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def candidate_changes(cfg: PlanConfig, model: ModelConfig) -> list[tuple[str, PlanConfig]]:
    """Changes worth trying, in the order a person would try them."""
    out = []
    if not cfg.offload:
        out.append(("enable CPU offload", replace(cfg, offload=True)))
    if not cfg.checkpointing:
        out.append(("enable activation checkpointing", replace(cfg, checkpointing=True)))
    if cfg.schedule != "1f1b":
        out.append(("use the 1F1B schedule", replace(cfg, schedule="1f1b")))
    if cfg.micro_batch_size > 1:
        half = cfg.micro_batch_size // 2
        out.append((f"micro-batch size {half} (and {cfg.micro_batches * 2} micro-batches)",
                    replace(cfg, micro_batch_size=half, micro_batches=cfg.micro_batches * 2)))
    if cfg.loss_chunks < 8:
        out.append(("compute the loss in 8 chunks", replace(cfg, loss_chunks=8)))
    if cfg.stages * 2 <= model.n_layers and cfg.layers_per_stage is None:
        out.append((f"{cfg.stages * 2} pipeline stages", replace(cfg, stages=cfg.stages * 2)))
    if cfg.offload and cfg.master_weights == "fp32":
        out.append(("bf16 master weights with stochastic rounding", replace(cfg, master_weights="bf16-sr")))
    if cfg.offload and cfg.accum_dtype == "fp32":
        out.append(("bf16 gradient accumulators", replace(cfg, accum_dtype="bf16")))
    return out


def suggestions(p: Plan) -> list[str]:
    """Single changes that fit; when none does, pairs of changes that do; failing that, the single
    changes that bring the worst stage down by at least a tenth."""
    worst_now = max(d.total for d in p.devices)
    singles = candidate_changes(p.config, p.model)
    planned = [(what, plan(changed)) for what, changed in singles]
    fitting = [(what, q) for what, q in planned if q.fits]
    tried: set[frozenset] = set()
    for what, changed in singles if not fitting else []:
        for what2, changed2 in candidate_changes(changed, p.model):
            if frozenset((what, what2)) in tried:
                continue
            tried.add(frozenset((what, what2)))
            q = plan(changed2)
            if q.fits:
                fitting.append((f"{what} and {what2}", q))
    shown = fitting[:4] or [(w, q) for w, q in planned if max(d.total for d in q.devices) < 0.9 * worst_now]
    return [f"  - {what}: largest stage {gib(max(d.total for d in q.devices))}, host {gib(q.host.total)} "
            f"({'fits' if q.fits else 'still over'})" for what, q in shown]


def over_message(b: MemoryBudget) -> str:
    top = sorted(b.terms, key=lambda t: -t.bytes)[:3]
    parts = ", ".join(f"{t.name} {gib(t.bytes)}" for t in top)
    return (f"{b.label} needs {gib(b.total)}, {gib(b.total - b.budget)} over its budget of {gib(b.budget)} "
            f"({b.budget / b.capacity:.0%} of {gib(b.capacity)}); largest terms: {parts}")


def check_fits(p: Plan) -> None:
    """Raises PlanError when a device or the host is over budget."""
    if p.fits:
        return
    over = [] if p.hardware.unified else [d for d in p.devices if not d.fits]
    if not p.host.fits:
        over.append(p.host)
    lines = ["this configuration will not fit:"] + [f"  {over_message(b)}" for b in over]
    tries = suggestions(p)
    if tries:
        lines += ["what would change it (each planned):"] + tries
    raise PlanError("\n".join(lines), p)


def preflight(cfg: PlanConfig, force: bool = False, log=print) -> Plan:
    """Plans ``cfg`` and refuses it (PlanError) unless it fits; ``force`` logs the refusal instead."""
    p = plan(cfg)
    try:
        check_fits(p)
    except PlanError as err:
        if not force:
            raise
        log(f"--force: running anyway although {err}")
    return p
