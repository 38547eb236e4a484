"""Checkpoints (DESIGN.md section 7): ``checkpoints/step-N/``, atomic and checksummed.

A checkpoint is a directory written under a temporary name, every file fsynced, then renamed into place:

    model.safetensors   the model's state dict (loadable on its own, e.g. for generation)
    state.safetensors   every other tensor (optimizer state, RNG states, ...)
    state.json          everything else, as JSON, with tensors referenced by name
    manifest.json       format version, step, and bytes + sha256 of each file above; written last

A pipeline run writes one part per stage instead of ``model.safetensors`` and the optimizer state:
``model-stage{k}.safetensors`` (that stage's parameters under the whole model's names) and
``optimizer-stage{k}.safetensors`` + ``.json`` (its optimizer state, keyed by parameter name); every
rank writes its part into the temporary directory, then rank 0 writes ``state.*`` and the manifest
(which lists every file) and renames. ``load_checkpoint`` merges the parts, so a checkpoint loads the
same whichever number of stages wrote it.

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
MODEL_PART = re.compile(r"^model(-stage\d+)?\.safetensors$")
OPTIMIZER_PART = re.compile(r"^optimizer-stage(\d+)\.json$")


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


def write_part(directory: Path, model_file: str | None, model_state: dict[str, torch.Tensor] | None, stem: str,
               state: dict) -> None:
    """``model_file`` (when given) and ``{stem}.safetensors`` + ``{stem}.json`` (the state's tensors and
    the rest) into ``directory``."""
    if model_file is not None:
        save_file(storable(model_state), directory / model_file)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode_tree(state, tensors)
    save_file(storable(tensors), directory / f"{stem}.safetensors")
    write_json(directory / f"{stem}.json", skeleton)


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
        tmp = self.begin(step)
        write_part(tmp, MODEL_FILE, model_state, STATE_FILE[:-len(".json")], state)
        return self.finish(tmp, step)

    def begin(self, step: int) -> Path:
        """The empty temporary directory of ``step-N`` (one process calls this, before any part is written)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def finish(self, tmp: Path, step: int) -> Path:
        """Manifest over every file written into ``tmp``, then the rename and the pruning."""
        files = {}
        for file in sorted(p for p in tmp.iterdir() if p.is_file()):
            fsync_path(file)
            files[file.name] = {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
        write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
        fsync_path(tmp)
        final = self.root / f"step-{step}"
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
    for name in (TENSORS_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} does not list {name}")
    if not any(MODEL_PART.match(name) for name in files):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} lists no model*.safetensors")
    for name in files:
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
    """(model state dict, training state, step) of a verified checkpoint, on the CPU; the parts of a
    pipeline checkpoint merged (the model's by name, the optimizer's into ``state["optimizer"]``)."""
    path = Path(path)
    manifest = verify(path)
    try:
        model_state = {}
        for name in sorted(n for n in manifest["files"] if MODEL_PART.match(n)):
            model_state.update(load_file(path / name))
        state = read_part(path, STATE_FILE[:-len(".json")])
        for name in sorted(n for n in manifest["files"] if OPTIMIZER_PART.match(n)):
            merge_optimizer(state, read_part(path, name[:-len(".json")]))
    except (SafetensorError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    return model_state, state, manifest["step"]


def read_part(path: Path, stem: str):
    return decode_tree(json.loads((path / f"{stem}.json").read_text()), load_file(path / f"{stem}.safetensors"))


def merge_optimizer(state: dict, part: dict) -> None:
    """Adds one stage's name-keyed optimizer state to ``state["optimizer"]``."""
    if state.get("optimizer") is None:
        state["optimizer"] = part
        return
    merged = state["optimizer"]
    merged["state"].update(part["state"])
    for group, more in zip(merged.get("param_groups", []), part.get("param_groups", [])):
        group["params"] = group["params"] + more["params"]


def optimizer_by_name(saved: dict, names: list[str]) -> dict:
    """An optimizer's (or offload engine's) state dict with its per-parameter entries keyed by parameter
    name instead of position, so that it can be split between or merged across pipeline stages."""
    out = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    out["state"] = {names[i]: entry for i, entry in saved["state"].items()}
    if "param_groups" in saved:
        out["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
    return out


def optimizer_by_index(saved: dict, names: list[str]) -> dict:
    """Inverse of ``optimizer_by_name`` for the parameters ``names`` (e.g. one stage's)."""
    index = {name: i for i, name in enumerate(names)}
    missing = [n for n in names if n not in saved["state"]]
    if missing and len(missing) < len(names):
        raise CheckpointError(f"the checkpoint's optimizer state has no entry for {missing[0]} (and "
                              f"{len(missing) - 1} more); was it saved for another model?")
    out = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    out["state"] = {index[n]: entry for n, entry in saved["state"].items() if n in index}
    if "param_groups" in saved:
        out["param_groups"] = [{**saved["param_groups"][0], "params": list(range(len(names)))}]
    return out
