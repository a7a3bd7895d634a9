"""Parse and validate safetensors headers.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then
the data region. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the start of the data region) plus an optional ``__metadata__``
map of strings.

``parse_header`` is pure: it takes the file's leading bytes and its size and either
returns a validated ``Header`` or raises ``HeaderError`` naming the problem and the
tensor. Validation matches what safetensors itself enforces, so a file accepted here
loads there too: a size cap on the header, valid UTF-8 JSON, known dtypes, byte counts
equal to shape x item size, offsets sorted, contiguous and exactly covering the data
region. ``read_header`` at the bottom is the one thin I/O wrapper.
"""

from __future__ import annotations

import enum
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from os import PathLike

#: Bytes of the little-endian u64 that precedes the JSON header.
LENGTH_PREFIX_BYTES = 8

#: safetensors itself refuses headers above 100 MB; so do we, before allocating them.
DEFAULT_MAX_HEADER_BYTES = 100_000_000

#: Item size in bytes of every dtype safetensors defines with whole-byte elements.
DTYPE_ITEM_BYTES: Mapping[str, int] = types.MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E5M2": 1,
        "F8_E4M3": 1,
        "F8_E5M2FNUZ": 1,
        "F8_E4M3FNUZ": 1,
        "F8_E8M0": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "C64": 8,
        "I64": 8,
        "U64": 8,
        "F64": 8,
    }
)

_METADATA_KEY = "__metadata__"


class HeaderProblem(enum.StrEnum):
    """Why a header was rejected; stable values for logs, metrics and conditions."""

    TRUNCATED = "Truncated"
    HEADER_TOO_LARGE = "HeaderTooLarge"
    BAD_JSON = "BadJSON"
    BAD_ENTRY = "BadEntry"
    UNKNOWN_DTYPE = "UnknownDtype"
    SIZE_MISMATCH = "SizeMismatch"
    OVERLAP = "Overlap"
    GAP = "Gap"
    OUT_OF_RANGE = "OutOfRange"
    TRAILING_BYTES = "TrailingBytes"


