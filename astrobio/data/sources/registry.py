"""The registry of data sources: one URI (what ``--data`` takes) -> one :class:`Source`.

==========================================  ==================================================
URI                                         source
==========================================  ==================================================
``builtin`` or ``builtin:...``              the built-in synthetic corpus (astrobio.data)
``path/to/file.ext``, ``file:///abs/path``  a local file; the format from its extension
``https://host/path?query``                 a download into the local cache (http.py registers it)
==========================================  ==================================================

Formats: ``text`` (.txt, .md), ``jsonl`` (.jsonl, .ndjson), ``csv`` (.csv), ``tsv`` (.tsv) and ``oec``
(the Open Exoplanet Catalogue, .xml or .xml.gz). A URI whose path has no such extension names its
format in the query (``format=csv``, as table services such as TAP take it) or in the options.

Options ride in the URI's fragment, which is never sent to a server: ``#format=csv&auth=basic&auth_env=MY_VAR``
(see auth.py for ``auth`` and ``auth_env``). New schemes plug in with :func:`register_scheme`.
"""

from __future__ import annotations

import csv
import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from astrobio.data.sources.auth import AUTH_KINDS, redact_uri
from astrobio.data.text import decode_utf8, gunzip_if_compressed, jsonl_objects, jsonl_records, text_records

FORMATS = ("text", "jsonl", "csv", "tsv", "oec")
EXTENSIONS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
              ".tsv": "tsv", ".xml": "oec"}  # each optionally followed by .gz (gzip is read by its magic bytes)
OPTION_KEYS = ("format", "auth", "auth_env")


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message names the source (redacted) and the fix."""


@dataclass(frozen=True)
class SourceOptions:
    """The options of a URI (its fragment)."""

    format: str = ""
    auth: str = "auto"
    auth_env: str = ""

    def format_for(self, path: str, query: str = "") -> str:
        """The format: the option, else the path's extension, else the query's ``format=``."""
        if self.format:
            return self.format
        by_extension = format_of_path(path)
        if by_extension:
            return by_extension
        asked = dict(parse_qsl(query)).get("format", "").lower()
        return asked if asked in FORMATS else ""


def parse_options(uri: str) -> tuple[str, SourceOptions]:
    """Splits ``uri#key=value&...`` into the URI and its options; unknown keys or values are errors."""
    base, _, fragment = uri.partition("#")
    options = dict(parse_qsl(fragment, keep_blank_values=True)) if fragment else {}
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise SourceError(f"unknown option {unknown[0]!r} in {redact_uri(uri)}; the options are "
                          f"{', '.join(OPTION_KEYS)} (as #format=csv&auth=bearer)")
    fmt = options.get("format", "").lower()
    if fmt and fmt not in FORMATS:
        raise SourceError(f"format={fmt!r} in {redact_uri(uri)} is not one of {', '.join(FORMATS)}")
    auth = options.get("auth", "auto").lower()
    if auth not in AUTH_KINDS:
        raise SourceError(f"auth={auth!r} in {redact_uri(uri)} is not one of {', '.join(AUTH_KINDS)}")
    return base, SourceOptions(fmt, auth, options.get("auth_env", ""))


def known_extension(path: str) -> str:
    """The extension of EXTENSIONS that ``path`` ends with, with a following ``.gz`` (``.csv.gz``), or ""."""
    name = path.lower()
    gz = ".gz" if name.endswith(".gz") else ""
    stem = name.removesuffix(gz)
    return next((ext + gz for ext in EXTENSIONS if stem.endswith(ext)), "")


def format_of_path(path: str) -> str:
    return EXTENSIONS.get(known_extension(path).removesuffix(".gz"), "")


def suffix_for(fmt: str, path: str) -> str:
    """The cache file's extension: the URL's own when it has a known one, else the format's."""
    return known_extension(path) or {"text": ".txt", "jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "oec": ".xml",
                                     "": ".data"}[fmt]


class Source(ABC):
    """One data source. ``name`` is safe to show (credentials redacted)."""

    name: str
    format: str

    @abstractmethod
    def fetch(self) -> bytes:
        """The raw bytes of the source."""

    @abstractmethod
    def records(self, seed: int = 0) -> list[str]:
        """The source as text records (documents) for the language model."""

    def rows(self) -> list[dict]:
        """The source as structured rows (dicts), for tables and catalogues."""
        raise SourceError(f"{self.name} ({self.format or 'unknown format'}) has no structured rows; "
                          "rows come from csv, tsv, jsonl and oec sources")


