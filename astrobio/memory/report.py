"""The plan as a table a person reads (the planner CLI's output and docs/MEMORY.md's table)."""

from __future__ import annotations

from astrobio.memory.budget import MemoryBudget, Plan
from astrobio.memory.planner import pinned_bytes
from astrobio.memory.units import GIB


def size(n_bytes: int) -> str:
    if n_bytes == 0:
        return "-"
    if n_bytes < GIB // 10:
        return f"{n_bytes / 2 ** 20:.1f} MiB"
    return f"{n_bytes / GIB:.2f} GiB"


def count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def verdict(b: MemoryBudget) -> str:
    return "fits" if b.fits else f"DOES NOT FIT ({size(b.total - b.budget)} over)"


def replicas(c) -> str:
    if c.data_parallel == 1:
        return ""
    return (f" x {c.data_parallel} data-parallel replicas ({c.machine_ranks} ranks per machine, "
            f"{c.stages * c.data_parallel // c.machine_ranks} machine(s))")


def header(p: Plan) -> list[str]:
    c, m = p.config, p.model
    offload = (f"CPU offload on (master {c.master_weights}, {c.accum_dtype} gradient accumulators on the "
               f"{c.grad_accum_location}, {c.optimizer})"
               if c.offload else f"no offload ({c.optimizer} on the device)")
    return [f"model {c.model if isinstance(c.model, str) else 'custom'}: {count(p.total_params)} parameters "
            f"({p.total_params:,}, meta-device count), {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}",
            f"run: {c.stages} stage(s){replicas(c)} on {p.hardware.name}, seq {c.seq_len}, micro-batch {c.micro_batch_size} x "
            f"{c.micro_batches} per step, {c.schedule}, checkpointing {'on' if c.checkpointing else 'off'}, {offload}"]


def device_table(p: Plan) -> list[str]:
    names: list[str] = []
    for d in p.devices:
        names += [t.name for t in d.terms if t.name not in names]
    first = p.devices[0]
    cols = [d.label for d in p.devices]
    width = max(len(n) for n in names + ["parameters"]) + 2
    title = ("device memory per stage (the devices are host memory: see the host budget)" if p.hardware.unified
             else f"device memory per stage (budget {size(first.budget)} = "
                  f"{first.budget / first.capacity:.0%} of {size(first.capacity)})")
    lines = [title, " " * width + "".join(f"{c:>14}" for c in cols)]
    lines.append("layers".ljust(width) + "".join(f"{f'{d.layers[0]}-{d.layers[1]}':>14}" for d in p.devices))
    lines.append("parameters".ljust(width) + "".join(f"{count(d.params):>14}" for d in p.devices))
    for name in names:
        values = [next((t.bytes for t in d.terms if t.name == name), 0) for d in p.devices]
        lines.append(name.ljust(width) + "".join(f"{size(v):>14}" for v in values))
    lines.append("total at peak".ljust(width) + "".join(f"{size(d.total):>14}" for d in p.devices))
    if not p.hardware.unified:
        lines.append("verdict".ljust(width) + "".join(f"{'fits' if d.fits else 'OVER':>14}" for d in p.devices))
    for d in p.devices:
        acts = next(t for t in d.terms if t.name == "activations")
        lines.append(f"  {d.label}: peak at the {d.moment}; activations: {acts.detail}")
    return lines


def host_table(p: Plan) -> list[str]:
    h = p.host
    width = max([len(t.name) for t in h.terms] + [10]) + 2
    lines = [f"host memory (budget {size(h.budget)} = {h.budget / h.capacity:.0%} of {size(h.capacity)})"]
    lines += [f"{t.name.ljust(width)}{size(t.bytes):>12}   {t.detail}" for t in h.terms]
    pinned = pinned_bytes(p)
    extra = f"; {size(pinned)} of it pinned" if pinned else ""
    lines.append(f"{'total'.ljust(width)}{size(h.total):>12}   {verdict(h)}{extra}")
    return lines


def timing_table(p: Plan) -> list[str]:
    t, hw = p.timing, p.hardware
    lines = [f"step estimate ({hw.name}: {hw.matrix_tflops:g} TFLOP/s matrix peak at MFU {t.mfu:.0%}, host link "
             f"{hw.host_link:g} GB/s, host memory {hw.host_memory_bandwidth:g} GB/s)",
             f"  compute   {t.compute_s:9.2f} s   {t.flops_per_step:.3g} FLOP per step"
             f"{' incl. recompute' if p.config.checkpointing else ''}, pipeline bubble {t.bubble_fraction:.1%}"]
    if p.config.offload:
        if p.config.grad_accum_location == "device":
            lines += [f"  link      {t.link_s:9.2f} s   the device's gradient sums out and weights in, once per step"]
        else:
            lines += [f"  link      {t.link_s:9.2f} s   gradients out every micro-batch, weights in once per step",
                      f"  CPU       {t.cpu_accumulate_s:9.2f} s   adding {p.config.micro_batches} micro-batches' "
                      f"gradients into the accumulators"]
    lines += [f"  optimizer {t.optimizer_s:9.2f} s   {t.exposed_optimizer_s:.2f} s of it exposed",
              f"  step      {t.step_s:9.2f} s   {t.tokens_per_step} tokens -> {t.tokens_per_s:,.0f} tokens/s; "
              f"critical path: {t.critical_path}"]
    return lines


def format_plan(p: Plan) -> str:
    lines = header(p) + [""] + device_table(p) + [""] + host_table(p) + [""] + timing_table(p) + [""]
    lines += [f"note: {n}" for n in p.notes]
    worst = max(d.total for d in p.devices)
    where = "host" if p.hardware.unified else f"at most {size(worst)} per device"
    lines.append(f"verdict: {'FITS' if p.fits else 'DOES NOT FIT'}: {where}, host {size(p.host.total)}, "
                 f"~{p.timing.tokens_per_s:,.0f} tokens/s")
    return "\n".join(lines)
