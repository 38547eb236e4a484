"""Checkpoints: ``checkpoints/step-N/``, atomic, checksummed and streamed (docs/ARCHITECTURE.md).

A checkpoint is a directory written under a temporary name, every file fsynced, then renamed into place:

    model.safetensors   the model's state dict (loadable on its own, e.g. for generation)
    state.safetensors   every other tensor (optimizer state, RNG states, ...)
    state.json          everything else, as JSON, with tensors referenced by name
    manifest.json       format version, step, and bytes + digest of each file above; written last

A pipeline run writes one part per stage instead of ``model.safetensors`` and the optimizer state:
``model-stage{k}.safetensors`` (that stage's parameters under the whole model's names) and
``optimizer-stage{k}.safetensors`` + ``.json`` (its optimizer state, keyed by parameter name); every
rank writes its part into the temporary directory, then rank 0 writes ``state.*`` and the manifest
(which lists every file) and renames. ``load_checkpoint`` merges the parts, so a checkpoint loads the
same whichever number of stages wrote it.

Data parallel (astrobio.optim.offload.OffloadEngine with ``replicas``): the replicas of a stage hold
the same weights but each only its slices of the optimizer state, so ``write_rank_part`` has replica 0
write ``model-stage{k}.safetensors`` and every replica its ``optimizer-stage{k}-replica{r}`` part (its
engine's ``state_dict()`` by parameter name: each entry a slice with its element ``range``); an
optimizer every replica holds whole goes to ``optimizer-stage{k}`` from replica 0. ``load_checkpoint``
merges only unsharded parts; an offload engine loads with ``load_offload_state(path, names,
engine.shard_ranges())``, which assembles exactly the elements the rank holds from whichever parts
(unsharded or replica slices, any stage and replica count) overlap them, copying them out of mapped
files (``map_tensors``): no rank reads or materialises another's state.

Loading verifies the manifest first and refuses a checkpoint with a missing, truncated or altered file.
Nothing is unpickled: tensors go through the safetensors format and the rest through JSON, so a
checkpoint from elsewhere is data, not a program. Non-string dict keys and tuples (optimizer state dicts
have both) are encoded explicitly so that a state dict comes back exactly as it was saved.

Big states are streamed, so a save or a load never holds a second copy of the state in host memory
(a 13B run's host memory is mostly that state): ``write_tensors`` writes the safetensors file tensor by
tensor, each in chunks of at most 64 MiB (a device tensor crosses to the host one chunk at a time),
hashing the bytes as they are written, so the manifest needs no second read; ``read_tensors`` maps the
file and returns tensors that are views of the mapping (copy-on-write: page cache until a consumer
copies them into place). Both add their bytes and seconds to an ``IoStats`` the caller passes, for the
GB/s in a run's summary.

The digest (format 2) is a chunked sha256, so that hashing runs on every core instead of one: the file
is cut into ``HASH_CHUNK`` pieces at fixed offsets, each piece's sha256 is computed on a pool of threads
(hashlib releases the GIL), and the file's digest is the sha256 of the pieces' digests in order. One
thread hashes ~0.5-1.7 GB/s (with or without the CPU's SHA instructions), slower than a disk can write;
a 13B checkpoint is ~53 GB. Verifying a checkpoint reads the pieces in parallel the same way. Format 1
checkpoints (a plain sha256 per file) still verify and load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astrobio.spec.adamw8bit import BLOCK_SIZE as BLOCK

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: a plain sha256 per file; 2: the chunked sha256 (module docstring)
HASH_CHUNK = 64 << 20  # bytes per hashed piece of a file (format 2)
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_PART = re.compile(r"^model(-stage\d+)?\.safetensors$")
OPTIMIZER_PART = re.compile(r"^optimizer-stage(\d+)\.json$")  # merged by load_checkpoint
OPTIMIZER_ANY = re.compile(r"^optimizer-stage(\d+)(-replica(\d+))?\.json$")  # read by load_offload_state
CHUNK_BYTES = 64 << 20  # the most a save holds of one tensor at once (on the host, beyond the tensor itself)
MAP_BYTES = 1 << 20  # a load maps tensors from this size up; smaller ones are read
# the safetensors format's dtype names
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


@dataclass
class IoStats:
    """Bytes moved and seconds spent by saves or loads (added up over the files)."""

    bytes: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else None

    def add(self, nbytes: int, seconds: float) -> None:
        self.bytes += nbytes
        self.seconds += seconds


@dataclass(frozen=True)
class FileRecord:
    """A file's manifest entry, known from writing it: its size and chunked sha256 (``digest_of``)."""

    bytes: int
    digest: str


