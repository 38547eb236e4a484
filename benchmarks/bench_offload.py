"""Training-step time with the CPU offload engine (gradients accumulated on the device or on the host) vs
device-resident AdamW8bit vs torchao's CPU offload vs no optimizer at all.

    python benchmarks/bench_offload.py [--model tiny] [--micro-batches 8] [--json PATH]
    python benchmarks/bench_offload.py --model 13b --layers 4 ...      # 13B's shapes, cut to 4 layers

One model (a preset of astrobio.model; ``--model 13b --layers N`` keeps 13B's widths, vocabulary and
heads with N layers, as benchmarks/validate_memory_plan.py does), the same micro-batches for every
provider, all in one process:

    none            forward + backward of every micro-batch, gradients dropped: the floor (the GPU work)
    device          AdamW8bit stepping the parameters where they live (backend auto)
    offload-device  OffloadEngine, gradients summed on the device and sent to the host once per step
    offload-host    OffloadEngine, every micro-batch's gradients sent to the host and summed there
    torchao         torchao's CPUOffloadOptimizer around torch AdamW (fused): GPU only, when installed

It also times the standalone CPU step: AdamW8bit's C++ kernel over host copies of the same parameters,
the host work the engine has to hide. Per provider it reports the median step time, the device memory
it added at its peak (GPU), the exposed optimizer time (its step minus ``none``'s) as a fraction of the
standalone CPU step (target on a GPU: at most 25%; on a CPU-only machine the host work and the "device"
compete for the same cores, so the numbers are recorded, not judged) and the GPU busy fraction,
estimated as ``none``'s step over its step (the share of the step the forward and backward alone need).
For the offload providers it adds the engine's own phase timings (astrobio.optim.offload_timings, mean
per step) and the host accumulation throughput in GB/s.

Before timing, one step of each engine is validated: the two accumulation locations must give the same
master weights bit for bit (the same adds, no clipping), and both must match device-resident AdamW8bit
fed the same accumulated gradients: bit-exact on the CPU; on a GPU the device kernel may round in the
last bit, so the error is reported relative to the update and must stay under 0.1%.

On a GPU, 13B's shapes with 4 layers (1.2B parameters), accumulation 8 (estimated at 60-90 s on an
H200, most of it the host-accumulation provider's steps; not yet measured):

    python benchmarks/bench_offload.py --model 13b --layers 4 --seq-len 2048 --batch-size 1 \
        --micro-batches 8 --rounds 1 --block 3 --warmup 1 --json bench_offload_13b.json

On the CPU, a smoke test: ``--model tiny --micro-batches 4 --rounds 1 --block 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from astrobio.model import get_config
from astrobio.model.materialize import build_model_on
from astrobio.optim import AdamW8bit, OffloadEngine
from astrobio.optim.offload_timings import OffloadTimings

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LOCATIONS = ("device", "host")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="astrobio.model preset (default tiny)")
    parser.add_argument("--layers", type=int, help="keep the preset's shapes with this many layers")
    parser.add_argument("--micro-batches", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--rounds", type=int, default=4, help="turns per provider (median over all)")
    parser.add_argument("--block", type=int, default=3, help="steps per turn; block - 1 timed intervals")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=32.0, help="offload bucket size in MiB")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for name in ("micro_batches", "batch_size", "seq_len", "rounds", "block", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    return args


def setup() -> tuple[torch.device, torch.dtype]:
    """bf16 weights on a GPU (the 13B plan); fp32 on the CPU, where bf16 matmuls are slow."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def model_config(args: argparse.Namespace):
    config = get_config(args.model)
    return replace(config, n_layers=args.layers) if args.layers else config


def make_base_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = build_model_on(model_config(args), seed=0, device=device, dtype=dtype)
    model.gradient_checkpointing = args.checkpointing
    return model


def make_micro_batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
            for _ in range(args.micro_batches)]


