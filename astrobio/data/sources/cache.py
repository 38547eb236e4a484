"""The local download cache: one file per source URL, a sha256 sidecar, and a ``.part`` file while a
download is incomplete (kept across attempts and runs, so that the next one resumes with HTTP Range).

Layout, under :func:`cache_dir` (``$ASTROBIO_CACHE_DIR``, else ``$XDG_CACHE_HOME/astrobio``, else
``~/.cache/astrobio``)::

    <key>.<ext>             the complete download (key: sha256 of the URL, so no name leaks a secret)
    <key>.<ext>.sha256      "<hex digest>  <file name>", as sha256sum writes it (``sha256sum -c`` checks it)
    <key>.<ext>.part        the bytes received so far
    <key>.<ext>.part.json   {"validator": ETag or Last-Modified of the partial response} for If-Range
    <key>.<ext>.lock        held (flock) while one process checks or downloads the entry

A file whose sidecar is missing or does not match is not a cache hit: it is deleted and fetched again.
Processes sharing a cache (the ranks of a pipeline open the same --data URL) take the entry's lock
around the check and the download, so one downloads and the others then find a cache hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def cache_dir() -> Path:
    if os.environ.get("ASTROBIO_CACHE_DIR"):
        return Path(os.environ["ASTROBIO_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "astrobio"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """The cache files of one URL."""

    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".sha256")

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    @property
    def part_meta(self) -> Path:
        return self.path.with_name(self.path.name + ".part.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the entry across processes and threads (released when the file closes)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield

    def verified(self) -> bool:
        """True when the file and its sidecar exist and the file's sha256 is the recorded one; a file
        that fails the check is removed (with its sidecar) so that it is fetched again."""
        if not (self.path.is_file() and self.sidecar.is_file()):
            return False
        recorded = self.sidecar.read_text().split(maxsplit=1)[0] if self.sidecar.stat().st_size else ""
        if recorded == sha256_file(self.path):
            return True
        self.discard()
        return False

    def discard(self) -> None:
        for p in (self.path, self.sidecar):
            p.unlink(missing_ok=True)

    def part_size(self) -> int:
        return self.part.stat().st_size if self.part.is_file() else 0

    def part_validator(self) -> str | None:
        if not self.part_meta.is_file():
            return None
        return json.loads(self.part_meta.read_text()).get("validator")

    def start_part(self, validator: str | None) -> None:
        """Begins a fresh partial download (an empty .part and its validator)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.part.write_bytes(b"")
        self.part_meta.write_text(json.dumps({"validator": validator}))

    def drop_part(self) -> None:
        for p in (self.part, self.part_meta):
            p.unlink(missing_ok=True)

    def commit_part(self) -> str:
        """Moves the complete .part into place with its sidecar; returns the sha256."""
        digest = sha256_file(self.part)
        with open(self.part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.part, self.path)
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(f"{digest}  {self.path.name}\n")
        os.replace(tmp, self.sidecar)
        self.part_meta.unlink(missing_ok=True)
        return digest


def entry_for(key: str, suffix: str, root: Path | None = None) -> CacheEntry:
    """The entry of a source: ``key`` is the URL without credentials (hashed into the name), ``suffix``
    the file extension the readers dispatch on (``.csv``, ``.xml.gz``, ...)."""
    name = hashlib.sha256(key.encode()).hexdigest()[:32] + suffix
    return CacheEntry((root or cache_dir()) / name)
