"""Header validation: every malformed file is rejected with a reason that names the problem."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from stoker.agent import safetensors_header as sh
from stoker.agent.safetensors_header import HeaderError, HeaderProblem


def build(header: dict[str, Any], data: bytes, *, pad_to: int = 8) -> bytes:
    """A safetensors file from a raw header dict and data region (no validation)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % pad_to)
    return struct.pack("<Q", len(blob)) + blob + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def parse(blob: bytes) -> sh.Header:
    return sh.parse_header(blob, file_size_bytes=len(blob))


def rejected(blob: bytes) -> HeaderError:
    with pytest.raises(HeaderError) as info:
        parse(blob)
    return info.value


class TestValidFiles:
    def test_a_file_written_by_safetensors_is_read_with_its_layout(self, tmp_path):
        path = tmp_path / "m.safetensors"
        tensors = {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float16), "s": torch.tensor(1, dtype=torch.int64)}
        save_file(tensors, path, metadata={"format": "pt"})
        header = sh.read_header(path)
        assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
            "w": ("F32", (2, 3)),
            "b": ("F16", (3,)),
            "s": ("I64", ()),
        }
        assert header.metadata == {"format": "pt"}
        assert header.file_size_bytes == path.stat().st_size
        assert header.data_size_bytes == 24 + 6 + 8

    def test_tensors_come_back_ordered_by_offset_whatever_the_json_order(self):
        blob = build({"z": entry("U8", [2], 0, 2), "a": entry("U8", [3], 2, 5)}, b"\0" * 5)
        assert [t.name for t in parse(blob).tensors] == ["z", "a"]

    def test_zero_size_tensors_may_share_an_offset(self):
        blob = build(
            {"e1": entry("F32", [0, 4], 0, 0), "e2": entry("BF16", [0], 0, 0), "x": entry("U8", [1], 0, 1)}, b"\1"
        )
        assert [t.size_bytes for t in parse(blob).tensors] == [0, 0, 1]

    def test_a_file_without_tensors_is_valid_and_has_no_data(self):
        header = parse(build({"__metadata__": {"k": "v"}}, b""))
        assert header.tensors == () and header.data_size_bytes == 0 and header.metadata == {"k": "v"}

    @pytest.mark.parametrize("dtype", sorted(sh.DTYPE_ITEM_BYTES))
    def test_every_known_dtype_is_accepted_with_its_item_size(self, dtype):
        item = sh.DTYPE_ITEM_BYTES[dtype]
        header = parse(build({"t": entry(dtype, [3], 0, 3 * item)}, b"\0" * 3 * item))
        assert header.tensors[0].item_bytes == item and header.tensors[0].numel == 3

    def test_the_prefix_may_be_the_whole_file(self):
        blob = build({"t": entry("U8", [4], 0, 4)}, b"abcd")
        assert sh.parse_header(blob, file_size_bytes=len(blob)).data_offset == len(blob) - 4