def backward(model: torch.nn.Module, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    (loss * scale).backward()
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- providers: each runs one optimizer step over the micro-batches ----------------------------------------

@dataclass
class Provider:
    step: Callable[[], float]
    timings: list[OffloadTimings] = field(default_factory=list)  # the engine's, one per finished step


def step_none(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Provider:
    def step() -> float:
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        model.zero_grad(set_to_none=True)
        return loss.item()
    return Provider(step)


def step_device(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Provider:
    opt = AdamW8bit(model.parameters(), **HYPER)

    def step() -> float:
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return Provider(step)


def make_engine(model: torch.nn.Module, bucket_bytes: int, location: str) -> OffloadEngine:
    return OffloadEngine(model.parameters(), **HYPER, bucket_bytes=bucket_bytes, module=model,
                         grad_accum_location=location)


def step_offload(model: torch.nn.Module, micro_batches: list[torch.Tensor], bucket_bytes: int,
                 location: str) -> Provider:
    engine = make_engine(model, bucket_bytes, location)
    provider = Provider(lambda: 0.0)

    def step() -> float:
        engine.begin_step(len(micro_batches))
        if engine.last_timings is not None:
            provider.timings.append(engine.last_timings)
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        engine.end_step()
        return loss.item()
    provider.step = step
    return provider


def step_torchao(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Provider | str:
    """torchao's CPUOffloadOptimizer, or the reason it is skipped."""
    if not torch.cuda.is_available():
        return "skipped: torchao's CPUOffloadOptimizer needs a CUDA device"
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError as error:
        return f"skipped: torchao is not installed ({error})"
    opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, fused=True, **HYPER)

    def step() -> float:
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        opt.step()
        opt.zero_grad()
        return loss.item()
    return Provider(step)


def standalone_cpu_step(model: torch.nn.Module) -> Provider:
    """AdamW8bit's C++ kernel over fp32 host copies of the model's parameters: the host work the engine
    has to hide."""
    params = [torch.nn.Parameter(p.detach().float().cpu()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW8bit(params, **HYPER, backend="cpu")

    def step() -> float:
        opt.step()
        return 0.0
    return Provider(step)


def warm_up(make: Callable[[], Provider | str], args: argparse.Namespace,
            device: torch.device) -> tuple[Provider | str, float | None]:
    """Build a provider and run its warm-up steps; on a GPU also return the device memory it added at
    its peak (its model, gradients, optimizer state and activations), in GiB."""
    before = 0
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    provider = make()
    if isinstance(provider, str):
        return provider, None
    for _ in range(args.warmup):
        provider.step()
    sync(device)
    provider.timings.clear()
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if device.type == "cuda" else None
    return provider, peak


def time_interleaved(providers: dict[str, Provider], args: argparse.Namespace,
                     device: torch.device) -> dict[str, float]:
    """Median step time per provider. Providers take turns (so a change in machine load hits all alike),
    each turn ``--block`` steps back to back; the first interval of a turn is dropped, so each kept
    interval includes the wait, in the next forward, for the previous step's host work."""
    intervals: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(args.rounds):
        for name, provider in providers.items():
            sync(device)
            starts = []
            for _ in range(args.block + 1):
                starts.append(time.perf_counter())
                provider.step()
            sync(device)
            intervals[name] += [b - a for a, b in zip(starts[1:], starts[2:])]
    return {name: statistics.median(values) for name, values in intervals.items()}


def mean_timings(records: list[OffloadTimings]) -> dict:
    """The engine's phase timings, mean per step, and the host accumulation GB/s over all steps."""
    out = {}
    for f in fields(OffloadTimings):
        if f.name != "location":
            out[f.name] = statistics.fmean(getattr(r, f.name) for r in records)
    seconds = sum(r.host_accumulate_s for r in records)
    out["host_accumulate_gbps"] = sum(r.host_accumulate_bytes for r in records) / seconds / 1e9 if seconds else None
    return out


# -- validation -------------------------------------------------------------------------------------------

def engine_masters(model: torch.nn.Module, micro_batches: list[torch.Tensor], bucket_bytes: int,
                   location: str) -> list[torch.Tensor]:
    """The fp32 master weights after one step of an engine accumulating at ``location``."""
    engine = make_engine(model, bucket_bytes, location)
    engine.begin_step(len(micro_batches))
    for tokens in micro_batches:
        backward(model, tokens, 1.0 / len(micro_batches))
    engine.end_step()
    masters = [s["master"].clone() for s in engine.state_dict()["state"].values()]
    engine.close()
    return masters


def validate(base: torch.nn.Module, micro_batches: list[torch.Tensor], bucket_bytes: int,
             device: torch.device) -> float:
    """One step of the engine (each location) against device-resident AdamW8bit stepping fp32 copies of
    the weights with the same gradients, summed in fp32 micro-batch by micro-batch as the engine sums
    them. Returns the largest error relative to the largest update."""
    by_location = {where: engine_masters(copy.deepcopy(base), micro_batches, bucket_bytes, where)
                   for where in LOCATIONS}
    if not all(torch.equal(a, b) for a, b in zip(*by_location.values())):
        raise SystemExit("validation failed: device and host accumulation gave different master weights")
    resident = copy.deepcopy(base)
    masters = [torch.nn.Parameter(p.detach().float()) for p in resident.parameters()]
    initial = [m.detach().clone() for m in masters]
    sums = [torch.zeros_like(m) for m in masters]
    for tokens in micro_batches:
        backward(resident, tokens, 1.0 / len(micro_batches))
        for total, p in zip(sums, resident.parameters()):
            total.add_(p.grad)
        resident.zero_grad(set_to_none=True)
    for m, total in zip(masters, sums):
        m.grad = total
    AdamW8bit(masters, **HYPER).step()
    sync(device)
    update = max(float((m.detach() - q).abs().max()) for m, q in zip(masters, initial))
    error = max(float((m.detach().cpu() - h).abs().max()) for m, h in zip(masters, by_location["host"]))
    limit = 0.0 if device.type == "cpu" else 1e-3
    if error > limit * update:
        raise SystemExit(f"validation failed: offload differs from device-resident AdamW8bit by {error:.3e} "
                         f"(largest update {update:.3e}); not timing a wrong result")
    return error / update


# -- the run ----------------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    device, dtype = setup()
    bucket_bytes = int(args.bucket_mb * 2 ** 20)
    started = time.perf_counter()
    base = make_base_model(args, device, dtype)
    build_s = time.perf_counter() - started
    micro_batches = make_micro_batches(args, base.config.vocab_size, device)
    results = {"model": args.model, "layers": base.config.n_layers, "parameters": base.num_parameters(),
               "device": str(device), "dtype": str(dtype), "micro_batches": args.micro_batches,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "checkpointing": args.checkpointing,
               "threads": torch.get_num_threads(), "model_build_s": build_s,
               "weights_gib": sum(p.numel() * p.element_size() for p in base.parameters()) / 2 ** 30,
               "validation_relative_error": validate(base, micro_batches, bucket_bytes, device)}

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base)

    makers = {
        "none": lambda: step_none(fresh(), micro_batches),
        "device": lambda: step_device(fresh(), micro_batches),
        **{f"offload-{where}": (lambda where=where: step_offload(fresh(), micro_batches, bucket_bytes, where))
           for where in LOCATIONS},
        "torchao": lambda: step_torchao(fresh(), micro_batches),
        "cpu-step": lambda: standalone_cpu_step(base),
    }
    providers, rows = {}, {}
    for name, make in makers.items():
        provider, peak = warm_up(make, args, device)
        rows[name] = {"skipped": provider} if isinstance(provider, str) else {"peak_device_memory_gib": peak}
        if not isinstance(provider, str):
            providers[name] = provider
    for name, seconds in time_interleaved(providers, args, device).items():
        rows[name]["step_s"] = seconds
    cpu_step = rows.pop("cpu-step")["step_s"]
    floor = rows["none"]["step_s"]
    for name, row in rows.items():
        if "step_s" not in row:
            continue
        row["gpu_busy_fraction"] = floor / row["step_s"]
        if name != "none":
            row["exposed_optimizer_s"] = row["step_s"] - floor
            row["exposed_fraction_of_cpu_step"] = row["exposed_optimizer_s"] / cpu_step
        if providers[name].timings:
            row["engine"] = mean_timings(providers[name].timings)
    results.update(providers=rows, standalone_cpu_step_s=cpu_step, total_s=time.perf_counter() - started)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict) -> None:
    print(f"{results['model']} ({results['layers']} layers): {results['parameters'] / 1e6:.2f}M parameters "
          f"({results['weights_gib']:.3f} GiB, built in {results['model_build_s']:.1f} s) on {results['device']} "
          f"({results['dtype']}), {results['micro_batches']} micro-batches of {results['batch_size']}x"
          f"{results['seq_len']} tokens, {results['threads']} threads; validation error "
          f"{results['validation_relative_error']:.1e} of the update")
    print(f"{'provider':<15} {'step (ms)':>10} {'GPU busy':>9} {'exposed':>9} {'peak dev GiB':>13} "
          f"{'host acc GB/s':>14}")
    for name, row in results["providers"].items():
        if "skipped" in row:
            print(f"{name:<15} {row['skipped']}")
            continue
        memory = row["peak_device_memory_gib"]
        exposed = row.get("exposed_fraction_of_cpu_step")
        gbps = row.get("engine", {}).get("host_accumulate_gbps")
        print(f"{name:<15} {row['step_s'] * 1e3:>10.2f} {row['gpu_busy_fraction'] * 100:>8.0f}% "
              f"{'' if exposed is None else f'{exposed * 100:.0f}%':>9} "
              f"{'' if memory is None else f'{memory:.2f}':>13} {'' if gbps is None else f'{gbps:.1f}':>14}")
    print(f"standalone CPU step {results['standalone_cpu_step_s'] * 1e3:.2f} ms; exposed = step - none, as a "
          f"share of it; GPU busy = none / step")
    for name, row in results["providers"].items():
        if "engine" in row:
            phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["engine"].items()
                               if k.endswith("_s") and v)
            print(f"{name} engine phases per step (ms): {phases}")
    print(f"total {results['total_s']:.1f} s")


if __name__ == "__main__":
    main()
