"""Training-step time with the CPU offload engine vs device-resident AdamW8bit vs no optimizer at all.

    python benchmarks/bench_offload.py [--model tiny] [--micro-batches 4] [--json PATH]

One model (a preset of astrobio.model), the same micro-batches for every provider, all in one process:

    none      forward + backward of every micro-batch, gradients dropped: the floor
    device    AdamW8bit stepping the parameters where they live (backend auto)
    offload   OffloadEngine (gradients streamed to the host, 8-bit step on the host, forward pre-hooks)
    torchao   torchao's CPUOffloadOptimizer around torch AdamW (fused): GPU only, when torchao is installed

It also times the standalone CPU step: AdamW8bit's C++ kernel over host copies of the same parameters, the
host work the engine has to hide. The exposed optimizer time is ``offload - none`` and is reported as a
fraction of that standalone step (target on a GPU: at most 25%; on a CPU-only machine the host step and
the "device" compete for the same cores, so the numbers are recorded, not judged).

Before timing, one step of the engine is validated against device-resident AdamW8bit fed the same
accumulated gradients: the fp32 master weights must be bit-exact on the CPU; on a GPU the device kernel
may round in the last bit, so the error is reported relative to the update and must stay under 0.1%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from astrobio.model import build_model, get_config
from astrobio.optim import AdamW8bit, OffloadEngine

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="astrobio.model preset (default tiny)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="turns per provider (median over all)")
    parser.add_argument("--block", type=int, default=3, help="steps per turn; block - 1 timed intervals")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=8.0, help="offload bucket size in MiB")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args()


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """bf16 weights on a GPU (the 13B plan); fp32 on the CPU, where bf16 matmuls are slow."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def make_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return build_model(get_config(args.model), seed=0, device=device, dtype=dtype)


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


# -- providers: each returns a function that runs one optimizer step over the micro-batches ---------------

