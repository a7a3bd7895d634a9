"""Hostile files and names: a model file crafted to break the parser is refused before it is loaded
(its bytes never reach the loader or the cache), the wrong kind of file is refused for what it is,
and results of jobs with similar long names never meet in one file."""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Iterator

import pytest

from stoker.testing.model_server import ModelServer


def safetensors(header: object, data: bytes = b"", *, declared_length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_length is None else declared_length) + raw + data


TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
FILES = {
    "empty": b"",
    "huge-header-claim": safetensors({}, declared_length=2**60),
    "header-not-json": safetensors(b"{not json at all"),
    "header-not-an-object": safetensors([1, 2, 3]),
    "unknown-dtype": safetensors({"w": {**TENSOR, "dtype": "PICKLE"}}, b"\0" * 8),
    "offsets-beyond-the-file": safetensors({"w": {**TENSOR, "data_offsets": [0, 2**40]}}, b"\0" * 8),
    "overlapping-tensors": safetensors({"a": TENSOR, "b": {**TENSOR, "data_offsets": [4, 12]}}, b"\0" * 12),
    "shape-and-size-disagree": safetensors({"w": {**TENSOR, "shape": [1000]}}, b"\0" * 8),
    "truncated-data": safetensors({"w": TENSOR}, b"\0" * 4),
    "a-pickle": b"\x80\x04\x95" + b"cos\nsystem\n(S'touch /tmp/pwned'\ntR." * 4,
}


@pytest.fixture(scope="module")
def files(suite) -> Iterator[ModelServer]:  # type: ignore[no-untyped-def]
    with ModelServer({f"{name}.safetensors": data for name, data in FILES.items()}) as server:
        yield server


@pytest.mark.parametrize("name", list(FILES))
def test_a_crafted_model_file_is_refused_before_it_is_loaded_or_kept(suite, unharmed, files, name) -> None:  # type: ignore[no-untyped-def]
    model, job = suite.name("mc"), suite.name("job")
    suite.model(model, files.url(f"{name}.safetensors"))
    suite.job(job, model=model)
    st = suite.failed(job, "InvalidSafetensors", says="not a valid safetensors file")
    assert "discarded" in st["message"]
    status = suite.admin.get("CacheAgent", "agent-0")["status"]
    assert model not in {m["name"] for m in status.get("models", [])}  # never cached, never loaded
    assert not pathlib.Path("/tmp/pwned").exists()
    unharmed()


def test_a_lora_named_as_a_checkpoint_is_refused_for_what_it_is(suite, unharmed) -> None:  # type: ignore[no-untyped-def]
    model, job = suite.name("mc"), suite.name("job")
    suite.served_model(model, "tiny-lora")
    suite.job(job, model=model)
    suite.failed(job, "UnsupportedCheckpoint", says="SD 1.x and SDXL")
    unharmed()


def test_a_checkpoint_named_as_a_lora_is_refused_by_kind(suite, unharmed) -> None:  # type: ignore[no-untyped-def]
    lora, job = suite.name("mc"), suite.name("job")
    suite.served_model(lora, "tiny-sd15")  # a checkpoint ModelCache...
    suite.job(job, loras=[{"name": lora, "weight": 0.8}])  # ...used as a LoRA
    suite.failed(job, "InvalidModelKind", says="is a checkpoint, but the job uses it as a lora")
    unharmed()


def test_jobs_whose_long_names_share_a_prefix_get_results_of_their_own(suite, unharmed) -> None:  # type: ignore[no-untyped-def]
    prefix = "x" * 150
    names = [f"{prefix}-{i}-{suite.name('r')}" for i in range(2)]
    for name in names:
        suite.job(name, params={"seed": len(name)})
    locations = [suite.final(name)["result"]["location"] for name in names]
    assert all(suite.final(name)["phase"] == "Succeeded" for name in names)
    assert len(set(locations)) == 2 and all(len(pathlib.Path(loc).name) < 255 for loc in locations)
    assert all(pathlib.Path(loc).is_file() for loc in locations)
    unharmed()