def hash_threads() -> int:
    """Threads that hash pieces of checkpoint files: every core (a save or a load has the CPU to itself),
    at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def _piece_digest(views: list) -> bytes:
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return digest.digest()


def _combine(piece_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


class ChunkedSha256:
    """The format-2 digest of a byte stream fed in pieces of any size (``update``): every ``HASH_CHUNK``
    bytes are hashed on ``pool`` while the caller goes on writing; at most ``max_pending`` pieces are in
    flight (each holds references to the bytes it covers, e.g. a device tensor's host copy)."""

    def __init__(self, pool: ThreadPoolExecutor, max_pending: int):
        self.pool, self.max_pending = pool, max_pending
        self.views: list = []
        self.filled = 0
        self.pieces: list = []  # futures of the pieces' digests, in order
        self.waited = 0  # pieces[:waited] are known to be done

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), HASH_CHUNK - self.filled)
            self.views.append(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == HASH_CHUNK:
                self._submit()

    def _submit(self) -> None:
        while len(self.pieces) - self.waited >= self.max_pending:
            self.pieces[self.waited].result()
            self.waited += 1
        self.pieces.append(self.pool.submit(_piece_digest, self.views))
        self.views, self.filled = [], 0

    def hexdigest(self) -> str:
        if self.filled or not self.pieces:  # the last, shorter piece (or the one empty piece of an empty file)
            self._submit()
        return _combine([piece.result() for piece in self.pieces])


READ_BYTES = 4 << 20  # a thread verifying a piece reads it in buffers of this size


def _read_piece_digest(path: Path, index: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(index * HASH_CHUNK)
        left = HASH_CHUNK
        while left and (buffer := f.read(min(READ_BYTES, left))):
            digest.update(buffer)
            left -= len(buffer)
    return digest.digest()


def digests_of(paths: list[Path]) -> dict[Path, str]:
    """The format-2 digest of each file, every piece of every file hashed on one pool of threads."""
    counts = {path: max(1, math.ceil(path.stat().st_size / HASH_CHUNK)) for path in paths}
    jobs = [(path, i) for path in paths for i in range(counts[path])]
    with ThreadPoolExecutor(hash_threads(), thread_name_prefix="astrobio-hash") as pool:
        pieces = list(pool.map(lambda job: _read_piece_digest(*job), jobs))
    out, start = {}, 0
    for path in paths:
        out[path] = _combine(pieces[start:start + counts[path]])
        start += counts[path]
    return out


def digest_of(path: Path) -> str:
    """A file's format-2 digest (the chunked sha256 of the module docstring)."""
    return digests_of([path])[path]


# ----------------------------------------------------------------------------- safetensors, streamed

def _byte_chunks(t: torch.Tensor) -> Iterator[np.ndarray]:
    """The tensor's bytes in order, at most CHUNK_BYTES at a time, as host arrays (a device tensor is
    copied over one chunk at a time; a non-contiguous tensor is made contiguous first)."""
    flat = t.detach().reshape(-1)
    step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        if part.device.type != "cpu":
            part = part.to("cpu")
        yield part.view(torch.uint8).numpy()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], stats: IoStats | None = None) -> FileRecord:
    """Write ``tensors`` as a safetensors file, streamed; returns its size and digest. Tensors are laid
    out widest dtype first (then by name), so every tensor starts aligned to its element size and
    ``read_tensors`` can view it in place."""
    started = time.perf_counter()
    order = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header, offset = {}, 0
    for name, t in order:
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"cannot store {name} of dtype {t.dtype} in a checkpoint; "
                            f"supported: {', '.join(str(d) for d in DTYPE_NAMES)}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    pieces = itertools.chain((struct.pack("<Q", len(blob)), blob), (c for _, t in order for c in _byte_chunks(t)))
    # the bytes are hashed on every core while they are written (hashing and writing release the GIL)
    threads = hash_threads()
    with open(path, "wb") as f, ThreadPoolExecutor(threads, thread_name_prefix="astrobio-hash") as hasher:
        digest = ChunkedSha256(hasher, max_pending=threads)
        for piece in pieces:
            digest.update(piece)
            f.write(piece)
        hexdigest = digest.hexdigest()
        f.flush()
        os.fsync(f.fileno())
    size = 8 + len(blob) + offset
    if stats is not None:
        stats.add(size, time.perf_counter() - started)
    return FileRecord(size, hexdigest)


