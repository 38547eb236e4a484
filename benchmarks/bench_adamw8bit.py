"""One optimizer step over N parameters: astrobio's fused 8-bit AdamW against the optimizers people use.

    python benchmarks/bench_adamw8bit.py [--params 256M] [--device cpu|cuda] [--steps 5]
                                         [--grad-dtype fp32|bf16] [--json PATH] [--providers a,b]

Providers form a registry; each says which device it runs on and how many bytes per parameter a single
pass of its step must move (its own streams: read weights, gradient, m, v; write weights, m, v; plus one
more read of the gradient where the step scans it for non-finite values). Every provider is timed through
its optimizer's public ``step()`` with default settings, astrobio too (``AdamW8bit.step()``, which checks
the gradients for inf/NaN); two extra astrobio rows show ``step(found_inf=False)`` (the caller already
knows, as the trainer does from its clip norm: nothing is scanned) and the bare op (``op only``):

    cpu   astrobio, astrobio step(found_inf=False), astrobio op only, torch AdamW fused,
          torch AdamW foreach, DeepSpeed CPUAdam, bitsandbytes AdamW8bit, torchao AdamW8bit
    cuda  astrobio CUDA, astrobio CUDA step(found_inf=False), astrobio CUDA op only, the same three for
          astrobio Triton, torch AdamW fused, bitsandbytes AdamW8bit, torchao AdamW8bit

A provider whose package is missing is reported as skipped (nothing is installed by this script).

Validation first, on a small problem (65,792 parameters, 5 steps with fresh gradients): astrobio must be
bit-exact with the specification (astrobio/spec/adamw8bit.py); every provider's total weight update is
compared with fp32 AdamW (the specification's update with fp32 moments): relative error below 1e-4 for
fp32-state optimizers, below 0.1 for 8-bit ones (quantization noise). Then, on the same big tensors for
every provider (one fp32 weight tensor copied per provider, one shared gradient), the median of --steps
steps after warm-up. The roofline is the in-place read-modify-write bandwidth with the same stream count
(4 reads, 3 writes), measured by the extension's probe on arrays of the same size before and after the
providers, the higher of the two (GPU: a device-to-device copy). Percent of roofline = bytes moved per
second / that bandwidth. CPU ns/param is the process's CPU time (all threads) per parameter and step: on
a machine shared with other work it is the steadier number.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from astrobio import ops
from astrobio.optim import AdamW8bit
from astrobio.spec import adamw8bit as R

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
VALIDATION_NUMEL = 257 * 256
VALIDATION_STEPS = 5
ABSMAX_BYTES = 2 * 2 * 4 / R.BLOCK_SIZE  # absmax of m and v, read and written, per parameter


@dataclass
class Provider:
    """One optimizer implementation: how to build a step function over (param, grad) and its traffic."""

    name: str
    device: str
    eight_bit: bool
    needs: tuple[str, ...]                      # importable modules it needs
    build: Callable[[torch.Tensor, torch.Tensor], Callable[[], None]]
    uses_bf16_grad: bool = False                # takes the bf16 gradient when --grad-dtype bf16
    available: Callable[[], str | None] = field(default=lambda: None)  # None, or why it cannot run
    note: str = ""
    scans_grad: bool = False                    # reads the gradient once more (the non-finite check)

    def bytes_per_param(self, grad_bytes: int) -> float:
        scan = grad_bytes if self.scans_grad else 0
        if self.eight_bit:
            return 4 + grad_bytes + 1 + 1 + 4 + 1 + 1 + ABSMAX_BYTES + scan
        return 4 + grad_bytes + 4 + 4 + 4 + 4 + 4 + scan


# --- step functions ----------------------------------------------------------------------------------

def astrobio_optimizer_step(backend: str, **step_kwargs) -> Callable:
    """AdamW8bit(backend=...).step(**step_kwargs): the public API with default settings."""
    def build(param: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        p = torch.nn.Parameter(param, requires_grad=True)
        p.grad = grad
        opt = AdamW8bit([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                        weight_decay=HYPER["weight_decay"], backend=backend)
        return lambda: opt.step(**step_kwargs)
    return build


def astrobio_op_step(backend: str) -> Callable:
    """The op ``astrobio.ops.adamw8bit_step`` alone, with state kept here (no optimizer, no scan)."""
    def build(param: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        n, device = param.numel(), param.device
        q1, q2 = R.dynamic_map(True).to(device), R.dynamic_map(False).to(device)
        m = torch.full((n,), int((R.dynamic_map(True) == 0).nonzero()[0]), dtype=torch.uint8, device=device)
        v = torch.zeros(n, dtype=torch.uint8, device=device)
        a1 = torch.zeros(R.num_blocks(n), device=device)
        a2 = torch.zeros(R.num_blocks(n), device=device)
        count = [0]

        def step() -> None:
            count[0] += 1
            ops.adamw8bit_step(backend, param, grad, m, v, a1, a2, q1, q2, None, None, HYPER["lr"], HYPER["beta1"],
                               HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], 1.0, count[0], count[0])
        step.state = (m, v, a1, a2)
        return step
    return build


def torch_optimizer_step(make: Callable) -> Callable:
    def build(param: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        p = torch.nn.Parameter(param, requires_grad=True)
        p.grad = grad
        opt = make([p])
        return opt.step
    return build


def torch_adamw(**kw) -> Callable:
    return torch_optimizer_step(lambda ps: torch.optim.AdamW(
        ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], **kw))


def deepspeed_cpu_adam(ps):
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return DeepSpeedCPUAdam(ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], adamw_mode=True)


def bitsandbytes_adamw8bit(ps):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                               weight_decay=HYPER["weight_decay"])


def torchao_adamw8bit(ps):
    from torchao.optim import AdamW8bit
    return AdamW8bit(ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                     weight_decay=HYPER["weight_decay"])


def needs_gpu() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU visible"


def needs_astrobio(backend: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if backend == "cpu":
            return None if ops.has_cpu_kernel() else f"astrobio._C did not load: {ops.extension_error()}"
        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
        if backend == "cuda" and not ops.has_cuda_kernel():
            return "astrobio._C was built without CUDA kernels"
        if backend == "triton" and not ops.has_triton():
            return "triton is not installed"
        return None
    return check


def astrobio_providers(device: str, label: str, backend: str) -> list[Provider]:
    """The public step with defaults, the step told found_inf=False, and the bare op."""
    check = needs_astrobio(backend)
    return [
        Provider(label, device, True, (), astrobio_optimizer_step(backend), available=check, scans_grad=True,
                 note="step() with defaults: checks the gradients for inf/NaN"),
        Provider(f"{label} step(found_inf=False)", device, True, (),
                 astrobio_optimizer_step(backend, found_inf=False), available=check,
                 note="the caller knows the gradients are finite: nothing is scanned"),
        Provider(f"{label} op only", device, True, (), astrobio_op_step(backend), uses_bf16_grad=True,
                 available=check, note="astrobio.ops.adamw8bit_step alone, not the public API"),
    ]


PROVIDERS = [
    *astrobio_providers("cpu", "astrobio", "cpu"),
    Provider("torch AdamW fused", "cpu", False, (), torch_adamw(fused=True)),
    Provider("torch AdamW foreach", "cpu", False, (), torch_adamw(foreach=True),
             note="several passes over memory; bytes counted for one"),
    Provider("DeepSpeed CPUAdam", "cpu", False, ("deepspeed",), torch_optimizer_step(deepspeed_cpu_adam)),
    Provider("bitsandbytes AdamW8bit", "cpu", True, ("bitsandbytes",), torch_optimizer_step(bitsandbytes_adamw8bit)),
    Provider("torchao AdamW8bit", "cpu", True, ("torchao",), torch_optimizer_step(torchao_adamw8bit),
             note="torch.compile'd step (compiles on first use)"),
    *astrobio_providers("cuda", "astrobio CUDA", "cuda"),
    *astrobio_providers("cuda", "astrobio Triton", "triton"),
    Provider("torch AdamW fused", "cuda", False, (), torch_adamw(fused=True), available=needs_gpu),
    Provider("bitsandbytes AdamW8bit", "cuda", True, ("bitsandbytes",), torch_optimizer_step(bitsandbytes_adamw8bit),
             available=needs_gpu),
    Provider("torchao AdamW8bit", "cuda", True, ("torchao",), torch_optimizer_step(torchao_adamw8bit),
             available=needs_gpu),
]


# --- validation ----------------------------------------------------------------------------------------

def validation_grads(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(VALIDATION_NUMEL, generator=gen) * 1e-2).to(device=device, dtype=dtype)
            for _ in range(VALIDATION_STEPS)]


def reference_weights(p0: torch.Tensor, grads: list[torch.Tensor], eight_bit: bool) -> torch.Tensor:
    """The specification's weights after the validation steps (8-bit moments, or fp32 moments)."""
    n = p0.numel()
    p = p0.clone()
    if eight_bit:
        m = torch.full((n,), int((R.dynamic_map(True) == 0).nonzero()[0]), dtype=torch.uint8)
        v = torch.zeros(n, dtype=torch.uint8)
    else:
        m, v = torch.zeros(n), torch.zeros(n)
    a1, a2 = torch.zeros(R.num_blocks(n)), torch.zeros(R.num_blocks(n))
    for t, g in enumerate(grads, start=1):
        R.adamw8bit_step(p, g.cpu(), m, v, a1, a2, R.dynamic_map(True), R.dynamic_map(False), None, None,
                         HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"],
                         1.0, t, t)
    return p


