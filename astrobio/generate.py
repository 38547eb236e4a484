"""``python -m astrobio.generate --checkpoint PATH --prompt "..."``: sample from a trained model.

Loads the weights of any trainer checkpoint (one or several pipeline stages, with or without an
offloaded optimizer), decodes with a key/value cache, and streams the text to the terminal.
"""

from __future__ import annotations

import sys

from astrobio.cli import resolve_device, run_cli
from astrobio.inference.arguments import ArgumentParser, non_negative_float, non_negative_int, positive_int, probability
from astrobio.inference.loading import load_model, load_tokenizer_for
from astrobio.inference.sampling import SamplingConfig, generate_text


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m astrobio.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory or a run's output dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    device = resolve_device(args.device)
    model, train_config, _ = load_model(args.checkpoint, device=device)
    tokenizer = load_tokenizer_for(train_config)
    sys.stdout.write(args.prompt)
    generate_text(model, tokenizer, args.prompt, sampling, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                  device=device)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