def read_tensors(path: Path, stats: IoStats | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views of a copy-on-write mapping of it (writing to one
    never changes the file). Raises CheckpointError on a malformed file."""
    started = time.perf_counter()
    size = path.stat().st_size
    try:
        start, header = _header(path, size)
        with open(path, "rb") as f:
            tensors = {name: _tensor(path, f, start, entry) for name, entry in header.items()}
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    if stats is not None:
        stats.add(size, time.perf_counter() - started)
    return tensors


def _header(path: Path, size: int) -> tuple[int, dict]:
    """(where the data starts, the header's tensor entries) of a safetensors file of ``size`` bytes,
    checked: the tensors tile the data, which fills the file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size}")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    spans = sorted((entry["data_offsets"], name) for name, entry in header.items())
    end = 0
    for (begin, stop), name in spans:
        if begin != end or stop < begin:
            raise ValueError(f"{name} occupies bytes {begin}-{stop}, expected to start at {end}")
        end = stop
    if start + end != size:
        raise ValueError(f"the tensors cover {end} bytes but the file has {size - start} after its header")
    return start, header


def map_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one copy-on-write mapping of the whole file: nothing
    is read until a view's elements are (a rank resharding an optimizer state touches its own only)."""
    size = path.stat().st_size
    try:
        start, header = _header(path, size)
        whole = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        tensors = {}
        for name, entry in header.items():
            dtype = DTYPES[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            raw = whole[start + begin:start + stop]
            if (start + begin) % raw.new_empty(0, dtype=dtype).element_size():  # laid out by another writer
                raw = raw.clone()
            tensors[name] = raw.view(dtype).view(entry["shape"])
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    return tensors


def _tensor(path: Path, f, start: int, entry: dict) -> torch.Tensor:
    """One tensor of the file: a small one read into its own memory, a large one a mapping of its own
    (storage offset 0: some consumers, e.g. ``torch.set_rng_state``, read a tensor's storage from its
    start)."""
    dtype = DTYPES[entry["dtype"]]
    begin, stop = entry["data_offsets"]
    if stop - begin < MAP_BYTES:
        f.seek(start + begin)
        raw = torch.frombuffer(bytearray(f.read(stop - begin)), dtype=torch.uint8) if stop > begin else \
            torch.empty(0, dtype=torch.uint8)
    else:
        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=start + begin, shape=(stop - begin,)))
        if raw.data_ptr() % raw.new_empty(0, dtype=dtype).element_size():  # laid out by another writer
            raw = raw.clone()
    return raw.view(dtype).view(entry["shape"])


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


def sha256_of(path: Path) -> str:
    """A file's plain sha256 (the digest of format-1 checkpoints)."""
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
               state: dict, stats: IoStats | None = None) -> dict[str, FileRecord]:
    """``model_file`` (when given) and ``{stem}.safetensors`` + ``{stem}.json`` (the state's tensors and
    the rest) into ``directory``; returns the manifest entries of the files it wrote."""
    records = {}
    if model_file is not None:
        records[model_file] = write_tensors(directory / model_file, model_state, stats)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode_tree(state, tensors)
    records[f"{stem}.safetensors"] = write_tensors(directory / f"{stem}.safetensors", tensors, stats)
    write_json(directory / f"{stem}.json", skeleton)
    return records


def step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


