"""Checkpoints (DESIGN.md section 7): ``checkpoints/step-N/``, atomic and checksummed.

A checkpoint is a directory written under a temporary name, every file fsynced, then renamed into place:

    model.safetensors   the model's state dict (loadable on its own, e.g. for generation)
    state.safetensors   every other tensor (optimizer state, RNG states, ...)
    state.json          everything else, as JSON, with tensors referenced by name
    manifest.json       format version, step, and bytes + sha256 of each file above; written last

Loading verifies the manifest first and refuses a checkpoint with a missing, truncated or altered file.
Nothing is unpickled: tensors go through safetensors and the rest through JSON, so a checkpoint from
elsewhere is data, not a program. Non-string dict keys and tuples (optimizer state dicts have both)
are encoded explicitly so that a state dict comes back exactly as it was saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def encode_tree(obj, tensors: dict[str, torch.Tensor], path: str = "state"):
    """A JSON-able copy of ``obj``; tensors are moved into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store the key {k!r} at {path} in a checkpoint")
        return {"__items__": [[k, encode_tree(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint (tensors, numbers, "
                    f"strings, lists, tuples and dicts only)")


def decode_tree(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of ``encode_tree``."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            pointer = t.untyped_storage().data_ptr()
            if pointer in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


class Checkpointer:
    """Saves, lists, verifies and loads the checkpoints under ``root`` (``output_dir/checkpoints``)."""

    def __init__(self, root: str | os.PathLike, keep_last_k: int):
        self.root = Path(root)
        self.keep_last_k = keep_last_k

    def save(self, step: int, model_state: dict[str, torch.Tensor], state: dict) -> Path:
        """Writes ``step-N`` atomically, then deletes all but the newest ``keep_last_k`` checkpoints."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        skeleton = encode_tree(state, tensors)
        save_file(storable(model_state), tmp / MODEL_FILE)
        save_file(storable(tensors), tmp / TENSORS_FILE)
        write_json(tmp / STATE_FILE, skeleton)
        files = {}
        for name in (MODEL_FILE, TENSORS_FILE, STATE_FILE):
            fsync_path(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)}
        write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
        fsync_path(tmp)
        self.replace(tmp, final)
        self.prune()
        return final

    def replace(self, tmp: Path, final: Path) -> None:
        """Renames ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
        old = final.with_name(f".old-{final.name}")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """``step-N`` directories, oldest first (whether valid or not)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(found, key=step_of)

    def prune(self) -> None:
        for path in self.checkpoints()[:-self.keep_last_k]:
            shutil.rmtree(path)

    def latest_valid(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and one line for each newer one that did not."""
        skipped = []
        for path in reversed(self.checkpoints()):
            try:
                verify(path)
            except CheckpointError as error:
                skipped.append(str(error))
                continue
            return path, skipped
        return None, skipped


def verify(path: str | os.PathLike) -> dict:
    """The manifest, after checking every file it lists against its size and sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (an interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST}: {error}") from None
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {fmt}; this version reads format {FORMAT_VERSION}")
    for name in (MODEL_FILE, TENSORS_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} does not list {name}")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        size = file.stat().st_size
        if size != files[name]["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size} bytes, the manifest "
                                  f"says {files[name]['bytes']} (truncated?)")
        if sha256_of(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256 in "
                                  f"{MANIFEST}")
    return manifest


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(model state dict, training state, step) of a verified checkpoint, on the CPU."""
    path = Path(path)
    manifest = verify(path)
    try:
        model_state = load_file(path / MODEL_FILE)
        tensors = load_file(path / TENSORS_FILE)
        state = decode_tree(json.loads((path / STATE_FILE).read_text()), tensors)
    except (SafetensorError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    return model_state, state, manifest["step"]