def step_none(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Callable[[], float]:
    def step() -> float:
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        model.zero_grad(set_to_none=True)
        return loss.item()
    return step


def step_device(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Callable[[], float]:
    opt = AdamW8bit(model.parameters(), **HYPER)

    def step() -> float:
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def step_offload(model: torch.nn.Module, micro_batches: list[torch.Tensor], bucket_bytes: int,
                 ) -> Callable[[], float]:
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=bucket_bytes, module=model)

    def step() -> float:
        engine.begin_step(len(micro_batches))
        for tokens in micro_batches:
            loss = backward(model, tokens, 1.0 / len(micro_batches))
        engine.end_step()
        return loss.item()
    return step


def step_torchao(model: torch.nn.Module, micro_batches: list[torch.Tensor]) -> Callable[[], float] | str:
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
    return step


def warm_up(make_step: Callable[[], Callable[[], float] | str], args: argparse.Namespace,
            device: torch.device) -> tuple[Callable[[], float] | str, float | None]:
    """Build a provider and run its warm-up steps; on a GPU also return the device memory it added at
    its peak (its model, gradients, optimizer state and activations), in GiB."""
    before = 0
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step = make_step()
    if isinstance(step, str):
        return step, None
    for _ in range(args.warmup):
        step()
    sync(device)
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if device.type == "cuda" else None
    return step, peak


def time_interleaved(steps: dict[str, Callable[[], float]], args: argparse.Namespace,
                     device: torch.device) -> dict[str, float]:
    """Median step time per provider. Providers take turns (so a change in machine load hits all alike),
    each turn ``--block`` steps back to back; the first interval of a turn is dropped, so each kept
    interval includes the wait, in the next forward, for the previous step's host work."""
    intervals: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(device)
            starts = []
            for _ in range(args.block + 1):
                starts.append(time.perf_counter())
                step()
            sync(device)
            intervals[name] += [b - a for a, b in zip(starts[1:], starts[2:])]
    return {name: statistics.median(values) for name, values in intervals.items()}


def standalone_cpu_step(model: torch.nn.Module) -> Callable[[], float]:
    """AdamW8bit's C++ kernel over fp32 host copies of the model's parameters: the host work the engine
    has to hide."""
    params = [torch.nn.Parameter(p.detach().float().cpu()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW8bit(params, **HYPER, backend="cpu")

    def step() -> float:
        opt.step()
        return 0.0
    return step


# -- validation -------------------------------------------------------------------------------------------

def validate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             micro_batches: list[torch.Tensor], bucket_bytes: int) -> float:
    """One step of the engine against device-resident AdamW8bit stepping fp32 copies of the weights with
    the same gradients, summed in fp32 micro-batch by micro-batch as the engine sums them. Compares the
    fp32 master weights and returns the largest error relative to the largest update."""
    offloaded, resident = make_model(args, device, dtype), make_model(args, device, dtype)
    engine = OffloadEngine(offloaded.parameters(), **HYPER, bucket_bytes=bucket_bytes, module=offloaded)
    engine.begin_step(len(micro_batches))
    for tokens in micro_batches:
        backward(offloaded, tokens, 1.0 / len(micro_batches))
    engine.end_step()
    offloaded_masters = [s["master"] for s in engine.state_dict()["state"].values()]
    engine.close()
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
    error = max(float((m.detach().cpu() - h).abs().max()) for m, h in zip(masters, offloaded_masters))
    limit = 0.0 if device.type == "cpu" else 1e-3
    if error > limit * update:
        raise SystemExit(f"validation failed: offload differs from device-resident AdamW8bit by {error:.3e} "
                         f"(largest update {update:.3e}); not timing a wrong result")
    return error / update


def main() -> None:
    args = parse_args()
    device, dtype = setup(args)
    bucket_bytes = int(args.bucket_mb * 2 ** 20)
    model = make_model(args, device, dtype)
    micro_batches = make_micro_batches(args, model.config.vocab_size, device)
    results = {"model": args.model, "parameters": model.num_parameters(), "device": str(device),
               "dtype": str(dtype), "micro_batches": args.micro_batches, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "threads": torch.get_num_threads(),
               "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
               "validation_relative_error": validate(args, device, dtype, micro_batches, bucket_bytes)}
    providers = {
        "none": lambda: step_none(make_model(args, device, dtype), micro_batches),
        "device": lambda: step_device(make_model(args, device, dtype), micro_batches),
        "offload": lambda: step_offload(make_model(args, device, dtype), micro_batches, bucket_bytes),
        "torchao": lambda: step_torchao(make_model(args, device, dtype), micro_batches),
        "cpu-step": lambda: standalone_cpu_step(model),
    }
    steps, report_rows = {}, {}
    for name, make_step in providers.items():
        step, peak = warm_up(make_step, args, device)
        report_rows[name] = {"skipped": step} if isinstance(step, str) else {"peak_device_memory_gib": peak}
        if not isinstance(step, str):
            steps[name] = step
    for name, seconds in time_interleaved(steps, args, device).items():
        report_rows[name]["step_s"] = seconds
    cpu_step = report_rows.pop("cpu-step")["step_s"]
    exposed = report_rows["offload"]["step_s"] - report_rows["none"]["step_s"]
    results.update(providers=report_rows, standalone_cpu_step_s=cpu_step, exposed_optimizer_s=exposed,
                   exposed_fraction_of_cpu_step=exposed / cpu_step)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict) -> None:
    print(f"{results['model']}: {results['parameters'] / 1e6:.2f}M parameters ({results['weights_gib']:.3f} GiB) "
          f"on {results['device']} "
          f"({results['dtype']}), {results['micro_batches']} micro-batches of {results['batch_size']}x"
          f"{results['seq_len']} tokens, {results['threads']} threads; validation error "
          f"{results['validation_relative_error']:.1e} of the update")
    print(f"{'provider':<10} {'step (ms)':>10} {'peak device GiB':>16}")
    for name, timing in results["providers"].items():
        if "skipped" in timing:
            print(f"{name:<10} {timing['skipped']}")
            continue
        memory = timing["peak_device_memory_gib"]
        print(f"{name:<10} {timing['step_s'] * 1e3:>10.2f} {'' if memory is None else f'{memory:.2f}':>16}")
    print(f"standalone CPU step {results['standalone_cpu_step_s'] * 1e3:.2f} ms; exposed optimizer time "
          f"(offload - none) {results['exposed_optimizer_s'] * 1e3:.2f} ms = "
          f"{results['exposed_fraction_of_cpu_step'] * 100:.0f}% of it")


if __name__ == "__main__":
    main()