class HeaderError(ValueError):
    """A safetensors file is malformed; ``reason`` says how, ``tensor`` where (if known)."""

    def __init__(self, reason: HeaderProblem, message: str, *, tensor: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.tensor = tensor


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor's place in the data region: bytes ``[begin, end)`` after ``data_offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def size_bytes(self) -> int:
        return self.end - self.begin

    @property
    def item_bytes(self) -> int:
        return DTYPE_ITEM_BYTES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Header:
    """A validated header. ``tensors`` are ordered by offset; they tile the data region."""

    data_offset: int
    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def data_size_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size_bytes(self) -> int:
        return self.data_offset + self.data_size_bytes


def header_length(prefix: bytes, *, file_size_bytes: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> int:
    """The JSON header length N from the first 8 bytes, checked against the cap and file size."""
    if file_size_bytes < LENGTH_PREFIX_BYTES or len(prefix) < LENGTH_PREFIX_BYTES:
        raise HeaderError(
            HeaderProblem.TRUNCATED,
            f"the file is {file_size_bytes} bytes, shorter than the {LENGTH_PREFIX_BYTES}-byte length prefix "
            "every safetensors file starts with; the download is incomplete or this is not a safetensors file, "
            "fetch it again",
        )
    length = int.from_bytes(prefix[:LENGTH_PREFIX_BYTES], "little")
    if length > max_header_bytes:
        raise HeaderError(
            HeaderProblem.HEADER_TOO_LARGE,
            f"the header claims {length} bytes, above the {max_header_bytes}-byte limit; "
            "the file is corrupt or not a safetensors file",
        )
    if LENGTH_PREFIX_BYTES + length > file_size_bytes:
        raise HeaderError(
            HeaderProblem.TRUNCATED,
            f"the header claims {length} bytes but the file has only {file_size_bytes - LENGTH_PREFIX_BYTES} "
            "after the length prefix; the download is incomplete, fetch it again",
        )
    return length


def parse_header(
    prefix: bytes, *, file_size_bytes: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> Header:
    """Validate a safetensors header given the file's first ``8 + N`` bytes (or more) and its size.

    Raises ``HeaderError`` on any problem, including a file shorter than its header says.
    """
    length = header_length(prefix, file_size_bytes=file_size_bytes, max_header_bytes=max_header_bytes)
    data_offset = LENGTH_PREFIX_BYTES + length
    if len(prefix) < data_offset:
        # A caller bug rather than a bad file: say exactly how much to pass.
        raise ValueError(f"parse_header needs the first {data_offset} bytes of the file, got {len(prefix)}")
    raw = _decode_json(bytes(prefix[LENGTH_PREFIX_BYTES:data_offset]))
    metadata = _parse_metadata(raw.pop(_METADATA_KEY, None))
    specs = sorted((_parse_entry(name, entry) for name, entry in raw.items()), key=lambda s: (s.begin, s.end))
    _check_layout(specs, data_size_bytes=file_size_bytes - data_offset)
    return Header(data_offset=data_offset, tensors=tuple(specs), metadata=types.MappingProxyType(metadata))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(
                HeaderProblem.BAD_JSON,
                f"the header names {key!r} twice; the file is corrupt, fetch it again",
                tensor=key,
            )
        out[key] = value
    return out


def _decode_json(blob: bytes) -> dict[str, Any]:
    if not blob.startswith(b"{"):
        raise HeaderError(
            HeaderProblem.BAD_JSON,
            "the header does not start with '{'; the file is corrupt or not a safetensors file",
        )
    try:
        raw = json.loads(blob.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError as err:
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header is not valid UTF-8 ({err}); the file is corrupt") from err
    except RecursionError as err:
        raise HeaderError(HeaderProblem.BAD_JSON, "the header JSON is nested too deeply; the file is corrupt") from err
    except ValueError as err:  # JSONDecodeError, and integers too long to convert
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(raw, dict):
        raise HeaderError(HeaderProblem.BAD_JSON, "the header JSON is not an object; the file is corrupt")
    return raw


def _parse_metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise HeaderError(
            HeaderProblem.BAD_ENTRY,
            f"{_METADATA_KEY} must map strings to strings; the file was written by a non-conforming tool",
        )
    return dict(raw)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: Any) -> TensorSpec:
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
        raise HeaderError(
            HeaderProblem.BAD_ENTRY,
            f"tensor {name!r} must be an object with exactly dtype, shape and data_offsets, got {entry!r:.200}",
            tensor=name,
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEM_BYTES:
        raise HeaderError(
            HeaderProblem.UNKNOWN_DTYPE,
            f"tensor {name!r} has dtype {dtype!r:.40}, which is not one of {', '.join(DTYPE_ITEM_BYTES)}; "
            "convert the checkpoint to a supported dtype",
            tensor=name,
        )
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise HeaderError(
            HeaderProblem.BAD_ENTRY,
            f"tensor {name!r} has shape {shape!r:.200}; a shape is a list of non-negative integers",
            tensor=name,
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)) or (
        offsets[0] > offsets[1]
    ):
        raise HeaderError(
            HeaderProblem.OUT_OF_RANGE,
            f"tensor {name!r} has data_offsets {offsets!r:.200}; they must be [begin, end] "
            "with 0 <= begin <= end; the file is corrupt",
            tensor=name,
        )
    spec = TensorSpec(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    expected = spec.numel * spec.item_bytes
    if spec.size_bytes != expected:
        raise HeaderError(
            HeaderProblem.SIZE_MISMATCH,
            f"tensor {name!r} ({dtype}, shape {list(shape)}) needs {expected} bytes "
            f"but its data_offsets span {spec.size_bytes}; the file is corrupt",
            tensor=name,
        )
    return spec


def _check_layout(specs: list[TensorSpec], *, data_size_bytes: int) -> None:
    end = 0
    previous: TensorSpec | None = None
    for spec in specs:
        if spec.begin < end:
            assert previous is not None
            raise HeaderError(
                HeaderProblem.OVERLAP,
                f"tensor {spec.name!r} (bytes {spec.begin}-{spec.end}) overlaps tensor {previous.name!r} "
                f"(bytes {previous.begin}-{previous.end}); the file is corrupt",
                tensor=spec.name,
            )
        if spec.begin > end:
            if spec.begin > data_size_bytes:
                raise HeaderError(
                    HeaderProblem.OUT_OF_RANGE,
                    f"tensor {spec.name!r} starts at data byte {spec.begin}, beyond the end of the file's "
                    f"{data_size_bytes}-byte data region; the file is corrupt",
                    tensor=spec.name,
                )
            raise HeaderError(
                HeaderProblem.GAP,
                f"tensor {spec.name!r} starts at data byte {spec.begin} but the previous tensor ends at {end}; "
                "safetensors requires tensors to be contiguous, the file is corrupt",
                tensor=spec.name,
            )
        end = spec.end
        previous = spec
    if end > data_size_bytes:
        assert previous is not None
        raise HeaderError(
            HeaderProblem.TRUNCATED,
            f"the header places tensor {previous.name!r} up to data byte {end} but the file holds only "
            f"{data_size_bytes} data bytes ({end - data_size_bytes} missing); the file is truncated, "
            "fetch it again",
            tensor=previous.name,
        )
    if end < data_size_bytes:
        raise HeaderError(
            HeaderProblem.TRAILING_BYTES,
            f"the file holds {data_size_bytes - end} bytes after the last tensor's data; "
            "safetensors rejects such files, fetch it again",
        )


# --- The one I/O function: reads the prefix and hands it to the pure parser. ---


def read_header(path: str | PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Raises ``HeaderError`` on any problem with the file (including truncation relative to the
    last tensor), ``OSError`` when it cannot be read at all.
    """
    with open(path, "rb") as f:
        size = _file_size(f)
        head = f.read(LENGTH_PREFIX_BYTES)
        length = header_length(head, file_size_bytes=size, max_header_bytes=max_header_bytes)
        body = f.read(length)
    return parse_header(head + body, file_size_bytes=size, max_header_bytes=max_header_bytes)


def _file_size(f: BinaryIO) -> int:
    f.seek(0, 2)
    size = int(f.tell())
    f.seek(0)
    return size
