"""Times every launch variant of the two GPU kernels of astrobio::adamw8bit_step, after checking each
one bit for bit against the specification, beside the device-to-device copy.

    python benchmarks/tune_adamw8bit_gpu.py [--params 512M] [--json PATH]

The variants (docs/GPU.md) compute the same bits and differ only in how the work is launched: CUDA
through the op ``astrobio::adamw8bit_cuda_launch_variant``, Triton through
``astrobio.kernels.adamw8bit.LAUNCH_VARIANT``. Every variant first steps a few small cases (8-bit
moments; fp32 and bf16 gradients; fp32 and stochastic-rounding bf16 masters; the bf16 copy; a size
that does not divide the 256-element block, and one compiled as the timed size is) and is compared
with astrobio/spec/adamw8bit.py run on the CPU; a variant that differs is reported and not timed.
Then each is timed at --params with fp32 gradients and fp32 masters (16.06 bytes per parameter
moved), the configuration of the issue's numbers, by CUDA events over --steps steps after --warmup
steps. The default variant of each backend is the one predicted best; the table says which was
measured best. About 30-60 s on one H200 (most of it Triton compiling 12 kernel specializations);
needs a CUDA GPU and a CUDA build. Exit status 1 if a variant is not bit-exact, 2 without a GPU.
"""

import argparse
import json
import statistics
import sys

import torch

from astrobio import ops
from astrobio.kernels import adamw8bit as triton_adamw8bit
from astrobio.spec import adamw8bit as R

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, grad_scale=1.0)
# name: (param dtype, grad dtype, bf16 copy); both use 8-bit moments
CONFIGS = {"fp32grad-fp32master": (torch.float32, torch.float32, False),
           "bf16grad-bf16sr-copy": (torch.bfloat16, torch.bfloat16, True)}
# 2^20 elements: the timed kernel's own specialization (Triton specializes sizes divisible by 16)
CHECKS = (("fp32grad-fp32master", 4097), ("fp32grad-fp32master", 1 << 20), ("bf16grad-bf16sr-copy", 4097))
CHECK_STEPS = 2
TIMED = "fp32grad-fp32master"
CUDA_VARIANTS = ("1 block/warp iteration, <= 64 registers, 4 blocks/SM",
                 "2 blocks/warp iteration, <= 128 registers, 2 blocks/SM",
                 "4 blocks/warp iteration, <= 255 registers, 1 block/SM")
BYTES_PER_PARAM = 4 + 4 + 1 + 1 + 4 + 1 + 1 + 2 * 2 * 4 / R.BLOCK_SIZE  # read p, g, m, v; write p, m, v; absmax


def parse_count(text: str) -> int:
    scale = {"K": 10 ** 3, "M": 2 ** 20, "G": 2 ** 30}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def make_state(n: int, config: str, device: str, seed: int) -> dict:
    param_dtype, grad_dtype, copy = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    state = {"param": torch.randn(n, generator=gen).to(param_dtype),
             "exp_avg": torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8),
             "exp_avg_sq": torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8),
             "absmax1": torch.rand(R.num_blocks(n), generator=gen) * 1e-2,
             "absmax2": torch.rand(R.num_blocks(n), generator=gen) * 1e-4,
             "param_bf16": torch.empty(n, dtype=torch.bfloat16) if copy else None}
    grads = [(torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)).to(grad_dtype)
             for _ in range(CHECK_STEPS)]
    state = {k: (v.to(device) if v is not None else None) for k, v in state.items()}
    return {"state": state, "grads": [g.to(device) for g in grads]}


def step_all(backend: str, case: dict, qmaps: tuple) -> dict:
    s = case["state"]
    for step, grad in enumerate(case["grads"], start=1):
        ops.adamw8bit_step(backend, s["param"], grad, s["exp_avg"], s["exp_avg_sq"], s["absmax1"], s["absmax2"],
                           *qmaps, s["param_bf16"], None, *HYPER.values(), step, 1234 + step)
    return {k: (v.cpu() if v is not None else None) for k, v in s.items()}


def reference_results() -> dict:
    qmaps = (R.dynamic_map(True), R.dynamic_map(False))
    return {(config, n): step_all("reference", make_state(n, config, "cpu", n), qmaps) for config, n in CHECKS}


