"""Byte quantities as people write them (``24GiB``, ``256 GB``) and as the planner prints them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1,
          "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
GIB = 2 ** 30


def parse_bytes(text: str | int | float) -> int:
    """``"24GiB"`` -> 25769803776. Decimal (GB) and binary (GiB) units; a bare number is bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GiB, 256GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(n_bytes: float) -> str:
    """Bytes as GiB with two decimals: ``12.24 GiB``."""
    return f"{n_bytes / GIB:.2f} GiB"
