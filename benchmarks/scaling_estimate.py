"""Predicted tokens/s of data parallel over machines (docs/SCALING.md): one replica's step time, plus the
time its machine's network link needs for the step's gradient and weight traffic.

    python benchmarks/scaling_estimate.py [--step-s 84.03] [--tokens-per-step 65536] [--params 13.138e9]
                                          [--grad-bytes 4] [--weight-bytes 2] [--machines 1 2 4]
                                          [--link-gbit 10 25 100]

The model of one step with K replicas, one per machine (each machine holds a whole pipeline):

    traffic per machine   (K - 1) / K x params x (grad_bytes + weight_bytes)   a ring reduce-scatter of
                          the gradients and all-gather of the updated weights (the sharded offload
                          engine; an all-reduce of bf16 gradients moves the same 2 x 2 bytes)
    step                  step_s + traffic / link bandwidth                    the transfer exposed, not
                          overlapped with compute (an upper bound on the step time)
    tokens/s              K x tokens_per_step / step

The defaults are the memory planner's step for 13B on one machine of 2 x RTX A5000 (docs/MEMORY.md:
84.03 s for 32 micro-batches of 2048 tokens, compute-bound; an estimate, no A5000 was measured) and
fp32 gradient accumulators (4 bytes) with bf16 weights (2 bytes). Nothing is measured here: it is
arithmetic on the stated numbers, printed as the table docs/SCALING.md quotes.
"""

from __future__ import annotations

import argparse


def traffic_bytes(params: float, replicas: int, grad_bytes: float, weight_bytes: float) -> float:
    """Bytes one machine sends per step: its share of a ring reduce-scatter and all-gather."""
    return (replicas - 1) / replicas * params * (grad_bytes + weight_bytes)


def tokens_per_s(step_s: float, tokens_per_step: int, params: float, replicas: int, link_gbit: float,
                 grad_bytes: float, weight_bytes: float) -> tuple[float, float]:
    """(seconds of transfer per step, tokens/s) of ``replicas`` machines on a ``link_gbit`` Gb/s link."""
    transfer_s = traffic_bytes(params, replicas, grad_bytes, weight_bytes) / (link_gbit * 1e9 / 8)
    return transfer_s, replicas * tokens_per_step / (step_s + transfer_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, default=84.03)
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--params", type=float, default=13.138e9)
    parser.add_argument("--grad-bytes", type=float, default=4)
    parser.add_argument("--weight-bytes", type=float, default=2)
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--link-gbit", type=float, nargs="+", default=[10, 25, 100])
    args = parser.parse_args()
    print(f"one replica: {args.step_s:.2f} s per step, {args.tokens_per_step} tokens; {args.params:.4g} parameters; "
          f"{args.grad_bytes:g} B/param gradients + {args.weight_bytes:g} B/param weights")
    print("| machines | " + " | ".join(f"{g:g} Gb/s: transfer s, tokens/s" for g in args.link_gbit) + " |")
    print("|---|" + "---|" * len(args.link_gbit))
    for k in args.machines:
        cells = []
        for gbit in args.link_gbit:
            transfer_s, rate = tokens_per_s(args.step_s, args.tokens_per_step, args.params, k, gbit,
                                            args.grad_bytes, args.weight_bytes)
            cells.append(f"{transfer_s:.1f} s, {rate:,.0f}")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