def differences(backend: str, want: dict) -> list[str]:
    """The arrays (and how many bytes of each) that differ from the specification's."""
    qmaps = (R.dynamic_map(True).cuda(), R.dynamic_map(False).cuda())
    out = []
    for (config, n), expected in want.items():
        got = step_all(backend, make_state(n, config, "cuda", n), qmaps)
        for key, value in expected.items():
            if value is not None:
                bad = int((got[key].view(torch.uint8) != value.view(torch.uint8)).sum())
                if bad:
                    out.append(f"{config} n={n} {key}: {bad} bytes")
    return out


def event_seconds(fn, warmup: int, steps: int) -> float:
    """Median seconds of fn() by CUDA events, one pair per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def timed_step(backend: str, n: int):
    param = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda") * 1e-2
    m = torch.zeros(n, dtype=torch.uint8, device="cuda")
    v = torch.zeros(n, dtype=torch.uint8, device="cuda")
    a1 = torch.zeros(R.num_blocks(n), device="cuda")
    a2 = torch.zeros(R.num_blocks(n), device="cuda")
    qmaps = (R.dynamic_map(True).cuda(), R.dynamic_map(False).cuda())
    count = [0]

    def step() -> None:
        count[0] += 1
        ops.adamw8bit_step(backend, param, grad, m, v, a1, a2, *qmaps, None, None, *HYPER.values(), count[0],
                           count[0])
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="512M", help="parameters of the timed step (default 512M = 2^29)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_adamw8bit_gpu: needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    n = parse_count(args.params)
    want = reference_results()

    x = torch.empty(n, device="cuda")
    y = torch.empty_like(x)
    copy_gbs = 2 * 4 * n / event_seconds(lambda: y.copy_(x), 2, args.steps) / 1e9
    del x, y
    print(f"{torch.cuda.get_device_name()}: device-to-device copy of {n / 1e6:.0f}M floats {copy_gbs:,.0f} GB/s "
          f"(read + write); a step moves {BYTES_PER_PARAM:.2f} B/param, so the copy's rate is "
          f"{copy_gbs / BYTES_PER_PARAM:,.1f} Gparam/s")

    variants = [("cuda", k, CUDA_VARIANTS[k]) for k in range(len(CUDA_VARIANTS))]
    variants += [("triton", k, f"{rows} blocks/program, {warps} warps")
                 for k, (rows, warps) in enumerate(triton_adamw8bit.LAUNCH_VARIANTS)]
    defaults = {"cuda": torch.ops.astrobio.adamw8bit_cuda_launch_variant(-1),
                "triton": triton_adamw8bit.LAUNCH_VARIANT}
    rows = []
    for backend, k, what in variants:
        if backend == "cuda":
            torch.ops.astrobio.adamw8bit_cuda_launch_variant(k)
        else:
            triton_adamw8bit.LAUNCH_VARIANT = k
        bad = differences(backend, want)
        row = {"backend": backend, "variant": k, "what": what, "default": k == defaults[backend],
               "bit_exact": not bad, "differences": bad}
        if not bad:
            step = timed_step(backend, n)
            seconds = event_seconds(step, args.warmup, args.steps)
            del step
            row.update(ms=seconds * 1e3, gparams=n / seconds / 1e9, gbs=n * BYTES_PER_PARAM / seconds / 1e9)
            row["percent_of_copy"] = 100 * row["gbs"] / copy_gbs
        rows.append(row)
        torch.cuda.empty_cache()
        timing = (f"{row['ms']:8.3f} ms {row['gparams']:7.1f} Gparam/s {row['gbs']:7,.0f} GB/s "
                  f"{row['percent_of_copy']:5.1f}% of copy" if not bad else "NOT BIT-EXACT: " + "; ".join(bad))
        print(f"{backend:6} variant {k}{' (default)' if row['default'] else '          '} {what:55} {timing}",
              flush=True)
    torch.ops.astrobio.adamw8bit_cuda_launch_variant(defaults["cuda"])
    triton_adamw8bit.LAUNCH_VARIANT = defaults["triton"]

    best = {}
    for backend in ("cuda", "triton"):
        timed = [r for r in rows if r["backend"] == backend and r["bit_exact"]]
        if timed:
            best[backend] = max(timed, key=lambda r: r["gparams"])
            b = best[backend]
            print(f"best {backend}: variant {b['variant']} ({b['what']}), {b['percent_of_copy']:.1f}% of the copy; "
                  f"the default is variant {defaults[backend]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "params": n, "bytes_per_param": BYTES_PER_PARAM,
                       "copy_gbs": copy_gbs, "rows": rows,
                       "best": {k: v["variant"] for k, v in best.items()}, "defaults": defaults}, f, indent=1)
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
