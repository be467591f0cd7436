"""Sizes as people write them (``512m``, ``2g``, ``1.5GiB``) and as RGrid shows them (binary
units, KiB/MiB/GiB, because every limit here is a power of two)."""

from __future__ import annotations

import re

from rgrid.core.errors import BadInput

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_bytes(text: str, what: str = "size") -> int:
    """``512m``, ``2g``, ``1.5GiB``, ``1024`` (bytes): Docker's suffixes, case-insensitive,
    always binary (``1g`` is 1 GiB, as ``docker run --memory`` reads it)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise BadInput(f"{what} must look like 512m or 2g, not {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def human_bytes(n: int) -> str:
    """``0 B``, ``2.0 KiB``, ``1.0 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_limit(n: int) -> str:
    """A limit, without a pointless ``.0``: ``1 GiB``, ``512 MiB``, ``1.5 GiB``."""
    return human_bytes(n).replace(".0 ", " ")
