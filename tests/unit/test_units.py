"""Sizes people write and read (stoker.units)."""

from __future__ import annotations

import pytest

from stoker.units import format_bytes, parse_bytes


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("1234", 1234), ("50GiB", 50 * 2**30), ("6.9GB", 6_900_000_000), ("500M", 500 * 10**6),
    ("1.5Ti", int(1.5 * 2**40)), (" 2 tb ", 2 * 10**12), (".5GB", 500_000_000), ("144MB", 144 * 10**6),
])
def test_a_size_is_read_in_decimal_or_binary_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "big", "6.9 gigs", "-1GB", "1e9", "GB", "1.2.3GB"])
def test_anything_else_is_refused_saying_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size: give bytes or a number with a unit \(50GiB"):
        parse_bytes(text)


def test_a_read_size_prints_back_in_binary_units() -> None:
    assert format_bytes(parse_bytes("50GiB")) == "50.0 GiB"
    assert format_bytes(parse_bytes("1.5Ti")) == "1.5 TiB"
