"""Parse and validate safetensors headers.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then
the data region. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the start of the data region) plus an optional ``__metadata__``
map of strings.

``parse_header`` is pure: it takes the file's leading bytes and its size and either
returns a validated ``Header`` or raises ``HeaderError`` naming the problem and the
tensor. It accepts exactly the files that safetensors 0.8 loads into torch, as probed
file by file against ``safetensors.torch.load_file`` (the unit tests compare the two
on generated headers):

- JSON whitespace around the object, and the padding spaces safetensors writes;
- unknown fields in a tensor entry are ignored, and an entry may be the sequence
  ``[dtype, shape, data_offsets]``, as serde reads a struct;
- a tensor named twice: the last entry counts (serde fills a map); a field named twice
  inside an entry, or ``__metadata__`` twice, is refused; metadata keys named twice
  keep the last value; an entry a later one replaces must still have the form of one;
- an empty tensor whose dimensions multiply past 2**63 is accepted only if torch makes
  one of that shape (its stride rules are its own; this rare case asks it);
- refused: a header that is not UTF-8 or not JSON (NaN, lone surrogates, a byte-order
  mark), dtypes torch cannot hold, a dimension of 2**63 or more (torch's int64 sizes;
  safetensors then fails inside torch), shapes whose element or byte count overflows
  64 bits in safetensors' left-to-right product, byte counts other than shape x item
  size, offsets out of order, overlapping, with gaps, or not covering the data region
  exactly, and headers above 100 MB.

A file that is not safetensors at all (a pickle or a zip from ``torch.save``, GGUF, an
HTML error page) is told apart from a damaged one: ``NotSafetensors`` says what it
looks like, where a truncated download says fetch it again.

Speed: the JSON goes through the C decoder once; the exact (slow) duplicate-key rules
run only when cheap byte counts show a header could contain a duplicate. 20,000 tensors
parse within 2x of safetensors' own header parser (bench/loader_bench.py --header).

``read_header`` at the bottom is the one thin I/O wrapper; it opens only regular files
(a FIFO or device in a cache folder must not block a scan).
"""

from __future__ import annotations

import enum
import gc
import json
import math
import operator
import os
import stat
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from os import PathLike

#: Bytes of the little-endian u64 that precedes the JSON header.
LENGTH_PREFIX_BYTES = 8

#: safetensors itself refuses headers above 100 MB; so do we, before allocating them.
DEFAULT_MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype that safetensors defines and torch can hold. F4
#: packs two elements into a byte (torch's float4_e2m1fn_x2); F6_* have no torch dtype.
DTYPE_BITS: Mapping[str, int] = types.MappingProxyType(
    {
        "BOOL": 8,
        "F4": 4,
        "U8": 8,
        "I8": 8,
        "F8_E5M2": 8,
        "F8_E4M3": 8,
        "F8_E5M2FNUZ": 8,
        "F8_E4M3FNUZ": 8,
        "F8_E8M0": 8,
        "I16": 16,
        "U16": 16,
        "F16": 16,
        "BF16": 16,
        "I32": 32,
        "U32": 32,
        "F32": 32,
        "C64": 64,
        "I64": 64,
        "U64": 64,
        "F64": 64,
    }
)

_SERDE_DTYPES = frozenset(DTYPE_BITS) | {"F6_E2M3", "F6_E3M2"}
"""Every dtype safetensors 0.8 decodes (22); the F6 ones torch cannot hold, so no file may use them."""

