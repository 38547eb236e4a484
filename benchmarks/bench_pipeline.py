"""Pipeline schedules side by side: our GPipe, 1F1B and ZB-H1, torch.distributed.pipelining's GPipe and
1F1B, and one process running the whole model, all on the same model and micro-batches.

    python benchmarks/bench_pipeline.py [--micro-batches 32] [--json PATH] [--gantt-dir DIR]

Each provider runs in its own subprocess under ``--timeout`` (a hang is reported, not waited on),
except our schedules, which share one job and take their steps in turn (GPipe, 1F1B, ZB-H1, then
1F1B, ZB-H1, GPipe, ...), so that the machine's load, which changes by the minute on a shared
machine, weighs on the three alike and their step times compare. Before timing, each one's
first-step loss is checked against the whole model's loss computed in this process. Reported:
median and minimum step time over ``--steps`` steps after ``--warmup``; for our schedules also the
measured bubble beside the simulated one, each the median over the timed steps (the ratio: the
median of the steps' measured / simulated). Simulated: the same schedule replayed with each
computation's measured duration in that step and the measured one-way time of an activation with
its header (``p2p_latency``), so that the difference is what the executor adds (its code between
computations, the real messages' waits); also replayed with each stage's mean F, B and W cost
(which hides the variation between micro-batches), and with free communication.

NOTE: torch's PipelineStage is given ``input_args``/``output_args``; without them, torch 2.14.1 on gloo
hung in its run-time shape inference. Its stages also need one fixed shape, so every micro-batch here
has the same sequence length (ours does not need that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from astrobio.model import build_model, build_stage, get_config
from astrobio.parallel.executor import (gather_traces, measured_bubble, p2p_latency, run_pipeline_step,
                                        simulated_bubble)
from astrobio.parallel.launch import keep_freed_memory, launch
from astrobio.parallel.schedules import schedule

PROVIDERS = ("single-process", "astrobio gpipe", "astrobio 1f1b", "astrobio zb-h1", "torch ScheduleGPipe",
             "torch Schedule1F1B")


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def micro_batches(args, vocab: int):
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (args.micro_batches, args.batch_size, args.seq_len + 1), generator=gen)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def config(args):
    return get_config(args.model)


def timed_steps(args, step, after=None) -> list[float]:
    """Runs warm-up then timed steps, seconds each; ``after(result)`` runs after each timed step,
    outside its time."""
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
        if after is not None:
            after(result)
    return times


def reference_loss(args) -> float:
    """The loss every provider's first step must give: the whole model in this process, forward only
    (untimed, on one thread: two threads' spin-waits can stall for minutes on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(config(args), seed=0)
        with torch.no_grad():
            losses = [loss_fn(model(x), y) for x, y in micro_batches(args, model.config.vocab_size)]
        return (sum(losses) / len(losses)).item()
    finally:
        torch.set_num_threads(threads)


def run_single(args) -> dict:
    keep_freed_memory()  # as every rank process does (launch), so the baseline is not paying page faults
    device = torch.device("cuda" if args.backend == "nccl" else "cpu")
    model = build_model(config(args), seed=0, device=device)
    data = on_device(micro_batches(args, model.config.vocab_size), device)

    def step():
        model.zero_grad(set_to_none=True)
        losses = [loss_fn(model(x), y) for x, y in data]
        total = sum(losses) / len(losses)
        total.backward()
        return total.item()

    first = step()
    times = timed_steps(args, step)
    return dict(first_loss=first, step_s=times, threads=torch.get_num_threads())


def on_device(data: list, device: torch.device) -> list:
    return [(x.to(device), y.to(device)) for x, y in data]


def ours_rank(ctx, args, kinds: list[str]) -> dict:
    """Our schedules in one job, their steps interleaved (the order rotating every round), so that a
    change in the machine's load hits all of them alike."""
    stage = build_stage(config(args), ctx.rank, halves(config(args).n_layers), seed=0, device=ctx.device)
    data = on_device(micro_batches(args, stage.config.vocab_size), ctx.device)

    def step(kind):
        start = time.perf_counter()
        stage.zero_grad(set_to_none=True)
        dist.barrier()
        result = run_pipeline_step(stage, kind, data, loss_fn, guard=ctx.guard)
        return time.perf_counter() - start, result

    first = {kind: step(kind)[1].loss for kind in kinds}
    times = {kind: [] for kind in kinds}
    traces = {kind: [] for kind in kinds}
    for round_ in range(args.warmup + args.steps):
        for kind in kinds[round_ % len(kinds):] + kinds[:round_ % len(kinds)]:
            seconds, result = step(kind)
            if round_ >= args.warmup:
                times[kind].append(seconds)
                traces[kind].append(gather_traces(result.trace))
    comm_s = p2p_latency((args.batch_size, args.seq_len, stage.config.d_model))
    return {kind: ours_results(args, ctx, kind, first[kind], times[kind], traces[kind], comm_s) for kind in kinds}


def ours_results(args, ctx, kind: str, first: float, times: list[float], all_traces: list, comm_s: float) -> dict:
    sched = schedule(kind, 2, args.micro_batches)
    bubbles = [dict(measured=measured_bubble(traces), simulated=simulated_bubble(sched, traces, comm_s),
                    mean_costs=simulated_bubble(sched, traces, comm_s, per_action=False),
                    free_comm=simulated_bubble(sched, traces)) for traces in all_traces]
    out = dict(first_loss=first, step_s=times, comm_ms=1e3 * comm_s, bubbles=bubbles,
               measured_bubble=statistics.median(b["measured"] for b in bubbles),
               simulated_bubble=statistics.median(b["simulated"] for b in bubbles),
               bubble_ratio=statistics.median(b["measured"] / b["simulated"] for b in bubbles),
               simulated_bubble_mean_costs=statistics.median(b["mean_costs"] for b in bubbles),
               simulated_bubble_free_comm=statistics.median(b["free_comm"] for b in bubbles))
    if args.gantt_dir and ctx.rank == 0:  # the last step
        from astrobio.parallel.gantt import render_gantt
        render_gantt(all_traces[-1], os.path.join(args.gantt_dir, f"pipeline_{kind}.png"),
                     title=f"{kind}, {args.micro_batches} micro-batches", simulated_bubble=bubbles[-1]["simulated"])
    return out


def torch_rank(ctx, args, kind: str) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    cfg = config(args)
    module = build_stage(cfg, ctx.rank, halves(cfg.n_layers), seed=0, device=ctx.device)
    data = on_device(micro_batches(args, cfg.vocab_size), ctx.device)
    b, t, d = args.batch_size, args.seq_len, cfg.d_model
    # NOTE: the examples must require grad as the real tensors do; otherwise torch's stages plan no
    # gradient transfer and stage 0's backward fails ("grad can be implicitly created only for scalar")
    example_in = data[0][0] if ctx.rank == 0 else torch.zeros(b, t, d, requires_grad=True, device=ctx.device)
    example_out = torch.zeros(b, t, d if ctx.rank == 0 else cfg.vocab_size, requires_grad=True, device=ctx.device)
    stage = PipelineStage(module, ctx.rank, 2, ctx.device, input_args=(example_in,),
                          output_args=(example_out,))
    sched_cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    sched = sched_cls(stage, args.micro_batches, loss_fn=loss_fn)
    inputs = torch.cat([x for x, _ in data])
    targets = torch.cat([y for _, y in data])

    def step():
        module.zero_grad(set_to_none=True)
        dist.barrier()
        losses = []
        if ctx.rank == 0:
            sched.step(inputs)
        else:
            sched.step(target=targets, losses=losses)
        loss = torch.zeros(1, dtype=torch.float64, device=ctx.device)
        if losses:
            loss[0] = torch.stack([l.detach().double() for l in losses]).mean()
        dist.broadcast(loss, 1)
        return loss.item()

    first = step()
    times = timed_steps(args, step)
    return dict(first_loss=first, step_s=times)


def halves(n_layers: int) -> list[int]:
    return [n_layers - n_layers // 2, n_layers // 2]


def run_provider(args) -> dict:
    """``{name: result}``: one provider, or all of ours (``astrobio KIND,KIND,...``) in one job."""
    torch.manual_seed(0)
    name = args.provider
    if name == "single-process":
        return {name: run_single(args)}
    family, kind = name.split(" ", 1)
    if family == "astrobio":
        kinds = kind.split(",")
        results = launch(ours_rank, 2, (args, kinds), backend=args.backend, timeout_s=args.timeout)
        return {f"astrobio {k}": slowest_rank({r: results[r][k] for r in results}) for k in kinds}
    kind = {"ScheduleGPipe": "gpipe", "Schedule1F1B": "1f1b"}[kind]
    return {name: slowest_rank(launch(torch_rank, 2, (args, kind), backend=args.backend, timeout_s=args.timeout))}


def slowest_rank(results: dict) -> dict:
    """Rank 0's result, with each step's time taken from the rank that finished it last."""
    out = dict(results[0])
    out["step_s"] = [max(a, b) for a, b in zip(results[0]["step_s"], results[1]["step_s"])]
    return out


def run_isolated(args, name: str, names: list[str], timeout_s: float) -> dict:
    """One provider (or our group) in a subprocess of its own process group, killed at the timeout;
    ``{name: result}`` for each of ``names``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.json")
        cmd = [sys.executable, __file__, "--provider", name, "--out", out_path] + passthrough(args)
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {n: dict(error=f"timed out after {timeout_s:g} s") for n in names}
        if proc.returncode != 0:
            lines = [line for line in log.splitlines() if "Error" in line]
            return {n: dict(error=lines[0].strip() if lines else f"exit code {proc.returncode}") for n in names}
        with open(out_path) as f:
            return json.load(f)


def passthrough(args) -> list[str]:
    out = ["--model", args.model, "--micro-batches", str(args.micro_batches), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--timeout", str(args.timeout), "--backend", args.backend]
    if args.gantt_dir:
        out += ["--gantt-dir", args.gantt_dir]
    return out


def report(results: dict, reference: float) -> None:
    print(f"{'provider':24s} {'median ms':>9s} {'min ms':>8s} {'loss check':>11s} {'bubble measured':>16s} "
          f"{'simulated':>10s} {'ratio':>6s} {'(mean costs)':>13s} {'(free comm)':>12s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24s} FAILED: {r['error']}")
            continue
        ok = abs(r["first_loss"] - reference) <= 1e-5 * abs(reference)
        r["loss_matches_single_process"] = ok
        r["median_step_ms"] = 1e3 * statistics.median(r["step_s"])
        r["min_step_ms"] = 1e3 * min(r["step_s"])
        bubble = (f"{r['measured_bubble']:16.1%} {r['simulated_bubble']:10.1%} "
                  f"{r['bubble_ratio']:5.2f}x {r['simulated_bubble_mean_costs']:13.1%} "
                  f"{r['simulated_bubble_free_comm']:12.1%}" if "measured_bubble" in r else "")
        print(f"{name:24s} {r['median_step_ms']:9.1f} {r['min_step_ms']:8.1f} {'ok' if ok else 'MISMATCH':>11s} {bubble}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--micro-batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per provider (ours run together, with this times their number)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="gloo: two CPU ranks; nccl: one GPU per rank (needs two GPUs)")
    parser.add_argument("--gantt-dir", default=None, help="write our schedules' Gantt charts here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.provider:
        with open(args.out, "w") as f:
            json.dump(run_provider(args), f)
        return
    names = [n.strip() for n in args.providers.split(",")]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {', '.join(PROVIDERS)}")
    reference = reference_loss(args)
    results = {}
    ours = [n for n in names if n.startswith("astrobio ")]
    for name in names:
        if name in ours and name == ours[0]:
            group = "astrobio " + ",".join(n.split(" ", 1)[1] for n in ours)
            results.update(run_isolated(args, group, ours, args.timeout * len(ours)))
        elif name not in ours:
            results.update(run_isolated(args, name, [name], args.timeout))
    report(results, reference)
    if args.json:
        meta = dict(torch=torch.__version__, cpus=os.cpu_count(), model=args.model, micro_batches=args.micro_batches,
                    batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
