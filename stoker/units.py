"""Sizes for people: binary units, as kubectl and the chart write them, and sizes people write (pure)."""

from __future__ import annotations

import re

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_MULTIPLIERS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """`50GiB`, `6.9GB`, `500M`, `1.5Ti` or plain bytes, as bytes; raises ValueError saying what to write."""
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _MULTIPLIERS:
        raise ValueError(f"{text.strip()!r} is not a size: give bytes or a number with a unit (50GiB, 6.9GB, 500MiB, 2TB)")
    return int(float(match.group(1)) * _MULTIPLIERS[match.group(2).lower()])


def format_bytes(n: int | float | None, *, unknown: str = "unknown") -> str:
    """1536 -> '1.5 KiB', 2147483648 -> '2.0 GiB'; None -> `unknown`."""
    if n is None:
        return unknown
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_usage(used: int, budget: int) -> str:
    """'12.3 GiB/45.0 GiB' (budget 0: 'used/-')."""
    return f"{format_bytes(used)}/{format_bytes(budget) if budget else '-'}"