def validate(provider: Provider, device: torch.device, grad_dtype: torch.dtype) -> tuple[bool, str]:
    """Runs the validation steps; returns (passed, what was checked)."""
    dtype = grad_dtype if provider.uses_bf16_grad else torch.float32
    grads = validation_grads(device, dtype)
    p0 = torch.randn(VALIDATION_NUMEL, generator=torch.Generator().manual_seed(0))
    param = p0.to(device, copy=True)
    grad = torch.empty_like(grads[0])
    step = provider.build(param, grad)
    for g in grads:
        grad.copy_(g)
        step()
    got = param.detach().float().cpu()
    fp32 = reference_weights(p0, grads, eight_bit=False)
    rel = float((got - p0 - (fp32 - p0)).norm() / (fp32 - p0).norm())
    limit = 0.1 if provider.eight_bit else 1e-4
    detail = f"update vs fp32 AdamW: rel. error {rel:.1e} (limit {limit:g})"
    ok = rel < limit
    if provider.name.startswith("astrobio"):
        spec = reference_weights(p0, grads, eight_bit=True)
        differ = int((got != spec).sum())
        ok = ok and (differ == 0 or device.type == "cuda")
        detail += f"; vs the 8-bit specification: {differ} of {got.numel()} weights differ"
    return ok, detail


