"""Sizes for people: binary units, as kubectl and the chart write them (pure)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


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