class Checkpointer:
    """Saves, lists, verifies and loads the checkpoints under ``root`` (``output_dir/checkpoints``)."""

    def __init__(self, root: str | os.PathLike, keep_last_k: int):
        self.root = Path(root)
        self.keep_last_k = keep_last_k
        self.save_io = IoStats()  # every save's tensor files, unless a save is given stats of its own

    def save(self, step: int, model_state: dict[str, torch.Tensor], state: dict, stats: IoStats | None = None) -> Path:
        """Writes ``step-N`` atomically, then deletes all but the newest ``keep_last_k`` checkpoints;
        ``stats`` (when given) gets the bytes and seconds of the tensor files."""
        tmp = self.begin(step)
        records = write_part(tmp, MODEL_FILE, model_state, STATE_FILE[:-len(".json")], state,
                             self.save_io if stats is None else stats)
        return self.finish(tmp, step, records)

    def begin(self, step: int) -> Path:
        """The empty temporary directory of ``step-N`` (one process calls this, before any part is written)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def finish(self, tmp: Path, step: int, known: dict[str, FileRecord] | None = None) -> Path:
        """Manifest over every file written into ``tmp``, then the rename and the pruning. ``known``: the
        records of files this process wrote (not read again); other files (e.g. other pipeline ranks'
        parts) are hashed here, in parallel."""
        known = known or {}
        paths = sorted(p for p in tmp.iterdir() if p.is_file())
        for file in paths:
            if file.name not in known:
                fsync_path(file)
        digests = digests_of([p for p in paths if p.name not in known])
        files = {}
        for file in paths:
            record = known.get(file.name)
            if record is not None and record.bytes != file.stat().st_size:
                raise CheckpointError(f"{file} has {file.stat().st_size} bytes but {record.bytes} were written")
            files[file.name] = ({"bytes": record.bytes, "digest": record.digest} if record is not None else
                                {"bytes": file.stat().st_size, "digest": digests[file]})
        write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step,
                                    "hash": {"name": "sha256-chunked", "chunk_bytes": HASH_CHUNK}, "files": files})
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
    """The manifest, after checking every file it lists against its size and digest."""
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
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} has format {fmt}; this version reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    if fmt == 2 and manifest.get("hash") != {"name": "sha256-chunked", "chunk_bytes": HASH_CHUNK}:
        raise CheckpointError(f"checkpoint {path} has an unknown digest {manifest.get('hash')} in {MANIFEST}")
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
    names = sorted(files)
    if fmt == 1:
        with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:  # hashlib releases the GIL
            found = dict(zip(names, pool.map(sha256_of, [path / name for name in names])))
    else:
        found = {p.name: digest for p, digest in digests_of([path / name for name in names]).items()}
    key = "sha256" if fmt == 1 else "digest"
    for name in names:
        if found[name] != files[name].get(key):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its digest in "
                                  f"{MANIFEST}")
    return manifest


def load_checkpoint(path: str | os.PathLike, stats: IoStats | None = None) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(model state dict, training state, step) of a verified checkpoint, on the CPU; the parts of a
    pipeline checkpoint merged (the model's by name, the optimizer's into ``state["optimizer"]``).
    Tensors are copy-on-write views of the files (``read_tensors``). ``stats`` (when given) gets the
    bytes of the checkpoint and the seconds of verifying (every byte read and hashed) and mapping it."""
    path = Path(path)
    started = time.perf_counter()
    manifest = verify(path)
    try:
        model_state = {}
        for name in sorted(n for n in manifest["files"] if MODEL_PART.match(n)):
            model_state.update(read_tensors(path / name))
        state = read_part(path, STATE_FILE[:-len(".json")])
        for name in sorted(n for n in manifest["files"] if OPTIMIZER_PART.match(n)):
            merge_optimizer(state, read_part(path, name[:-len(".json")]))
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if stats is not None:
        stats.add(sum(entry["bytes"] for entry in manifest["files"].values()), time.perf_counter() - started)
    return model_state, state, manifest["step"]


def read_part(path: Path, stem: str):
    return decode_tree(json.loads((path / f"{stem}.json").read_text()), read_tensors(path / f"{stem}.safetensors"))


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


# ----------------------------------------------------------------------------- data-parallel parts

def optimizer_part(stage: int, replica: int | None = None) -> str:
    """The stem of a stage's optimizer part: ``optimizer-stage{stage}``, or one replica's slices of a
    sharded offload engine's state, ``optimizer-stage{stage}-replica{replica}``."""
    return f"optimizer-stage{stage}" if replica is None else f"optimizer-stage{stage}-replica{replica}"


def write_rank_part(directory: Path, stage: int, replica: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict, sharded: bool, stats: IoStats | None = None) -> dict[str, FileRecord]:
    """One rank's files of a data-parallel x pipeline checkpoint, into the temporary ``directory``: replica
    0 writes the stage's weights (``model-stage{stage}.safetensors``: the replicas hold the same); the
    optimizer state (by parameter name, ``optimizer_by_name``) goes to ``optimizer-stage{stage}`` from
    replica 0 alone when every replica holds the same, or, ``sharded`` (an OffloadEngine with replicas:
    each holds its slices), to ``optimizer-stage{stage}-replica{replica}`` from every replica. Returns the
    manifest entries of the files it wrote."""
    model_file = f"model-stage{stage}.safetensors" if replica == 0 else None
    if sharded:
        return write_part(directory, model_file, model_state, optimizer_part(stage, replica), optimizer_state, stats)
    if replica == 0:
        return write_part(directory, model_file, model_state, optimizer_part(stage), optimizer_state, stats)
    return {}


def map_part(path: Path, stem: str):
    """A part's tree with its tensors as views of the mapped file (``map_tensors``)."""
    return decode_tree(json.loads((path / f"{stem}.json").read_text()), map_tensors(path / f"{stem}.safetensors"))