# --- timing and roofline -------------------------------------------------------------------------------

def parse_count(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_step_seconds(step: Callable[[], None], device: torch.device, warmup: int,
                        steps: int) -> tuple[float, float]:
    """Median wall seconds of one step, and median CPU seconds (all threads of this process) of one step."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def roofline_gbs(device: torch.device, n: int) -> tuple[float, str]:
    """In-place read-modify-write bandwidth with the optimizers' stream count (4 reads, 3 writes)."""
    if device.type == "cpu":
        from astrobio import _C
        gbs = _C.inplace_rmw_bandwidth(n, 4, 3, 3)
        return gbs, f"in-place RMW probe, 4 reads + 3 writes of {n / 1e6:.0f}M floats each (best of 3)"
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = median_step_seconds(lambda: y.copy_(x), device, 1, 5)[0]
    return 2 * 4 * n / seconds / 1e9, f"device-to-device copy of {n / 1e6:.0f}M floats (read + write)"


def run_provider(provider: Provider, args, device, base, grads, roofline) -> dict:
    row = {"provider": provider.name, "device": device.type, "note": provider.note}
    missing = [m for m in provider.needs if importlib.util.find_spec(m) is None]
    reason = f"{', '.join(missing)} not installed" if missing else provider.available()
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        ok, detail = validate(provider, device, args.grad_dtype)
        row["validation"] = detail
        if not ok:
            return {**row, "status": "failed validation"}
        use_bf16 = provider.uses_bf16_grad and args.grad_dtype == torch.bfloat16
        grad = grads["bf16" if use_bf16 else "fp32"]
        param = base.clone()
        step = provider.build(param, grad)
        seconds, cpu_seconds = median_step_seconds(step, device, args.warmup, args.steps)
    except Exception as error:  # a provider that breaks is reported, not fatal to the others
        return {**row, "status": "error", "reason": f"{type(error).__name__}: {error}"[:300]}
    n = base.numel()
    bytes_pp = provider.bytes_per_param(2 if use_bf16 else 4)
    gbs = n * bytes_pp / seconds / 1e9
    return {**row, "status": "ok", "seconds": seconds, "mparams_per_s": n / seconds / 1e6,
            "cpu_ns_per_param": 1e9 * cpu_seconds / n,
            "grad_dtype": "bf16" if use_bf16 else "fp32", "bytes_per_param": bytes_pp, "gb_per_s": gbs,
            "roofline_pct": 100 * gbs / roofline}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    simd = ""
    if ops.has_cpu_kernel():
        from astrobio import _C
        simd = f", astrobio path {_C.simd_path()}"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}{simd}{gpu}"


