"""``python -m astrobio.evaluate --checkpoint PATH``: validation loss, perplexity and a task accuracy.

The accuracy probes held-out records of the built-in corpus (the records the trainer held out with the
run's seed): the model completes habitable-zone membership (``hz``) and the planet mass class
(``type``), scored against the physics that generated them; and the same two probes on the real Open
Exoplanet Catalogue when it is available: on its held-out systems when the run trained on one side of
a split by system (``--data oec://PATH?split=train``). Each probe reports accuracy and balanced
accuracy, each with a 95% interval and the majority class's, and its confusion matrix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from astrobio.cli import resolve_device, run_cli
from astrobio.data import build_token_splits
from astrobio.data.sources import SplitCatalogueSource
from astrobio.data.sources import open_source, redact_uri
from astrobio.inference.arguments import ArgumentParser, positive_int
from astrobio.inference.evaluation import PROBE_FIELDS, builtin_probes, run_probe, validation_loss
from astrobio.inference.loading import load_model, load_tokenizer_for

DEFAULT_CATALOGUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oec_systems.xml.gz"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m astrobio.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory or a run's output dir")
    p.add_argument("--data", default=None, help="data URI for the loss (default: the run's own, held-out split)")
    p.add_argument("--catalogue", default=None,
                   help="the real-data probe's catalogue: an OEC .xml(.gz) file or oec://PATH?split=heldout "
                        "(default: the held-out side of the run's oec:// split, else "
                        f"{DEFAULT_CATALOGUE} when present)")
    p.add_argument("--max-examples", type=positive_int, default=200, help="probe examples per field and source")
    p.add_argument("--max-batches", type=positive_int, default=20, help="validation batches for the loss")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    return p


def catalogue_source(catalogue: str | None, train_data: str) -> tuple[str, str] | None:
    """(URI, name shown) of the real-data probe's catalogue, or None when there is none to read.

    An explicit ``--catalogue`` is checked before any model work. Without one, a run trained on one
    side of a split by system is probed on the other side; else the default catalogue, named as seen in
    training when the run trained on a catalogue file."""
    if catalogue:
        if catalogue.startswith("oec:"):
            source = SplitCatalogueSource(catalogue)
            if not source.path.is_file():
                raise FileNotFoundError(f"--catalogue {catalogue}: {source.path} does not exist")
            return catalogue, f"{_side_name(source)} of the Open Exoplanet Catalogue"
        if not Path(catalogue).is_file():  # before the model runs, not after
            raise FileNotFoundError(f"--catalogue {catalogue} does not exist; give an OEC .xml.gz file, "
                                    f"oec://PATH?split=heldout, or leave it out")
        return catalogue, "the Open Exoplanet Catalogue"
    if train_data.startswith("oec:"):
        held_out = SplitCatalogueSource(train_data).uri_of("heldout")
        return held_out, "held-out systems of the Open Exoplanet Catalogue"
    if not DEFAULT_CATALOGUE.is_file():
        return None
    seen = " (all systems: the run trained on them)" if train_data.lower().endswith((".xml", ".xml.gz")) else ""
    return str(DEFAULT_CATALOGUE), f"the Open Exoplanet Catalogue{seen}"


def _side_name(source: SplitCatalogueSource) -> str:
    return "held-out systems" if source.split == "heldout" else "training systems"


def evaluate(checkpoint: str, data: str | None = None, catalogue: str | None = None, max_examples: int = 200,
             max_batches: int = 20, device: str = "cpu") -> dict:
    if catalogue:
        catalogue_source(catalogue, "")  # a wrong --catalogue fails before the model is loaded
    model, train_config, path = load_model(checkpoint, device=device)
    tokenizer = load_tokenizer_for(train_config)
    seq_len = int(train_config.get("seq_len", 128))
    seed = int(train_config.get("seed", 0))
    uri = data or train_config.get("data", "builtin")
    records = open_source(uri).records(seed)  # as the trainer reads --data (files, builtin, http sources)
    _, val_ids = build_token_splits(records, tokenizer, seed=seed)
    result = {"checkpoint": str(path), "data": redact_uri(uri),
              **validation_loss(model, val_ids, seq_len, max_batches=max_batches)}
    probes = builtin_probes(model, tokenizer, train_config, seq_len, max_examples)
    real = catalogue_source(catalogue, train_config.get("data", "builtin"))
    if real is not None:
        real_records = open_source(real[0]).records(seed)
        probes += [run_probe(model, tokenizer, real_records, field, real[1], seq_len, max_examples, physics=False)
                   for field in PROBE_FIELDS]
    result["probes"] = [p.to_dict() for p in probes]
    result["lines"] = [line for p in probes for line in p.lines()]
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args.checkpoint, args.data, args.catalogue, args.max_examples, args.max_batches,
                      resolve_device(args.device))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "lines"}, indent=1))
    else:
        print(f"validation loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"({result['tokens']} tokens of {result['data']})")
        for line in result["lines"]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
