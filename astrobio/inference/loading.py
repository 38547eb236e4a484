"""Loading a trained model from a checkpoint, for generation, evaluation and export.

Works with any checkpoint the trainer writes: one ``model.safetensors`` (one stage), or one file per
pipeline stage (``model*.safetensors``; parameter names are the whole model's in every layout), with or
without an offloaded optimizer (the optimizer state is never read). The checkpoint is verified against
its manifest first; the model config comes from the JSON training state, never from executable code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from astrobio.model import ModelConfig, RebuiltLLMIntegration, build_model, get_config
from astrobio.train.checkpoint import STATE_FILE, Checkpointer, CheckpointError, verify


def weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {checkpoint} holds no model*.safetensors weights")
    return files


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N directory, or a run's output directory (its newest valid checkpoint). Newer checkpoints
    that fail verification are skipped with a warning on stderr saying why, and which one is used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoints/step-N directory or a "
                              f"run's --output-dir")
    if not (path / "checkpoints").is_dir():
        return path
    found, skipped = Checkpointer(path / "checkpoints", keep_last_k=1).latest_valid()
    for line in skipped:
        print(f"warning: skipping {line}", file=sys.stderr)
    if found is None:
        raise CheckpointError(f"run directory {path} holds no valid checkpoint under checkpoints/")
    if skipped:
        print(f"warning: using {found}, the newest valid checkpoint of {path}", file=sys.stderr)
    return found


def training_config(checkpoint: Path) -> dict:
    """The training configuration saved in the checkpoint's JSON state (no tensors are read)."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        return state["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {checkpoint} has no readable training config in {STATE_FILE}: "
                              f"{error}") from None


def iter_weights(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, on the CPU, across every weight file of the checkpoint."""
    for file in weight_files(checkpoint):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def weight_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in weight_files(checkpoint):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def model_config(checkpoint: Path) -> ModelConfig:
    """The model's config: the preset named in the training config, with the saved vocabulary size;
    checked against the shapes of the saved weights."""
    train = training_config(checkpoint)
    shapes = weight_shapes(checkpoint)
    vocab = shapes.get("embed.weight", shapes.get("head.weight", (None,)))[0]
    config = get_config(train["model"], vocab_size=vocab)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RebuiltLLMIntegration(config).state_dict().items()}
    if expected != shapes:
        wrong = sorted(set(expected) ^ set(shapes)) or sorted(k for k in expected if expected[k] != shapes[k])
        raise CheckpointError(f"checkpoint {checkpoint} does not hold a {train['model']!r} model "
                              f"(mismatched or missing weights, e.g. {wrong[:3]})")
    return config


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[RebuiltLLMIntegration, dict, Path]:
    """(model in eval mode, training config, checkpoint directory)."""
    checkpoint = resolve_checkpoint(path)
    verify(checkpoint)
    config = model_config(checkpoint)
    model = build_model(config, device="meta")
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(dict(iter_weights(checkpoint)), strict=True)
    train = training_config(checkpoint)
    warn_if_multimodal(train, checkpoint)
    return model.eval(), train, checkpoint


def warn_if_multimodal(train_config: dict, checkpoint: Path) -> None:
    """The prefix encoders of a multimodal run are not used here: say so instead of hiding it."""
    modalities = [m for m in str(train_config.get("modalities") or "text").split(",") if m.strip() != "text"]
    if modalities:
        print(f"note: {checkpoint} was trained with the {', '.join(modalities)} prefix encoders; this uses the "
              f"language model alone, on text without prefixes", file=sys.stderr)


def load_tokenizer_for(train_config: dict):
    from astrobio.data import load_tokenizer
    return load_tokenizer(train_config.get("tokenizer"))