HEADER = (f"{'provider':<38} {'Mparam/s':>9} {'ms/step':>9} {'CPU ns/param':>12} {'B/param':>8} {'GB/s':>7} "
          f"{'roofline':>9}  validation")


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['provider']:<38} {r['status']}: {r.get('reason') or r.get('validation', '')}"
    return (f"{r['provider']:<38} {r['mparams_per_s']:>9.0f} {1e3 * r['seconds']:>9.1f} "
            f"{r['cpu_ns_per_param']:>12.2f} {r['bytes_per_param']:>8.2f} "
            f"{r['gb_per_s']:>7.1f} {r['roofline_pct']:>8.0f}%  {r['validation']}")


PEERS = ("torch AdamW fused", "DeepSpeed CPUAdam")


def speedup_lines(rows: list[dict]) -> list[str]:
    """Each astrobio row against the fastest peer of the same run (torch AdamW fused, DeepSpeed CPUAdam)."""
    done = {r["provider"]: r for r in rows if r["status"] == "ok"}
    peers = [done[name] for name in PEERS if name in done]
    if not peers:
        return []
    best = max(peers, key=lambda r: r["mparams_per_s"])
    return [f"{name}: {r['mparams_per_s'] / best['mparams_per_s']:.2f}x {best['provider']}"
            for name, r in done.items() if name.startswith("astrobio")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="256M", help="parameters per step, e.g. 256M, 32M, 1000000")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="gradient dtype for the providers that accept bf16 gradients with fp32 weights")
    parser.add_argument("--providers", help="comma-separated subset of provider names (default: all)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.grad_dtype = torch.bfloat16 if args.grad_dtype == "bf16" else torch.float32
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible")
    n = parse_count(args.params)
    roofline, how = roofline_gbs(device, n)  # measured again at the end; the higher one is reported
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen).to(device)
    grads = {"fp32": (torch.randn(n, generator=gen) * 1e-2).to(device)}
    if args.grad_dtype == torch.bfloat16:
        grads["bf16"] = grads["fp32"].to(torch.bfloat16)
    wanted = None if not args.providers else {s.strip() for s in args.providers.split(",")}
    unknown = (wanted or set()) - {p.name for p in PROVIDERS}
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {sorted({p.name for p in PROVIDERS})}")
    print(f"{n:,} parameters, {machine()}\nroofline: {roofline:.1f} GB/s ({how})\n{HEADER}", flush=True)
    rows = []
    for provider in PROVIDERS:
        if provider.device != device.type or (wanted and provider.name not in wanted):
            continue
        rows.append(run_provider(provider, args, device, base, grads, roofline))
        gc.collect()
        print(format_row(rows[-1]), flush=True)
    del base, grads
    gc.collect()
    again = roofline_gbs(device, n)[0]
    if again > roofline:
        for r in rows:
            if r["status"] == "ok":
                r["roofline_pct"] *= roofline / again
        roofline = again
    print(f"\nroofline measured before and after the providers; reported: {roofline:.1f} GB/s\n{HEADER}")
    for r in rows:
        print(format_row(r))
    lines = speedup_lines(rows)
    if lines:
        print("\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n, "device": device.type, "machine": machine(), "roofline_gb_per_s": roofline,
                       "roofline": how, "steps": args.steps, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