class TestRejectedFiles:
    def test_a_file_shorter_than_the_length_prefix_is_truncated(self):
        err = rejected(b"\x10\x00")
        assert err.reason is HeaderProblem.TRUNCATED and "length prefix" in str(err)

    def test_a_header_longer_than_the_file_is_truncated(self):
        blob = build({"t": entry("U8", [4], 0, 4)}, b"abcd")
        with pytest.raises(HeaderError) as info:
            sh.parse_header(blob[:20], file_size_bytes=20)
        assert info.value.reason is HeaderProblem.TRUNCATED and "incomplete" in str(info.value)

    def test_data_cut_short_is_reported_as_truncated_naming_the_last_tensor(self):
        blob = build({"a": entry("F32", [2], 0, 8), "b": entry("F32", [4], 8, 24)}, b"\0" * 24)
        err = rejected(blob[:-5])
        assert err.reason is HeaderProblem.TRUNCATED
        assert err.tensor == "b" and "5 missing" in str(err) and "fetch it again" in str(err)

    def test_a_huge_header_length_is_refused_before_reading_it(self):
        err = rejected(struct.pack("<Q", 2**63) + b"{}")
        assert err.reason is HeaderProblem.HEADER_TOO_LARGE and str(2**63) in str(err)

    def test_the_header_cap_is_configurable(self):
        blob = build({"t": entry("U8", [1], 0, 1)}, b"x")
        with pytest.raises(HeaderError) as info:
            sh.parse_header(blob, file_size_bytes=len(blob), max_header_bytes=16)
        assert info.value.reason is HeaderProblem.HEADER_TOO_LARGE

    @pytest.mark.parametrize(
        "blob",
        [b'{"t": ', b"[1, 2]", b"\xef\xbb\xbf{}", b'{"__metadata__": {}, "__metadata__": {}}', b'{"\xff": 1}',
         b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}", b'{"x": ' + b"9" * 5000 + b"}", b'{"x": NaN}',
         b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', b"{} \x00"],
        ids=["invalid", "not-an-object", "byte-order-mark", "metadata-twice", "not-utf8", "deep-nesting", "huge-int",
             "nan", "lone-surrogate", "nul-after-object"],
    )
    def test_headers_that_are_not_a_json_object_are_rejected(self, blob):
        err = rejected(struct.pack("<Q", len(blob)) + blob)
        assert err.reason is HeaderProblem.BAD_JSON and "corrupt" in str(err)

    def test_an_unknown_dtype_names_the_tensor_and_the_dtype(self):
        err = rejected(build({"layer.q": entry("Q4_K", [2], 0, 1)}, b"\0"))
        assert err.reason is HeaderProblem.UNKNOWN_DTYPE and err.tensor == "layer.q"
        assert "'Q4_K'" in str(err) and "BF16" in str(err)

    def test_a_byte_count_that_does_not_match_the_shape_is_rejected(self):
        err = rejected(build({"w": entry("F32", [2, 2], 0, 12)}, b"\0" * 12))
        assert err.reason is HeaderProblem.SIZE_MISMATCH and err.tensor == "w" and "needs 16 bytes" in str(err)

    def test_overlapping_tensors_are_rejected_naming_both(self):
        blob = build({"a": entry("U8", [8], 0, 8), "b": entry("U8", [8], 4, 12)}, b"\0" * 12)
        err = rejected(blob)
        assert err.reason is HeaderProblem.OVERLAP and "'a'" in str(err) and "'b'" in str(err)

    def test_a_hole_between_tensors_is_rejected(self):
        err = rejected(build({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 6, 10)}, b"\0" * 10))
        assert err.reason is HeaderProblem.GAP and err.tensor == "b"

    def test_a_tensor_placed_beyond_the_file_is_out_of_range(self):
        err = rejected(build({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 400, 404)}, b"\0" * 8))
        assert err.reason is HeaderProblem.OUT_OF_RANGE and err.tensor == "b" and "beyond the end" in str(err)

    @pytest.mark.parametrize("offsets", [[8, 4], [-1, 3], [0], [0, 1.5], "0-4", [True, 1]])
    def test_malformed_offsets_are_out_of_range(self, offsets):
        err = rejected(build({"t": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}, b"\0" * 4))
        assert err.reason is HeaderProblem.OUT_OF_RANGE and err.tensor == "t"

    def test_bytes_after_the_last_tensor_are_rejected(self):
        err = rejected(build({"a": entry("U8", [4], 0, 4)}, b"\0" * 6))
        assert err.reason is HeaderProblem.TRAILING_BYTES and "2 bytes" in str(err)

    @pytest.mark.parametrize(
        "bad",
        [
            {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
            {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
            {"dtype": "F32", "shape": [1]},
            ["F32", [1]],
            "F32",
            {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]},
        ],
        ids=["negative-dim", "float-dim", "no-offsets", "short-sequence", "not-an-object",
             "dimension-beyond-int64"],
    )
    def test_malformed_tensor_entries_are_rejected_naming_the_tensor(self, bad):
        err = rejected(build({"t": bad}, b"\0" * 4))
        assert err.reason is HeaderProblem.BAD_ENTRY and err.tensor == "t"

    def test_metadata_must_map_strings_to_strings(self):
        err = rejected(build({"__metadata__": {"epoch": 3}}, b""))
        assert err.reason is HeaderProblem.BAD_ENTRY and "__metadata__" in str(err)

    def test_header_errors_are_value_errors_with_a_stable_reason(self):
        err = rejected(b"")
        assert isinstance(err, ValueError) and err.reason == "Truncated"

    def test_a_caller_passing_too_short_a_prefix_gets_told_how_much_to_pass(self):
        blob = build({"t": entry("U8", [1], 0, 1)}, b"x")
        with pytest.raises(ValueError, match="needs the first"):
            sh.parse_header(blob[:12], file_size_bytes=len(blob))

    def test_read_header_reports_a_truncated_download(self, tmp_path):
        path = tmp_path / "cut.safetensors"
        save_file({"w": torch.ones(64)}, path)
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(HeaderError) as info:
            sh.read_header(path)
        assert info.value.reason is HeaderProblem.TRUNCATED and info.value.tensor == "w"


def raw(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


F32x4 = b"\0" * 16
ENTRY = b'{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'


class TestWhatSafetensorsAccepts:
    """Each case was checked against safetensors 0.8 (`load_file`) by hand; `TestSameVerdictAsSafetensors`
    compares the two on generated headers."""

    @pytest.mark.parametrize("header", [
        b"  \n\t{\"a\": " + ENTRY + b"}",
        b"{\"a\": " + ENTRY + b"} \r\n",
        b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": {"x": [1]}}}',
        b"{\"a\": " + ENTRY + b", \"a\": " + ENTRY + b"}",
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": ' + ENTRY + b"}",
        b'{"a": ["F32", [4], [0, 16]]}',
        b'{"__metadata__": {"k": "1", "k": "2"}, "a": ' + ENTRY + b"}",
        b'{"__metadata__": null, "a": ' + ENTRY + b"}",
        b'{"\\u0061": ' + ENTRY + b"}",
    ], ids=["whitespace-before", "whitespace-after", "unknown-field", "same-tensor-twice", "tensor-twice-last-counts",
            "entry-as-sequence", "metadata-key-twice", "null-metadata", "escaped-name"])
    def test_files_that_safetensors_loads_are_accepted(self, header):
        parsed = parse(raw(header, F32x4))
        assert [(t.name, t.shape, t.size_bytes) for t in parsed.tensors] == [("a", (4,), 16)]

    def test_a_zero_size_tensor_may_have_huge_dimensions_below_2_63(self):
        header = json.dumps({"z": entry("F32", [0, 2**62, 2**62], 0, 0), "a": entry("F32", [4], 0, 16)}).encode()
        assert [t.name for t in parse(raw(header, F32x4)).tensors] == ["z", "a"]

    @pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 2**62, 0], [2**32, 2**32]])
    def test_a_dimension_torch_cannot_hold_or_an_overflowing_product_is_refused(self, shape):
        header = json.dumps({"z": entry("F32", shape, 0, 0), "a": entry("F32", [4], 0, 16)}).encode()
        err = rejected(raw(header, F32x4))
        assert err.tensor == "z" and err.reason in (HeaderProblem.BAD_ENTRY, HeaderProblem.SIZE_MISMATCH)

    def test_a_field_named_twice_in_an_entry_is_refused_once_not_wrapped(self):
        err = rejected(raw(b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', F32x4))
        assert err.reason is HeaderProblem.BAD_ENTRY and err.tensor == "a" and str(err).count("twice") == 1
        assert str(err).count("BadEntry") == 1

    @pytest.mark.parametrize("first", [
        b'{"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "dtype": "U8"}',
        b'{"dtype": "F32", "shape": [4]}',
        b'{"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}',
        b'["F32", [-1], [0, 16]]',
        b'"F32"',
    ], ids=["field-twice", "missing-offsets", "unknown-dtype", "negative-dimension", "not-an-entry"])
    def test_an_entry_replaced_by_a_later_one_of_the_same_name_must_still_be_an_entry(self, first):
        # serde decodes every value of a map, also one a repeated key then replaces, and safetensors refuses the file.
        err = rejected(raw(b'{"a": ' + first + b', "a": ' + ENTRY + b"}", F32x4))
        assert err.reason is HeaderProblem.BAD_ENTRY and err.tensor == "a"

    def test_packed_four_bit_values_need_an_even_last_dimension(self):
        assert parse(raw(json.dumps({"q": entry("F4", [3, 2], 0, 3)}).encode(), b"\0" * 3)).tensors[0].size_bytes == 3
        assert rejected(raw(json.dumps({"q": entry("F4", [2, 3], 0, 3)}).encode(), b"\0" * 3)).tensor == "q"


class TestNotSafetensors:
    def test_a_torch_zip_checkpoint_is_named_for_what_it_is(self, tmp_path):
        path = tmp_path / "model.ckpt"
        torch.save({"w": torch.zeros(4)}, path)
        with pytest.raises(HeaderError) as info:
            sh.read_header(path)
        assert info.value.reason is HeaderProblem.NOT_SAFETENSORS and "not a safetensors file" in str(info.value)
        assert "zip" in str(info.value) and "fetch it again" not in str(info.value)

    def test_a_legacy_pickle_is_named_for_what_it_is(self, tmp_path):
        path = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
        with pytest.raises(HeaderError) as info:
            sh.read_header(path)
        assert info.value.reason is HeaderProblem.NOT_SAFETENSORS and "pickle" in str(info.value)

    def test_an_html_error_page_is_not_called_a_truncated_download(self, tmp_path):
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>")
        with pytest.raises(HeaderError) as info:
            sh.read_header(path)
        assert info.value.reason is HeaderProblem.NOT_SAFETENSORS and "HTML" in str(info.value)

    def test_a_fifo_is_refused_without_blocking(self, tmp_path):
        import os

        fifo = tmp_path / "x.safetensors"
        os.mkfifo(fifo)
        with pytest.raises(HeaderError) as info:
            sh.read_header(fifo)  # an open() without O_NONBLOCK would hang here
        assert info.value.reason is HeaderProblem.NOT_A_FILE


# ----------------------------------------------------------------------------- differential

_ws = st.sampled_from([b"", b" ", b"\n", b"\t\r\n  "])
_dims = st.one_of(st.integers(0, 6), st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**32]))