#: Bytes per element of the whole-byte dtypes (F4, two elements per byte, is not listed).
DTYPE_ITEM_BYTES: Mapping[str, int] = types.MappingProxyType({k: v // 8 for k, v in DTYPE_BITS.items() if v >= 8})

_METADATA_KEY = "__metadata__"
_FIELDS = ("dtype", "shape", "data_offsets")
_U64_MAX = 2**64 - 1
_DIM_LIMIT = 2**63  # torch sizes are int64
_JSON_SPACE = b" \t\n\r"


class HeaderProblem(enum.StrEnum):
    """Why a header was rejected; stable values for logs, metrics and conditions."""

    TRUNCATED = "Truncated"
    NOT_SAFETENSORS = "NotSafetensors"
    HEADER_TOO_LARGE = "HeaderTooLarge"
    BAD_JSON = "BadJSON"
    BAD_ENTRY = "BadEntry"
    UNKNOWN_DTYPE = "UnknownDtype"
    SIZE_MISMATCH = "SizeMismatch"
    OVERLAP = "Overlap"
    GAP = "Gap"
    OUT_OF_RANGE = "OutOfRange"
    TRAILING_BYTES = "TrailingBytes"
    NOT_A_FILE = "NotARegularFile"


class HeaderError(ValueError):
    """A safetensors file is malformed; ``reason`` says how, ``tensor`` where (if known)."""

    def __init__(self, reason: HeaderProblem, message: str, *, tensor: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.tensor = tensor
        self.detail = message
        """The message without the reason in front."""


class TensorSpec(NamedTuple):
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
        """Bytes per addressable item: the alignment a view of this tensor needs (1 for F4 pairs)."""
        return max(1, DTYPE_BITS[self.dtype] // 8)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


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


# Signatures of files that are often mistaken for safetensors checkpoints.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive, as torch.save writes .ckpt/.pt/.bin checkpoints (pickled)"),
    (b"GGUF", "a GGUF file"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x89PNG", "a PNG image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<!", "an HTML page (an error or login page from the server?)"),
    (b"<html", "an HTML page (an error or login page from the server?)"),
    (b"<?xml", "an XML document (an error page from the server?)"),
)


def sniff_format(prefix: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes (None: unknown)."""
    head = bytes(prefix[:16])
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (a .ckpt/.pt/.bin checkpoint)"
    if head[:1] in (b"{", b"["):
        return "a JSON document"
    return None


def _not_safetensors(prefix: bytes, why: str) -> HeaderError:
    what = sniff_format(prefix)
    looks = f"it looks like {what}" if what else why
    return HeaderError(
        HeaderProblem.NOT_SAFETENSORS,
        f"this is not a safetensors file: {looks}; check spec.source.url and spec.format (only safetensors is "
        "supported; convert other formats to safetensors)",
    )


def _json_starts(prefix: bytes) -> bool | None:
    """Whether the bytes after the length prefix can start a JSON object (None: not known yet)."""
    rest = bytes(prefix[LENGTH_PREFIX_BYTES : LENGTH_PREFIX_BYTES + 64]).lstrip(_JSON_SPACE)
    if not rest:
        return None
    return rest[:1] == b"{"


def header_length(prefix: bytes, *, file_size_bytes: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> int:
    """The JSON header length N from the first 8 bytes (or more: the bytes after them tell a
    damaged safetensors file from another format), checked against the cap and file size."""
    if file_size_bytes < LENGTH_PREFIX_BYTES or len(prefix) < LENGTH_PREFIX_BYTES:
        if sniff_format(prefix) is not None:
            raise _not_safetensors(prefix, "")
        raise HeaderError(
            HeaderProblem.TRUNCATED,
            f"the file is {file_size_bytes} bytes, shorter than the {LENGTH_PREFIX_BYTES}-byte length prefix "
            "every safetensors file starts with; the download is incomplete or this is not a safetensors file, "
            "fetch it again",
        )
    length = int.from_bytes(prefix[:LENGTH_PREFIX_BYTES], "little")
    starts = _json_starts(prefix)
    if length > max_header_bytes:
        if starts is False or sniff_format(prefix) is not None:
            raise _not_safetensors(prefix, f"its first 8 bytes give a header length of {length} bytes")
        raise HeaderError(
            HeaderProblem.HEADER_TOO_LARGE,
            f"the header claims {length} bytes, above the {max_header_bytes}-byte limit; "
            "the file is corrupt or not a safetensors file",
        )
    if LENGTH_PREFIX_BYTES + length > file_size_bytes:
        if starts is False or (starts is None and sniff_format(prefix) is not None):
            raise _not_safetensors(prefix, "no JSON header follows its first 8 bytes")
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
    blob = bytes(prefix[LENGTH_PREFIX_BYTES:data_offset])
    # Tens of thousands of small objects, none of them in a cycle: the cyclic collector would
    # only rescan the process's heap (torch's included) again and again while they are made.
    collecting = gc.isenabled()
    gc.disable()
    try:
        raw = _decode_json(blob)
        metadata = _parse_metadata(raw.pop(_METADATA_KEY, None))
        specs = _parse_common(raw)
        if specs is None:  # something unusual: entry by entry, with a message naming what is wrong
            specs = [_parse_entry(name, entry) for name, entry in raw.items()]
            specs.sort(key=_layout_order)
        _check_layout(specs, data_size_bytes=file_size_bytes - data_offset)
    finally:
        if collecting:
            gc.enable()
    return Header(data_offset=data_offset, tensors=tuple(specs), metadata=types.MappingProxyType(metadata))


def _layout_order(spec: TensorSpec) -> tuple[int, int]:
    return (spec.begin, spec.end)


def _parse_common(raw: dict[str, Any]) -> list[TensorSpec] | None:
    """The usual header, checked column by column with C-level loops (a checkpoint has tens of
    thousands of tensors): objects with whole-byte dtypes, shapes with dimensions below 2**32
    and no zero, offsets tiling the data from 0. Returns the specs in layout order, or None for
    anything else (which `_parse_entry` then checks and explains)."""
    entries = list(raw.values())
    if not entries:
        return []
    try:
        if set(map(type, entries)) != _DICT:
            return None
        dtypes = [e["dtype"] for e in entries]
        shapes = [e["shape"] for e in entries]
        offsets = [e["data_offsets"] for e in entries]
        bits = list(map(DTYPE_BITS.get, dtypes))
    except (KeyError, TypeError):  # a field missing, an unhashable dtype
        return None
    if None in bits or min(bits) < 8 or set(map(type, shapes)) != _LIST:  # type: ignore[type-var]
        return None
    dims = [d for x in shapes for d in x]
    if dims and (set(map(type, dims)) != _INT or min(dims) < 1 or max(dims) >= 2**32):
        return None  # zero-size tensors, huge or odd dimensions: the exact rules
    counts = list(map(math.prod, shapes))
    if max(counts) > _U64_MAX // 64 or set(map(type, offsets)) != _LIST or set(map(len, offsets)) != _TWO:
        return None
    begins = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    if set(map(type, begins)) != _INT or set(map(type, ends)) != _INT:
        return None
    if list(map(_sub, ends, begins)) != [c * b // 8 for c, b in zip(counts, bits)]:
        return None
    names = list(raw)
    if begins[0] == 0 and begins[1:] == ends[:-1]:  # listed in layout order already (no gather needed)
        rows = zip(names, dtypes, map(tuple, shapes), begins, ends)
        return list(map(tuple.__new__, [TensorSpec] * len(names), rows))
    order = sorted(range(len(entries)), key=begins.__getitem__)
    starts = [begins[i] for i in order]
    stops = [ends[i] for i in order]
    if starts[0] != 0 or starts[1:] != stops[:-1]:
        return None
    rows = zip([names[i] for i in order], [dtypes[i] for i in order], [tuple(shapes[i]) for i in order], starts, stops)
    return list(map(tuple.__new__, [TensorSpec] * len(order), rows))


_DICT, _LIST, _INT, _TWO = {dict}, {list}, {int}, {2}
_sub = operator.sub


class _Object(dict):  # type: ignore[type-arg]
    """A decoded JSON object that remembers which of its keys appeared more than once."""

    __slots__ = ("repeated", "replaced")


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    repeated: set[str] = set()
    replaced: list[tuple[str, Any]] = []
    for key, value in pairs:
        if key in obj:
            repeated.add(key)
            replaced.append((key, obj[key]))
        obj[key] = value  # the last one counts, as serde fills a map
    obj.repeated = repeated
    obj.replaced = replaced
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _may_repeat_keys(blob: bytes, raw: dict[str, Any]) -> bool:
    """Whether the header could name a key twice (cheap counts): every key in the decoded objects
    is followed by one colon, so a colon more in the text is a key the decoding replaced (or a
    colon inside a string, or a nested object, which only costs the exact check). Escapes could
    spell a name differently, or as a string that is not Unicode, so any backslash means maybe."""
    if b"\\" in blob:
        return True
    keys = len(raw) + sum([len(v) for v in raw.values() if type(v) is dict])
    return blob.count(b":") != keys


def _decode_json(blob: bytes) -> dict[str, Any]:
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header is not valid UTF-8 ({err}); the file is corrupt") from err
    if not text.lstrip(" \t\n\r").startswith("{"):
        raise HeaderError(
            HeaderProblem.BAD_JSON,
            "the header is not a JSON object (it must start with '{'); the file is corrupt or not a safetensors file",
        )
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
        if not isinstance(raw, dict):
            raise HeaderError(HeaderProblem.BAD_JSON, "the header JSON is not an object; the file is corrupt")
        if _may_repeat_keys(blob, raw):
            raw = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_pairs)
            _check_repeats(raw)
    except RecursionError as err:
        raise HeaderError(HeaderProblem.BAD_JSON, "the header JSON is nested too deeply; the file is corrupt") from err
    except HeaderError:
        raise
    except ValueError as err:  # JSONDecodeError, constants, and integers too long to convert
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header is not valid JSON ({err}); the file is corrupt") from err
    return raw


def _check_repeats(raw: _Object) -> None:
    """serde's rules for keys named twice (see the module docstring), and strings that are not
    Unicode scalar values (lone surrogates from \\u escapes), which serde refuses."""
    if _METADATA_KEY in raw.repeated:
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header names {_METADATA_KEY} twice; the file is corrupt")
    for name, entry in raw.replaced:
        if name != _METADATA_KEY:
            _check_replaced(name, entry)
    for name, entry in raw.items():
        _check_text(name)
        if isinstance(entry, _Object):
            twice = entry.repeated.intersection(_FIELDS)
            if twice:
                raise HeaderError(
                    HeaderProblem.BAD_ENTRY,
                    f"tensor {name!r} names {sorted(twice)[0]} twice; the file is corrupt",
                    tensor=name,
                )
            if name == _METADATA_KEY:
                for key, value in entry.items():
                    _check_text(key)
                    if isinstance(value, str):
                        _check_text(value)


def _check_replaced(name: str, entry: Any) -> None:
    """A tensor entry that a later one of the same name replaces: serde still decodes it, so it
    must have the form of an entry (fields once each, a known dtype, a shape and two offsets of
    unsigned integers), though nothing else about it matters."""
    if isinstance(entry, _Object) and entry.repeated.intersection(_FIELDS):
        raise HeaderError(HeaderProblem.BAD_ENTRY, f"tensor {name!r} names "
                          f"{sorted(entry.repeated.intersection(_FIELDS))[0]} twice; the file is corrupt", tensor=name)
    if isinstance(entry, dict) and all(f in entry for f in _FIELDS):
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    elif isinstance(entry, list) and len(entry) == 3:
        dtype, shape, offsets = entry
    else:
        dtype = shape = offsets = None
    if not (type(dtype) is str and dtype in _SERDE_DTYPES and type(shape) is list
            and all(_is_index(d) and d <= _U64_MAX for d in shape) and type(offsets) is list and len(offsets) == 2
            and all(_is_index(o) and o <= _U64_MAX for o in offsets)):
        raise HeaderError(HeaderProblem.BAD_ENTRY, f"tensor {name!r} is named twice and its first entry is not a valid "
                          f"tensor entry ({entry!r:.200}); the file is corrupt", tensor=name)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HeaderError(HeaderProblem.BAD_JSON, f"the header holds a string that is not valid Unicode ({err.reason}); "
                          "the file is corrupt") from err


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
    return type(value) is int and value >= 0  # not bool, not float


def _parse_entry(name: str, entry: Any) -> TensorSpec:
    if type(entry) is dict or isinstance(entry, dict):
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except KeyError as err:
            raise HeaderError(
                HeaderProblem.BAD_ENTRY,
                f"tensor {name!r} has no {err.args[0]}; every tensor needs dtype, shape and data_offsets, got "
                f"{entry!r:.200}",
                tensor=name,
            ) from None
    elif isinstance(entry, list) and len(entry) == 3:
        dtype, shape, offsets = entry
    else:
        raise HeaderError(
            HeaderProblem.BAD_ENTRY,
            f"tensor {name!r} must be an object with dtype, shape and data_offsets, got {entry!r:.200}",
            tensor=name,
        )
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise HeaderError(
            HeaderProblem.UNKNOWN_DTYPE,
            f"tensor {name!r} has dtype {dtype!r:.40}, which is not one of {', '.join(DTYPE_BITS)}; "
            "convert the checkpoint to a supported dtype",
            tensor=name,
        )
    if type(shape) is not list:
        raise HeaderError(
            HeaderProblem.BAD_ENTRY,
            f"tensor {name!r} has shape {shape!r:.200}; a shape is a list of non-negative integers",
            tensor=name,
        )
    # safetensors multiplies left to right in u64 (a 0 ends the risk of overflow); torch holds int64 sizes.
    numel = 1
    last = len(shape) - 1
    for i, d in enumerate(shape):
        if type(d) is not int or d < 0:
            raise HeaderError(
                HeaderProblem.BAD_ENTRY,
                f"tensor {name!r} has shape {shape!r:.200}; a shape is a list of non-negative integers",
                tensor=name,
            )
        if (d // 2 if bits < 8 and i == last else d) >= _DIM_LIMIT:  # torch holds packed F4 two to an element
            raise HeaderError(
                HeaderProblem.BAD_ENTRY,
                f"tensor {name!r} has a dimension of {d}, not below 2**63; torch cannot hold it, the file is corrupt",
                tensor=name,
            )
        numel *= d
        if numel > _U64_MAX:
            raise HeaderError(
                HeaderProblem.SIZE_MISMATCH,
                f"tensor {name!r} has shape {shape!r:.200}, whose element count overflows 64 bits; the file is corrupt",
                tensor=name,
            )
    if numel == 0 and not _torch_can_shape_empty([*shape[:-1], shape[-1] // 2] if bits < 8 else shape):
        raise HeaderError(
            HeaderProblem.SIZE_MISMATCH,
            f"tensor {name!r} has shape {shape!r:.200}, whose strides overflow 64 bits (torch cannot make an empty "
            "tensor of that shape); the file is corrupt",
            tensor=name,
        )
    nbits = numel * bits
    if nbits > _U64_MAX:
        raise HeaderError(
            HeaderProblem.SIZE_MISMATCH,
            f"tensor {name!r} ({dtype}, shape {shape!r:.200}) would need more than 2**64 bits; the file is corrupt",
            tensor=name,
        )
    if bits < 8 and (not shape or shape[-1] % 2):
        raise HeaderError(
            HeaderProblem.SIZE_MISMATCH,
            f"tensor {name!r} ({dtype}, shape {shape!r:.200}) packs two values per byte and needs an even last "
            "dimension; the file is corrupt",
            tensor=name,
        )
    if not (type(offsets) is list and len(offsets) == 2 and _is_index(offsets[0]) and _is_index(offsets[1])) or (
        offsets[0] > offsets[1] or offsets[1] > _U64_MAX
    ):
        raise HeaderError(
            HeaderProblem.OUT_OF_RANGE,
            f"tensor {name!r} has data_offsets {offsets!r:.200}; they must be [begin, end] "
            "with 0 <= begin <= end; the file is corrupt",
            tensor=name,
        )
    begin, end = offsets
    if end - begin != nbits // 8:
        raise HeaderError(
            HeaderProblem.SIZE_MISMATCH,
            f"tensor {name!r} ({dtype}, shape {list(shape)}) needs {nbits // 8} bytes "
            f"but its data_offsets span {end - begin}; the file is corrupt",
            tensor=name,
        )
    return TensorSpec(name, dtype, tuple(shape), begin, end)


def _torch_can_shape_empty(shape: list[int]) -> bool:
    """Whether torch makes an empty tensor of `shape`, as safetensors asks it to. Its stride and
    size arithmetic for such shapes has rules of its own, so past 2**63 it is asked (rare: an
    empty tensor with huge dimensions)."""
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    if extent <= _DIM_LIMIT - 1:
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - the agent always has torch
        return True
    try:
        torch.empty(0, dtype=torch.uint8).reshape(shape)
    except RuntimeError:
        return False
    return True


def _check_layout(specs: list[TensorSpec], *, data_size_bytes: int) -> None:
    end = 0
    previous: TensorSpec | None = None
    for spec in specs:
        begin = spec.begin
        if begin != end:
            _layout_error(spec, previous, end, data_size_bytes)
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


def _layout_error(spec: TensorSpec, previous: TensorSpec | None, end: int, data_size_bytes: int) -> None:
    if spec.begin < end:
        assert previous is not None
        raise HeaderError(
            HeaderProblem.OVERLAP,
            f"tensor {spec.name!r} (bytes {spec.begin}-{spec.end}) overlaps tensor {previous.name!r} "
            f"(bytes {previous.begin}-{previous.end}); the file is corrupt",
            tensor=spec.name,
        )
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


# --- The one I/O function: reads the prefix and hands it to the pure parser. ---


def read_header(path: str | PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the safetensors file at ``path``.

    Raises ``HeaderError`` on any problem with the file (including truncation relative to the
    last tensor), ``OSError`` when it cannot be read at all.
    """
    fd = open_regular(path)
    try:
        return read_header_fd(fd, max_header_bytes=max_header_bytes)
    finally:
        os.close(fd)


def open_regular(path: str | PathLike[str]) -> int:
    """Open `path` read-only if it is a regular file (symlinks followed); never blocks on a FIFO.

    Raises ``HeaderError`` (NotARegularFile) for a FIFO, socket, device or directory, and
    OSError when it cannot be opened at all. The caller closes the fd."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise HeaderError(HeaderProblem.NOT_A_FILE, f"{os.fspath(path)} is not a regular file; remove it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_header_fd(fd: int, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Header:
    """Read and validate the header through an open fd (the same file the data will come from)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, LENGTH_PREFIX_BYTES + 64, 0)
    length = header_length(head, file_size_bytes=size, max_header_bytes=max_header_bytes)
    want = LENGTH_PREFIX_BYTES + length
    parts = [head[:want]]
    got = len(parts[0])
    while got < want:
        piece = os.pread(fd, want - got, got)
        if not piece:
            break  # the file shrank meanwhile: parse_header reports the truncation
        parts.append(piece)
        got += len(piece)
    blob = b"".join(parts)
    if len(blob) < want:
        raise HeaderError(HeaderProblem.TRUNCATED, f"the file ended at byte {len(blob)} inside its {length}-byte "
                          "header (it shrank while being read); fetch it again")
    return parse_header(blob, file_size_bytes=size, max_header_bytes=max_header_bytes)
