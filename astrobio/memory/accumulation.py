"""Where the offload engine sums gradients over micro-batches: on the device or on the host.

With host accumulation every micro-batch's gradients cross the host link and are added into host
memory: per step ``micro_batches x 2`` bytes per parameter over the link and ``micro_batches x (2 + 2 x
accumulator bytes)`` through host memory. With device accumulation they are added on the device and
cross the link once per step, but the device holds one accumulator per parameter of its stage (4 bytes
with fp32 accumulators, 2 with bf16). Device accumulation is never slower, so ``auto`` takes it wherever
those accumulators fit beside the weights and activations the plan already counts, under the device
budget; on hardware whose "device" is host memory (CPU training) it would only add a second copy of the
accumulators, so ``auto`` takes the host there.

    plan = astrobio.memory.plan(config)
    choice = choose_accumulation(plan, "auto")       # or "device" / "host" from a flag
    print(choice.line())                              # for the preflight and the summary
    OffloadEngine(..., grad_accum_location=choice.location)
"""

from __future__ import annotations

from dataclasses import dataclass

from astrobio.memory.budget import Plan

LOCATIONS = ("auto", "device", "host")
GIB = 2 ** 30


@dataclass(frozen=True)
class AccumulationChoice:
    """``location``: "device" or "host". ``requested``: what was asked ("auto", "device", "host").
    ``stage_totals`` / ``stage_budgets``: each stage's planned device bytes with the device accumulators
    added, and its budget. ``reason``: one sentence saying why."""

    location: str
    requested: str
    stage_totals: tuple[int, ...]
    stage_budgets: tuple[int, ...]
    reason: str

    @property
    def fits_on_device(self) -> bool:
        return all(t <= b for t, b in zip(self.stage_totals, self.stage_budgets))

    def line(self) -> str:
        return f"gradient accumulation: {self.location} ({self.requested}): {self.reason}"

    def to_dict(self) -> dict:
        return {"location": self.location, "requested": self.requested, "stage_totals": list(self.stage_totals),
                "stage_budgets": list(self.stage_budgets), "fits_on_device": self.fits_on_device,
                "reason": self.reason}


def accumulator_bytes(plan: Plan, stage: int) -> int:
    """Device bytes of stage ``stage``'s gradient accumulators (one per parameter, accumulation dtype)."""
    per_param = 4 if plan.config.accum_dtype == "fp32" else 2
    return plan.stage_params[stage] * per_param


def choose_accumulation(plan: Plan, requested: str = "auto") -> AccumulationChoice:
    """The accumulation location for an offloaded run planned by ``plan``; an explicit "device" or "host"
    is kept (the reason then says whether the device accumulators fit)."""
    if requested not in LOCATIONS:
        raise ValueError(f"grad accumulation location {requested!r}; choose one of {', '.join(LOCATIONS)}")
    if not plan.config.offload:
        raise ValueError("the gradient accumulation location applies to CPU offload only; without offload the "
                         "gradients accumulate in the parameters' .grad on the device")
    totals = tuple(d.total + accumulator_bytes(plan, s) for s, d in enumerate(plan.devices))
    budgets = tuple(d.budget for d in plan.devices)
    worst = max(range(len(totals)), key=lambda s: totals[s] - budgets[s])
    fits = totals[worst] <= budgets[worst]
    sizes = (f"stage {worst} would hold {totals[worst] / GIB:.2f} GiB with its "
             f"{accumulator_bytes(plan, worst) / GIB:.2f} GiB of {plan.config.accum_dtype} accumulators, "
             f"budget {budgets[worst] / GIB:.2f} GiB")
    if requested != "auto":
        verdict = "fits" if fits else "does not fit"
        reason = f"as requested ({sizes}: {verdict})" if requested == "device" else "as requested"
        return AccumulationChoice(requested, requested, totals, budgets, reason)
    if plan.hardware.unified:
        reason = (f"the {plan.hardware.name} device is host memory: device accumulators would be a second copy "
                  f"of the host's")
        return AccumulationChoice("host", requested, totals, budgets, reason)
    if fits:
        return AccumulationChoice("device", requested, totals, budgets, f"{sizes}; one transfer per step")
    return AccumulationChoice("host", requested, totals, budgets,
                              f"{sizes}; every micro-batch's gradients go to the host")