class FileSource(Source):
    """A local file; text, jsonl and oec records come from astrobio.data's readers."""

    def __init__(self, path: str | Path, fmt: str = "", display_name: str | None = None):
        self.path = Path(path)
        self.name = display_name or str(self.path)
        self.format = fmt or format_of_path(self.path.name)
        if not self.format:
            raise SourceError(f"cannot tell the format of {self.name}: its extension is none of "
                              f"{', '.join(EXTENSIONS)} (optionally .gz); add #format=<{'|'.join(FORMATS)}> to the URI")

    def __repr__(self) -> str:
        return f"FileSource({self.name!r}, format={self.format!r})"

    def fetch(self) -> bytes:
        if not self.path.is_file():
            raise SourceError(f"data file {self.name} does not exist; give an existing path, a URL or 'builtin'")
        return self.path.read_bytes()

    def text_bytes(self) -> bytes:
        return gunzip_if_compressed(self.fetch(), f"data file {self.name}")

    def records(self, seed: int = 0) -> list[str]:
        """By the source's format (its extension, or the #format option), not by the file's name."""
        if self.format in ("csv", "tsv"):
            return [row_text(row) for row in self.rows()]
        if not self.path.is_file():
            self.fetch()  # raises the clear error
        from astrobio.data.oec import oec_records

        return {"text": text_records, "jsonl": jsonl_records, "oec": oec_records}[self.format](self.path)

    def rows(self) -> list[dict]:
        if self.format in ("csv", "tsv"):
            return table_rows(self.text_bytes(), "\t" if self.format == "tsv" else ",", self.name)
        if self.format == "jsonl":
            source = f"data file {self.name}"
            return [item for _, item in jsonl_objects(decode_utf8(self.text_bytes(), source), source)]
        if self.format == "oec":
            from astrobio.data.catalogue import oec_planet_rows

            return oec_planet_rows(self.fetch())
        return super().rows()


class BuiltinSource(Source):
    """The built-in synthetic corpus; ``builtin`` or ``builtin:...`` as astrobio.data reads it."""

    format = "builtin"

    def __init__(self, uri: str):
        self.name = uri

    def __repr__(self) -> str:
        return f"BuiltinSource({self.name!r})"

    def records(self, seed: int = 0) -> list[str]:
        from astrobio.data import load_records

        return load_records(self.name, seed)

    def fetch(self) -> bytes:
        return "\n\n".join(self.records()).encode()

    def rows(self, seed: int = 0) -> list[dict]:
        """The catalogue rows of the planets of the systems ``records(seed)`` describes."""
        from astrobio.data.catalogue import builtin_planet_rows
        from astrobio.data.loader import BUILTIN_RECORDS

        count = self.name.partition(":")[2]
        return builtin_planet_rows(int(count) if count.isdigit() else BUILTIN_RECORDS, seed)


def table_rows(data: bytes, delimiter: str, name: str) -> list[dict]:
    """CSV/TSV with a header line; lines starting with ``#`` (comments some services add) are skipped."""
    text = data.decode("utf-8-sig", errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise SourceError(f"{name} holds no table: no header line")
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    return [{k: v for k, v in row.items() if k is not None} for row in reader]


def row_text(row: dict) -> str:
    """A table row as a text record: ``column: value`` lines, empty values left out."""
    return "\n".join(f"{k}: {v}" for k, v in row.items() if v not in ("", None))


SourceFactory = Callable[..., Source]
_SCHEMES: dict[str, SourceFactory] = {}


def register_scheme(scheme: str, factory: SourceFactory) -> None:
    """``factory(uri, options, **kwargs) -> Source`` serves URIs ``scheme://...`` (or ``scheme:...``)."""
    _SCHEMES[scheme.lower()] = factory


def schemes() -> list[str]:
    return sorted(_SCHEMES)


def open_source(uri: str | Path, **kwargs) -> Source:
    """The source a URI names. ``kwargs`` go to the scheme's factory (``policy=RetryPolicy(...)``,
    ``cache_root=...`` for HTTP)."""
    uri = str(uri)
    base, options = parse_options(uri)
    scheme = uri_scheme(base)
    if scheme is None:
        return FileSource(base, options.format)
    if scheme not in _SCHEMES:
        raise SourceError(f"no source serves {redact_uri(uri)}: unknown scheme {scheme!r}; the schemes are "
                          f"{', '.join(schemes())}, or give a local path")
    return _SCHEMES[scheme](base if scheme != "builtin" else uri, options, **kwargs)


def uri_scheme(uri: str) -> str | None:
    """``https://x`` -> https, ``builtin:n`` -> builtin, a plain path -> None."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    head = uri.split(":", 1)[0].lower()
    if head in _SCHEMES and (":" in uri or head == "builtin"):
        return head
    return None


def _open_file(uri: str, options: SourceOptions, **_) -> Source:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise SourceError(f"file URI {redact_uri(uri)} names host {parts.hostname!r}; write file:///absolute/path")
    return FileSource(unquote(parts.path), options.format)


def _open_builtin(uri: str, options: SourceOptions, **_) -> Source:
    return BuiltinSource(uri)


register_scheme("file", _open_file)
register_scheme("builtin", _open_builtin)
