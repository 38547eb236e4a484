"""Planned against measured peak memory (issue 7, section 4).

    python benchmarks/validate_memory_plan.py                 # CPU: tiny and small, within 20%
    python benchmarks/validate_memory_plan.py --device cuda   # GPU: 2-stage 13B-shaped model cut to a few
                                                              # layers, each stage within 10%
    ... [--json PATH] [--layers 4] [--seq-len 2048]

On the CPU each case runs in a fresh process and its peak is the growth of the resident set's
high-water mark (astrobio/memory/validate.py says how); on a GPU each stage's peak is the caching
allocator's ``max_memory_allocated``, compared with the plan's allocated terms. Prints one line per
case and exits 1 when any ratio falls outside the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from astrobio.memory.validate import CpuCase, measure_cpu, measure_cuda

CPU_CASES = [CpuCase("tiny", seq_len=256, micro_batch_size=4),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, checkpointing=True),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, checkpointing=True, optimizer="adamw8bit"),
             CpuCase("small", seq_len=32, micro_batch_size=1),
             CpuCase("small", seq_len=128, micro_batch_size=2, checkpointing=True, optimizer="adamw8bit"),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, optimizer="adamw8bit", autocast=True),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, checkpointing=True, optimizer="adamw8bit", autocast=True),
             CpuCase("small", seq_len=64, micro_batch_size=2, checkpointing=True, optimizer="adamw8bit", autocast=True),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, optimizer="offload"),
             CpuCase("tiny", seq_len=256, micro_batch_size=4, checkpointing=True, optimizer="offload"),
             CpuCase("small", seq_len=32, micro_batch_size=1, checkpointing=True, optimizer="offload")]
TOLERANCE = {"cpu": 0.20, "cuda": 0.10}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=4, help="GPU: layers of the 13B-shaped model (2 stages)")
    parser.add_argument("--seq-len", type=int, default=2048, help="GPU: sequence length")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("validate_memory_plan: --device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    results = (measure_cuda(args.layers, args.seq_len) if args.device == "cuda" else measure_cpu(CPU_CASES))
    tolerance = TOLERANCE[args.device]
    ok = True
    print(f"{'case':52} {'planned MiB':>12} {'measured MiB':>13} {'ratio':>7}")
    for r in results:
        inside = abs(r.ratio - 1) <= tolerance
        ok &= inside
        print(f"{r.name:52} {r.planned / 2 ** 20:12.1f} {r.measured / 2 ** 20:13.1f} {r.ratio:7.3f}"
              f"{'' if inside else '  OUTSIDE'}")
    print(f"{'all within' if ok else 'NOT all within'} {tolerance:.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "tolerance": tolerance, "ok": ok,
                                         "results": [r.as_dict() for r in results]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
