"""``python -m astrobio.export --checkpoint PATH --out DIR [--format safetensors|hf]``: model artifacts.

Writes the weights (safetensors shards, streamed tensor by tensor, no optimizer state), a config and the
tokenizer. ``hf`` is loadable by Hugging Face transformers as a Llama-family causal LM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from astrobio.cli import run_cli
from astrobio.inference.arguments import ArgumentParser, positive_float
from astrobio.inference.export import export_weights
from astrobio.inference.loading import iter_weights, model_config, resolve_checkpoint, training_config
from astrobio.train.checkpoint import verify

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m astrobio.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory or a run's output dir")
    p.add_argument("--out", required=True, help="output directory (created; must be empty if it exists)")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--shard-size-gb", type=positive_float, default=2.0)
    return p


def tokenizer_files(train_config: dict) -> tuple[dict[str, str], int | None, int | None]:
    """Files describing the tokenizer, and its BOS/EOS ids."""
    from astrobio.data import load_tokenizer
    path = train_config.get("tokenizer")
    tokenizer = load_tokenizer(path)
    if path:  # a tokenizer.json or the folder holding it: the tokenizer knows which file it read
        return {"tokenizer.json": tokenizer.path.read_text()}, tokenizer.bos_id, tokenizer.eos_id
    spec = {"type": "astrobio-bytes", "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "encoding": "UTF-8 bytes are token ids 0..255"}
    return {"astrobio_tokenizer.json": json.dumps(spec, indent=1)}, tokenizer.bos_id, tokenizer.eos_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; choose a new directory")
    checkpoint = resolve_checkpoint(args.checkpoint)
    verify(checkpoint)
    config = model_config(checkpoint)
    files, bos, eos = tokenizer_files(training_config(checkpoint))
    written = export_weights(iter_weights(checkpoint), config, str(out), fmt=args.format, dtype=DTYPES[args.dtype],
                             tokenizer_files=files, bos_id=bos, eos_id=eos,
                             shard_bytes=int(args.shard_size_gb * (1 << 30)))
    print(f"exported {checkpoint} as {args.format} to {out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