def offload_sources(path: Path) -> list[dict]:
    """The by-name optimizer states of a checkpoint's parts, mapped: every ``optimizer-stage*`` part
    (unsharded or one replica's), else the one in ``state.json`` (a one-process checkpoint)."""
    stems = sorted(p.name[:-len(".json")] for p in path.iterdir() if OPTIMIZER_ANY.match(p.name))
    if stems:
        return [map_part(path, stem) for stem in stems]
    state = map_part(path, STATE_FILE[:-len(".json")])
    if state.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    return [state["optimizer"]]


ELEMENTWISE = ("master", "exp_avg", "exp_avg_sq")  # one value per element of the parameter
BLOCKWISE = ("absmax1", "absmax2")  # one value per block of 256 elements


def load_offload_state(path: str | os.PathLike, names: list[str], ranges: dict[int, tuple[int, int]]) -> dict:
    """An OffloadEngine state for this rank (``engine.load_state_dict``), resharded from the checkpoint
    at ``path`` whatever the stage and replica counts that wrote it: ``names`` are the engine's parameter
    names in its order, ``ranges`` its ``shard_ranges()`` (index -> the elements (lo, hi) it holds). Each
    entry is assembled from the saved pieces that overlap it (unsharded parts hold whole parameters,
    replica parts slices with their ``range``), copying only those elements out of the mapped files, so a
    rank never reads another's state. Verify the checkpoint first (``load_checkpoint`` does)."""
    path = Path(path)
    sources = offload_sources(path)
    first = sources[0]
    for source in sources:
        if source.get("accumulation") is not None:
            raise CheckpointError(f"checkpoint {path} was saved inside an optimizer step (it holds accumulators); "
                                  f"only a state saved between steps can be resharded")
        if source.get("master_weights") != first.get("master_weights") or source.get("masters") != first.get("masters"):
            raise CheckpointError(f"checkpoint {path}: its optimizer parts disagree on the master weights")
    pieces: dict[str, list[tuple[int, int, dict]]] = {}
    for source in sources:
        for name, entry in source["state"].items():
            lo, hi = entry.get("range", (0, entry["exp_avg"].numel()))
            pieces.setdefault(name, []).append((int(lo), int(hi), entry))
    state = {i: assemble(path, names[i], lo, hi, pieces.get(names[i], [])) for i, (lo, hi) in ranges.items()}
    return {**{k: first[k] for k in ("hyperparameters", "master_weights", "accum_dtype", "skipped_steps")},
            "masters": first.get("masters", "saved"), "state": state, "accumulation": None}


def assemble(path: Path, name: str, lo: int, hi: int, pieces: list[tuple[int, int, dict]]) -> dict:
    """Parameter ``name``'s state for its elements ``lo``..``hi`` from the saved ``pieces`` (lo, hi, entry)."""
    out: dict = {"range": [lo, hi]}
    covered = lo
    for plo, phi, entry in sorted(pieces, key=lambda piece: piece[0]):
        start, stop = max(lo, plo), min(hi, phi)
        if start >= stop:
            continue
        if start != covered:
            break  # a gap (reported below) or a piece overlapping what is already taken
        if (start - lo) % BLOCK or (start - plo) % BLOCK:
            raise CheckpointError(f"checkpoint {path}: the saved slice {plo}..{phi} of {name}'s optimizer state "
                                  f"and the wanted {lo}..{hi} do not meet on a block of {BLOCK} elements, so its "
                                  f"8-bit moments cannot be split there (a checkpoint from another layout version?)")
        if "step" in out and out["step"] != entry["step"]:
            raise CheckpointError(f"checkpoint {path}: the slices of {name}'s optimizer state have different step "
                                  f"counts ({out['step']} and {entry['step']})")
        out["step"] = entry["step"]
        for key in ELEMENTWISE + BLOCKWISE:
            if key not in entry:
                continue
            value = entry[key].reshape(-1)
            whole_length = hi - lo if key in ELEMENTWISE else -(-(hi - lo) // BLOCK)
            target = out.setdefault(key, torch.empty(whole_length, dtype=value.dtype))
            if key in ELEMENTWISE:
                target[start - lo:stop - lo].copy_(value[start - plo:stop - plo])
            else:
                blocks = -(-(stop - start) // BLOCK)
                target[(start - lo) // BLOCK:(start - lo) // BLOCK + blocks].copy_(
                    value[(start - plo) // BLOCK:(start - plo) // BLOCK + blocks])
        covered = stop
    if covered != hi:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state for elements {covered}..{hi} of {name} "
                              f"(a replica's part missing, or saved for another model?)")
    return out