@st.composite
def odd_headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Headers around the edges safetensors has rules for: whitespace, repeats, extra fields,
    sequences, huge dimensions, metadata shapes, packed dtypes."""
    n = draw(st.integers(0, 3))
    parts: list[bytes] = []
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(["U8", "F16", "F32", "F4", "BOOL", "F6_E2M3"]))
        shape = draw(st.lists(_dims, max_size=3))
        numel = math.prod(shape)
        bits = sh.DTYPE_BITS.get(dtype, 6)
        size = numel * bits // 8 if numel * bits < 2**40 else 0
        size = draw(st.sampled_from([size, size, size + 1]))
        name = draw(st.sampled_from([f"t{i}", "t0"]))
        fields = [b'"dtype": ' + json.dumps(dtype).encode(), b'"shape": ' + json.dumps(shape).encode(),
                  b'"data_offsets": ' + json.dumps([offset, offset + size]).encode()]
        if draw(st.booleans()):
            fields.append(draw(st.sampled_from([b'"extra": 1', b'"dtype": "U8"', b'"x": null'])))
        if draw(st.integers(0, 5)) == 0:
            body = b"[" + b", ".join(f.split(b": ", 1)[1] for f in fields[:3]) + b"]"
        else:
            body = b"{" + b", ".join(fields) + b"}"
        parts.append(json.dumps(name).encode() + b": " + body)
        offset += size
    meta = draw(st.sampled_from([None, b'{"a": "b"}', b"null", b'{"a": 1}', b"[]"]))
    if meta is not None:
        parts.insert(draw(st.integers(0, len(parts))), b'"__metadata__": ' + meta)
    header = draw(_ws) + b"{" + b", ".join(parts) + b"}" + draw(_ws)
    return header, bytes(min(offset, 1 << 16))


class TestSameVerdictAsSafetensors:
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(odd_headers())
    def test_stoker_accepts_exactly_what_safetensors_loads(self, tmp_path, case):
        from safetensors.torch import load_file

        header, data = case
        path = tmp_path / "case.safetensors"
        path.write_bytes(raw(header, data))
        try:
            load_file(path)
            theirs = True
        except Exception:  # noqa: BLE001 - any refusal, from safetensors or from torch below it
            theirs = False
        try:
            sh.read_header(path)
            ours = True
        except HeaderError:
            ours = False
        assert ours == theirs, f"safetensors {'loads' if theirs else 'refuses'} {header!r}"


# ----------------------------------------------------------------------------- properties

_dtypes = st.sampled_from(sorted(sh.DTYPE_ITEM_BYTES))
_shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=3)
_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__"
)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[str, str, list[int]]], bytes]:
    names = draw(st.lists(_names, max_size=8, unique=True))
    specs = [(n, draw(_dtypes), draw(_shapes)) for n in names]
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * sh.DTYPE_ITEM_BYTES[dtype]
        header[name] = entry(dtype, shape, offset, offset + size)
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(_names, st.text(max_size=5), max_size=3))
    pad = draw(st.sampled_from([1, 8]))
    return specs, build(header, bytes(offset), pad_to=pad)


class TestProperties:
    @given(layouts())
    def test_any_well_formed_layout_parses_back_to_the_same_tensors(self, layout):
        specs, blob = layout
        header = parse(blob)
        assert [(t.name, t.dtype, list(t.shape)) for t in header.tensors] == specs
        assert header.file_size_bytes == len(blob)

    @given(layouts())
    def test_parsed_tensors_tile_the_data_region_exactly(self, layout):
        _, blob = layout
        header = parse(blob)
        end = 0
        for t in header.tensors:
            assert t.begin == end and t.size_bytes == t.numel * t.item_bytes
            end = t.end
        assert header.data_offset + end == len(blob)

    @given(layouts(), st.data())
    def test_any_truncation_of_a_valid_file_is_rejected(self, layout, data):
        _, blob = layout
        cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
        with pytest.raises(HeaderError) as info:
            parse(blob[:cut])
        if cut >= parse(blob).data_offset:
            assert info.value.reason is HeaderProblem.TRUNCATED

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(layouts(), st.data())
    def test_corrupting_any_header_byte_gives_a_header_error_or_a_consistent_header(self, layout, data):
        _, blob = layout
        offset = data.draw(st.integers(min_value=0, max_value=parse(blob).data_offset - 1))
        value = data.draw(st.integers(min_value=0, max_value=255))
        corrupted = blob[:offset] + bytes([value]) + blob[offset + 1 :]
        try:
            header = parse(corrupted)
        except HeaderError:
            return
        assert header.file_size_bytes == len(corrupted)

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_never_raise_anything_but_a_header_error(self, blob):
        try:
            parse(blob)
        except HeaderError:
            pass
