"""``python -m astrobio.plan``: will this run fit, where does its memory go, and how fast will it be.

    python -m astrobio.plan --model 13b --stages 2 --gpu-memory 24GiB --host-memory 256GiB \\
        --seq-len 2048 --micro-batch-size 1 --micro-batches 32 --schedule 1f1b --hardware a5000

    python -m astrobio.plan --data-parallel 4 --ranks-per-machine 2      # 4 machines of 2 x A5000

Prints per stage the device terms at the stage's peak moment, the host terms, a verdict for each, and
the estimated step time and tokens/s with the critical path (``--json`` for the same as JSON). Exit
status: 0 when the plan fits, 1 when it does not (the reason and what would fit are printed), 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from astrobio.memory import SCHEDULES, PlanConfig, plan
from astrobio.memory.hardware import PROFILES
from astrobio.memory.preflight import PlanError, check_fits
from astrobio.memory.report import format_plan
from astrobio.memory.units import parse_bytes
from astrobio.model import PRESETS


def size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astrobio.plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="13b", choices=list(PRESETS))
    p.add_argument("--stages", type=int, default=2, help="pipeline stages, one device each")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="pipeline replicas K; with offload each rank holds 1/K of its stage's optimizer state")
    p.add_argument("--ranks-per-machine", type=int, default=None,
                   help="ranks (GPUs) per machine, ranks laid out replica by replica (rank = replica x stages + "
                        "stage); the host plan is the fullest machine's (default: one replica's stages)")
    p.add_argument("--layers-per-stage", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="e.g. 29,27 (default: as even as possible)")
    p.add_argument("--gpu-memory", type=size_arg, default=None, help="per device, e.g. 24GiB (default: profile's)")
    p.add_argument("--host-memory", type=size_arg, default=parse_bytes("256GiB"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--modalities", default="text",
                   help="as the trainer's --modalities: text,catalogue,graph puts the prefix encoders on stage 0")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=32, help="micro-batches per optimizer step")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--master-weights", choices=("fp32", "bf16-sr"), default="fp32")
    p.add_argument("--accum-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--grad-accum-location", choices=("auto", "device", "host"), default="host",
                   help="with offload, where gradients sum over micro-batches (auto: as the trainer decides)")
    p.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit")
    p.add_argument("--param-dtype", choices=("bf16", "fp32"), default=None,
                   help="device weights (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast over fp32 weights")
    p.add_argument("--no-offload", dest="offload", action="store_false",
                   help="optimizer state, master weights and gradients stay on the device")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--loss-chunks", type=int, default=1)
    p.add_argument("--kernels", choices=("eager", "fused"), default="eager",
                   help="the model's layers and loss: fused plans the Triton kernels and the chunked loss")
    p.add_argument("--bucket-size", type=size_arg, default=None, help="offload gradient bucket (default 32MiB)")
    p.add_argument("--hardware", choices=list(PROFILES), default="a5000")
    p.add_argument("--mfu", type=float, default=None, help="override the profile's model FLOPs utilisation")
    p.add_argument("--host-link", type=float, default=None, help="GB/s per direction")
    p.add_argument("--host-memory-bandwidth", type=float, default=None, help="GB/s")
    p.add_argument("--max-device-fraction", type=float, default=0.90)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    fields = {k: v for k, v in vars(args).items() if k not in ("json", "bucket_size")}
    if args.bucket_size is not None:
        fields["bucket_bytes"] = args.bucket_size
    return PlanConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = plan(config_from_args(args))
    except ValueError as err:
        print(f"python -m astrobio.plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_plan(result))
    try:
        check_fits(result)
    except PlanError as err:
        print(f"\n{err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
