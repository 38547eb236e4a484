"""Plain-text and JSONL record files (optionally gzip-compressed).

A ``.txt`` file holds records separated by blank lines; a ``.jsonl`` file holds one JSON object per
line with a string field ``"text"``. Files must be UTF-8. Every error names the file (and the line).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def gunzip_if_compressed(data: bytes, source: str) -> bytes:
    """``data`` decompressed when it starts with the gzip magic, else as it is; ``source`` names it in errors."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as err:
        raise ValueError(f"{source}: corrupt gzip data ({err})") from None


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text; ``source`` names it in the error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not UTF-8 text (bad byte at offset {err.start})") from None


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``, decompressed when it is gzip data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return decode_utf8(gunzip_if_compressed(path.read_bytes(), f"data file {path}"), f"data file {path}")


def text_records(path: str | Path) -> list[str]:
    """The blank-line-separated records of a text file, stripped; refuses a file with none."""
    text = read_text_file(path).replace("\r\n", "\n")
    records = [r.strip() for r in _BLANK_LINES.split(text)]
    records = [r for r in records if r]
    if not records:
        raise ValueError(f"data file {path} is empty: it holds no text records")
    return records


def jsonl_objects(text: str, source: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of JSONL text. Every line must be a JSON object; the
    error names ``source`` and the line."""
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}, line {number}: not valid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(item, dict):
            raise ValueError(f"{source}, line {number}: expected a JSON object, got {line[:60]!r}")
        objects.append((number, item))
    return objects


def jsonl_records(path: str | Path) -> list[str]:
    """The ``"text"`` field of each line of a JSONL file; blank lines are skipped, empty texts too."""
    records = []
    for number, item in jsonl_objects(read_text_file(path), f"data file {path}"):
        if not isinstance(item.get("text"), str):
            raise ValueError(f'data file {path}, line {number}: expected a JSON object with a string field "text", '
                             f"got {json.dumps(item)[:60]!r}")
        if item["text"].strip():
            records.append(item["text"])
    if not records:
        raise ValueError(f'data file {path} is empty: it holds no record with a non-empty "text"')
    return records
