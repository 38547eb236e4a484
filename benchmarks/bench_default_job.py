"""The default job's speed and what it learns, layout by layout: `python -m astrobio.train` itself.

    python benchmarks/bench_default_job.py                       # 400 steps, 2 rounds, every layout
    python benchmarks/bench_default_job.py --steps 150 --rounds 1 --layouts "2 stages,2 replicas fused"

Each layout is the CLI with explicit flags (so a later change of the defaults does not change what a
row measures), run to completion in a fresh output directory; the rounds interleave the layouts, so a
machine whose speed drifts affects all alike. Per run: the trainer's own tokens/s (tokens trained /
seconds in steps, summary.json), the process's wall time (start-up, evaluation, checkpoints and the
accuracy probe included), the final validation loss and the held-out `hz` / `type` accuracies of the
final checkpoint. The table gives per layout the median over rounds and the ratio of tokens/s to the
first layout's.

    2 stages                 the default job until 2026-12-04: a 2-stage pipeline (1F1B), 4 x 4 sequences
    2 replicas               2 data-parallel processes of the whole model, 8 sequences each, eager layers
    2 replicas fused         the same with the C++ CPU kernels of the layers (--kernels fused)
    2 replicas fused bf16    and bf16 autocast (--use-mixed-precision)
    1 process                one process, 16 sequences, two threads
    default                  whatever `python -m astrobio.train` runs now with no layout flags
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--kernels", "eager", "--no-use-mixed-precision"]
LAYOUTS: dict[str, list[str]] = {
    "2 stages": ["--pipeline-stages", "2", "--data-parallel", "1", "--batch-size", "16",
                 "--micro-batch-size", "4", *COMMON],
    "2 replicas": ["--pipeline-stages", "1", "--data-parallel", "2", "--batch-size", "16", *COMMON],
    "2 replicas fused": ["--pipeline-stages", "1", "--data-parallel", "2", "--batch-size", "16",
                         "--kernels", "fused", "--no-use-mixed-precision"],
    "2 replicas fused bf16": ["--pipeline-stages", "1", "--data-parallel", "2", "--batch-size", "16",
                              "--kernels", "fused", "--use-mixed-precision"],
    "1 process": ["--pipeline-stages", "1", "--data-parallel", "1", "--batch-size", "16", *COMMON],
    "default": [],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400: the job)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per layout, interleaved")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated subset of: {', '.join(LAYOUTS)}")
    parser.add_argument("--json", help="also write every run's numbers to this file")
    args = parser.parse_args()
    unknown = [n for n in args.layouts.split(",") if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    return args


def run_job(flags: list[str], steps: int, out: Path) -> dict:
    """One run of the CLI; its summary.json plus the process's wall time."""
    command = [sys.executable, "-m", "astrobio.train", "--steps", str(steps), "--output-dir", str(out),
               "--overwrite", *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_default_job: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    accuracy = {a["field"]: a["accuracy"] for a in summary.get("task_accuracy", [])}
    return {"tokens_per_s": summary["tokens_per_s"], "process_wall_s": wall,
            "val_loss": summary["final_val_loss"], "hz": accuracy.get("hz"), "type": accuracy.get("type"),
            "layout": f"{config['data_parallel']} x {config['pipeline_stages']} stage(s), micro-batch "
                      f"{config['micro_batch_size']} x {config['gradient_accumulation_steps']}, kernels "
                      f"{summary.get('kernels')}, bf16 {config['use_mixed_precision']}"}


def main() -> None:
    args = parse_args()
    names = args.layouts.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-default-job-") as root:
        for round_ in range(args.rounds):
            for name in names:
                result = run_job(LAYOUTS[name], args.steps, Path(root) / f"{name.replace(' ', '-')}-{round_}")
                runs[name].append(result)
                print(f"round {round_ + 1}/{args.rounds} {name:22s} {result['tokens_per_s']:8.0f} tokens/s "
                      f"{result['process_wall_s']:6.1f} s wall  val {result['val_loss']:.4f}  hz {result['hz']}  "
                      f"type {result['type']}", file=sys.stderr, flush=True)
    first = statistics.median(r["tokens_per_s"] for r in runs[names[0]])
    print(f"\n`python benchmarks/bench_default_job.py --steps {args.steps} --rounds {args.rounds}`: "
          f"medians over the rounds; ratio = tokens/s / {names[0]}'s\n")
    print("| layout | what ran | tokens/s | ratio | wall s | val loss | hz | type |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        rs = runs[name]
        speed = statistics.median(r["tokens_per_s"] for r in rs)
        per_round = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        hz, kind = ("/".join(f"{r[k]:.3f}" for r in rs) if rs[0][k] is not None else "-" for k in ("hz", "type"))
        losses = "/".join(f"{r['val_loss']:.4f}" for r in rs)
        wall = statistics.median(r["process_wall_s"] for r in rs)
        print(f"| {name} | {rs[0]['layout']} | {speed:,.0f} ({per_round}) | {speed / first:.2f}x | {wall:.1f} | "
              f"{losses} | {hz} | {kind} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
