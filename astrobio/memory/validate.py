"""Planned against measured peak memory, for one training step of a real model.

CPU: the "device" is host memory. A fresh process imports torch, warms the kernels up on a one-layer
model of the same shapes, takes its resident set (VmRSS) as the baseline, then builds the model and runs
two optimizer steps (forward, cross-entropy, backward, step; the second step runs with the optimizer state in place, which
is the steady state the planner plans). The measured peak is VmHWM minus the baseline. glibc is told to
serve every allocation above 64 KiB with mmap and to return it on free (MALLOC_MMAP_THRESHOLD_), so the
resident set follows the live tensors instead of the allocator's dynamic threshold and heap fragments.

CUDA: one stage at a time on one device, bf16 weights, a 13B-shaped model cut to a few layers; its
gradients leave the device in a post-accumulate-grad hook (as the offload engine does), the stage runs
its in-flight micro-batches' forwards then their backwards, and the measured peak is
``torch.cuda.max_memory_allocated`` minus what was allocated before the stage was built, against the
plan's allocated terms (everything except allocator slack and the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

from astrobio.memory.budget import Plan, PlanConfig
from astrobio.memory.peak import occupancy
from astrobio.memory.planner import plan
from astrobio.model import build_model, build_stage, get_config

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass
class Comparison:
    name: str
    planned: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.measured / self.planned

    def as_dict(self) -> dict:
        return {"name": self.name, "planned": self.planned, "measured": self.measured, "ratio": self.ratio}


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; the CPU measurement needs Linux")


@dataclass(frozen=True)
class CpuCase:
    """One CPU measurement. ``optimizer``: ``adamw`` (torch, fused) or ``adamw8bit`` on fp32 weights,
    one micro-batch per step; or ``offload``: bf16 weights, the OffloadEngine (8-bit AdamW, fp32
    master and accumulators on the host), two micro-batches per step."""
    preset: str
    seq_len: int
    micro_batch_size: int
    checkpointing: bool = False
    optimizer: str = "adamw"
    autocast: bool = False  # bf16 autocast over fp32 weights (not with offload)

    @property
    def name(self) -> str:
        return (f"cpu {self.preset} b{self.micro_batch_size} s{self.seq_len} "
                f"{'ckpt' if self.checkpointing else 'no-ckpt'} {self.optimizer}{' autocast' if self.autocast else ''}")

    @property
    def micro_batches(self) -> int:
        return 2 if self.optimizer == "offload" else 1

    def plan_config(self) -> PlanConfig:
        offload = self.optimizer == "offload"
        return PlanConfig(model=self.preset, stages=1, seq_len=self.seq_len, micro_batch_size=self.micro_batch_size,
                          micro_batches=self.micro_batches, schedule="1f1b", checkpointing=self.checkpointing,
                          offload=offload, optimizer="adamw8bit" if offload else self.optimizer,
                          param_dtype="bf16" if offload else "fp32", autocast=self.autocast, hardware="cpu",
                          host_memory=2 ** 40)

    def child_args(self) -> list[str]:
        args = [sys.executable, "-m", "astrobio.memory.validate", "--child", "--preset", self.preset,
                "--seq-len", str(self.seq_len), "--micro-batch-size", str(self.micro_batch_size),
                "--optimizer", self.optimizer]
        return args + (["--checkpointing"] if self.checkpointing else []) + (["--autocast"] if self.autocast else [])


class Stepper:
    """An optimizer step over ``micro_batches`` micro-batches: torch AdamW, AdamW8bit or the OffloadEngine."""

    def __init__(self, model: torch.nn.Module, kind: str, micro_batches: int, autocast: bool = False):
        self.kind, self.micro_batches, self.autocast = kind, micro_batches, autocast
        if kind == "offload":
            from astrobio.optim.offload import OffloadEngine
            self.engine = OffloadEngine(model.named_parameters(), lr=1e-4, module=model)
        elif kind == "adamw8bit":
            from astrobio.optim import AdamW8bit
            self.optimizer = AdamW8bit(model.parameters(), lr=1e-4)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(self, model: torch.nn.Module, tokens: torch.Tensor) -> None:
        if self.kind == "offload":
            self.engine.begin_step(self.micro_batches)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.micro_batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / self.micro_batches
            del logits
            loss.backward()
        if self.kind == "offload":
            self.engine.end_step()
            self.engine.synchronize()
        else:
            self.optimizer.step()


def build_cpu_model(case: CpuCase, **overrides) -> torch.nn.Module:
    config = get_config(case.preset, **overrides)
    model = build_model(config, dtype=torch.bfloat16 if case.optimizer == "offload" else torch.float32)
    model.gradient_checkpointing = case.checkpointing
    return model


def measure_cpu_child(case: CpuCase) -> int:
    """Runs in the fresh process: peak resident growth of two training steps, in bytes. A one-layer
    model of the same shapes first runs the same kernels, so that their one-time, per-shape buffers
    (oneDNN's primitive cache for bf16 matrix products, thread pools) are part of the baseline."""
    tokens = torch.randint(0, get_config(case.preset).vocab_size, (case.micro_batch_size, case.seq_len + 1))
    warm = build_cpu_model(case, n_layers=1)
    warm_stepper = Stepper(warm, case.optimizer, case.micro_batches, case.autocast)
    for _ in range(2):
        warm_stepper.step(warm, tokens)
    del warm, warm_stepper
    baseline = proc_status_bytes("VmRSS")
    model = build_cpu_model(case)
    stepper = Stepper(model, case.optimizer, case.micro_batches, case.autocast)
    for _ in range(2):
        stepper.step(model, tokens)
    return proc_status_bytes("VmHWM") - baseline


def measure_cpu(cases: list[CpuCase], threads: int = 1) -> list[Comparison]:
    """Plans each case, then measures all of them at once, each in its own fresh process. On the CPU the
    device is host memory, so the planned peak is the plan's host total."""
    env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen(c.child_args(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cases]
    results = []
    for case, proc in zip(cases, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"measurement of {case.name} failed ({proc.returncode}):\n{err[-2000:]}")
        results.append(Comparison(case.name, plan(case.plan_config()).host.total, int(out.strip().splitlines()[-1])))
    return results


# ---------------------------------------------------------------------------------------------------
# CUDA: one stage at a time


def stream_gradients_out(module: torch.nn.Module, streamed: list) -> list:
    """Copies each gradient to the host and frees it on the device, as the offload engine does."""
    def hook(p: torch.Tensor) -> None:
        streamed.append(p.grad.to("cpu").nbytes)
        p.grad = None
    return [p.register_post_accumulate_grad_hook(hook) for p in module.parameters()]


def run_stage(p: Plan, stage: int, device: torch.device) -> int:
    """The stage's worst stretch of a step: the forwards of the micro-batches it holds at once, then
    their backwards, keeping what the pipeline executor keeps (a received input; of a sent output,
    only its autograd edge). Returns the gradient bytes streamed out."""
    cfg, model = p.config, p.model
    module = build_stage(model, stage, p.split, device="meta", dtype=torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for t in module.parameters():
            t.normal_(0, 0.02)
    module.gradient_checkpointing = cfg.checkpointing
    streamed: list[int] = []
    hooks = stream_gradients_out(module, streamed)
    held = 1 + max(waiting_b for waiting_b, _ in occupancy(cfg.schedule, cfg.stages, stage, cfg.micro_batches))
    shape = (cfg.micro_batch_size, cfg.seq_len)
    roots = []
    for _ in range(held):
        if module.is_first:
            x = torch.randint(0, model.vocab_size, shape, device=device)
        else:
            x = torch.randn(*shape, model.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        out = module(x)
        if module.is_last:
            target = torch.randint(0, model.vocab_size, shape, device=device)
            roots.append((x, F.cross_entropy(out.float().flatten(0, 1), target.flatten()), None))
        else:
            roots.append((x, get_gradient_edge(out), (out.shape, out.dtype)))
        del out
    for x, root, meta in roots:
        grad = None if meta is None else [torch.randn(meta[0], dtype=meta[1], device=device)]
        torch.autograd.backward([root], grad)
    roots.clear()
    for h in hooks:
        h.remove()
    return sum(streamed)


def measure_cuda_stage(p: Plan, stage: int, device: torch.device) -> Comparison:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_stage(p, stage, device)
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - before
    planned = sum(t.bytes for t in p.devices[stage].terms if t.name not in ("allocator slack", "CUDA context"))
    return Comparison(f"cuda {p.model.n_layers}-layer 13B-shaped stage {stage}", planned, measured)


def cuda_check_config(layers: int, seq_len: int) -> PlanConfig:
    """13B's shapes (d_model, heads, SwiGLU width, vocab) with ``layers`` layers, two stages, 1F1B.
    The measurement copies each gradient out synchronously and frees it, so one is in flight
    (``device_grads_in_flight=1``)."""
    model = replace(get_config("13b"), n_layers=layers)
    return PlanConfig(model=model, stages=2, seq_len=seq_len, micro_batch_size=1, micro_batches=8,
                      schedule="1f1b", checkpointing=True, offload=True, hardware="h200",
                      device_grads_in_flight=1)


def measure_cuda(layers: int = 4, seq_len: int = 2048) -> list[Comparison]:
    """Each stage of the 13B-shaped model, one after the other on one GPU: planned allocated bytes
    against the caching allocator's peak."""
    p = plan(cuda_check_config(layers, seq_len))
    device = torch.device("cuda", torch.cuda.current_device())
    return [measure_cuda_stage(p, s, device) for s in range(p.config.stages)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "offload"))
    parser.add_argument("--autocast", action="store_true")
    args = parser.parse_args(argv)
    case = CpuCase(args.preset, args.seq_len, args.micro_batch_size, args.checkpointing, args.optimizer, args.autocast)
    if args.child:
        print(measure_cpu_child(case))
        return 0
    print(json.dumps(measure_cpu([case])[0].as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
