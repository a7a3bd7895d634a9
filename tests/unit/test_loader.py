"""The loader returns exactly what safetensors returns, as views into one buffer."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from stoker.agent import loader as loader_mod
from stoker.agent.loader import (
    CpuStrategy,
    DeviceOutOfMemory,
    FileIdentity,
    LoadedModel,
    Loader,
    LoaderError,
    LoadOptions,
    LoadSource,
    load_file,
)
from stoker.agent.safetensors_header import DTYPE_ITEM_BYTES, HeaderError, HeaderProblem
from stoker.testing.page_cache import evict_from_page_cache

has_cuda = torch.cuda.is_available()
gpu = pytest.mark.gpu

# Every CPU way of loading: both strategies, with and without O_DIRECT, and a pinned read.
CPU_MODES = [
    pytest.param({"cpu_strategy": "read"}, id="read"),
    pytest.param({"cpu_strategy": "read", "direct_io": True}, id="read-direct"),
    pytest.param({"cpu_strategy": "mmap"}, id="mmap"),
    pytest.param({"cpu_strategy": "read", "pin_memory": True}, id="read-pinned"),
]
SMALL_CHUNKS = {"chunk_bytes": 8192, "reader_threads": 3}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (covers NaNs and every bit pattern)."""
    numel = 1
    for d in shape:
        numel *= d
    item = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * item,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_as_safetensors(model: LoadedModel, path: Path) -> None:
    expected = st_load_file(path)
    assert set(model.tensors) == set(expected)
    names = sorted(expected)
    if all(model.tensors[n].dtype == expected[n].dtype and model.tensors[n].shape == expected[n].shape for n in names):
        got_all = torch.cat([as_bytes(model.tensors[n]) for n in names]) if names else torch.empty(0, dtype=torch.uint8)
        want_all = torch.cat([as_bytes(expected[n]) for n in names]) if names else torch.empty(0, dtype=torch.uint8)
        if torch.equal(got_all, want_all):
            return
    for name, want in expected.items():  # find and name the first difference
        got = model.tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(as_bytes(got), as_bytes(want)), name


def write_raw(path: Path, tensors: list[tuple[str, str, list[int], bytes]], *, pad_to: int = 8) -> Path:
    """A safetensors file with tensors in exactly this order (safetensors itself sorts by alignment)."""
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % pad_to)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(t[3] for t in tensors))
    return path


ALL_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "C64": torch.complex64,
}  # fmt: skip


@pytest.fixture
def every_dtype_file(tmp_path: Path) -> Path:
    tensors = {f"t_{name}": random_tensor(dtype, (3, 5), seed=i) for i, (name, dtype) in enumerate(ALL_DTYPES.items())}
    tensors["scalar"] = torch.tensor(3.25, dtype=torch.float32)
    tensors["empty"] = torch.zeros(0, 7, dtype=torch.bfloat16)
    tensors["odd_u8"] = random_tensor(torch.uint8, (13,), seed=99)
    path = tmp_path / "every.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.fixture
def misaligned_file(tmp_path: Path) -> Path:
    """An odd-sized uint8 tensor first, so the F32 and F64 after it start at odd offsets."""
    odd = bytes(range(7))
    f32 = random_tensor(torch.float32, (4,), seed=1).numpy().tobytes()
    f64 = random_tensor(torch.float64, (2, 2), seed=2).numpy().tobytes()
    aligned_f32 = random_tensor(torch.float32, (1,), seed=3).numpy().tobytes()
    return write_raw(
        tmp_path / "misaligned.safetensors",
        [("odd", "U8", [7], odd), ("f32", "F32", [4], f32), ("pad", "U8", [2], b"\0\0"), ("f64", "F64", [2, 2], f64),
         ("tail", "U8", [3], b"\1\2\3"), ("aligned_f32", "F32", [1], aligned_f32)],
    )  # fmt: skip


def load(path: Path, mode: dict, **extra) -> LoadedModel:
    return load_file(path, **{**mode, **extra})


@pytest.fixture
def many_windows_file(tmp_path: Path) -> Path:
    """About 600 KB: well over a hundred 4 KiB windows, one large tensor and small ones around it."""
    path = tmp_path / "windows.safetensors"
    save_file({"big": random_tensor(torch.bfloat16, (613, 487)), "odd": random_tensor(torch.uint8, (5,), seed=4),
               "bias": random_tensor(torch.float32, (77,), seed=5)}, path)  # fmt: skip
    return path


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class ShortDirectRead:
    """os.preadv stand-in: the `nth` O_DIRECT read returns an unaligned short count (as some
    network filesystems do mid-file); every other read is the real one."""

    def __init__(self, path: Path, *, nth: int, short_bytes: int = 1000) -> None:
        self.plain = os.open(path, os.O_RDONLY)
        self.nth, self.short_bytes, self.direct_calls, self.fired = nth, short_bytes, 0, False
        self.real = os.preadv
        self.lock = threading.Lock()  # reader threads call it concurrently

    def __call__(self, fd, buffers, offset):
        if is_direct(fd):
            with self.lock:
                self.direct_calls += 1
                fire = self.direct_calls == self.nth
            if fire:
                self.fired = True
                return self.real(self.plain, [memoryview(buffers[0])[: self.short_bytes]], offset)
        return self.real(fd, buffers, offset)


def fail_reads_from(offset_bytes: int, error: Exception | None):
    """os.preadv stand-in failing every read at or past `offset_bytes` (None: end of file there)."""
    real = os.preadv

    def preadv(fd, buffers, offset):
        if offset >= offset_bytes:
            if error is None:
                return 0
            raise error
        return real(fd, buffers, offset)

    return preadv


class TestCpuCorrectness:
    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_every_dtype_scalar_and_empty_tensor_match_safetensors_byte_for_byte(self, every_dtype_file, mode):
        model = load(every_dtype_file, mode, **SMALL_CHUNKS)
        assert_same_as_safetensors(model, every_dtype_file)
        assert model.tensors["scalar"].shape == () and model.tensors["empty"].shape == (0, 7)

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_fp8_e8m0_loads_as_the_raw_bytes_on_disk(self, tmp_path, mode):
        # safetensors' torch loader has no E8M0 mapping yet, so compare with the file itself.
        data = bytes(range(0, 256, 17))
        path = write_raw(tmp_path / "e8m0.safetensors", [("scales", "F8_E8M0", [len(data)], data)])
        model = load(path, mode)
        assert model.tensors["scales"].dtype == torch.float8_e8m0fnu
        assert bytes(as_bytes(model.tensors["scales"]).numpy()) == data

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_misaligned_tensors_are_cloned_and_the_rest_are_views(self, misaligned_file, mode):
        model = load(misaligned_file, mode)
        assert_same_as_safetensors(model, misaligned_file)
        assert set(model.cloned) == {"f32", "f64"}
        for name, tensor in model.tensors.items():
            assert tensor.data_ptr() % tensor.element_size() == 0, name
            in_buffer = model.buffer.data_ptr() <= tensor.data_ptr() < model.buffer.data_ptr() + model.size_bytes
            assert in_buffer == (name not in model.cloned), name

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_an_empty_tensor_at_an_odd_offset_is_not_cloned(self, tmp_path, mode):
        path = write_raw(tmp_path / "empty-odd.safetensors",
                         [("odd", "U8", [3], b"abc"), ("empty", "F64", [0, 4], b""), ("tail", "U8", [1], b"z")])  # fmt: skip
        model = load(path, mode)
        assert model.cloned == () and model.tensors["empty"].shape == (0, 4)
        assert_same_as_safetensors(model, path)

    @pytest.mark.parametrize("mode", [CPU_MODES[0], CPU_MODES[2]])
    def test_thousands_of_tiny_tensors_load_intact(self, tmp_path, mode):
        tensors = {f"layer.{i}.w": random_tensor(torch.float16, (i % 5 + 1,), seed=i) for i in range(3000)}
        path = tmp_path / "tiny.safetensors"
        save_file(tensors, path)
        model = load(path, mode, **SMALL_CHUNKS)
        assert len(model.tensors) == 3000
        assert_same_as_safetensors(model, path)

    @pytest.mark.parametrize("mode", CPU_MODES)
    @pytest.mark.parametrize("chunk_bytes", [4096, 3 * 4096, 1 << 20])
    def test_one_large_tensor_spanning_many_chunks_loads_intact(self, tmp_path, mode, chunk_bytes):
        path = tmp_path / "large.safetensors"
        save_file({"big": random_tensor(torch.bfloat16, (1531, 1013)), "bias": random_tensor(torch.float32, (3,))}, path)
        model = load(path, mode, chunk_bytes=chunk_bytes, reader_threads=4)
        assert_same_as_safetensors(model, path)

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_a_file_evicted_from_the_page_cache_loads_intact(self, tmp_path, mode):
        path = tmp_path / "cold.safetensors"
        save_file({"w": random_tensor(torch.float16, (300_000,)), "b": random_tensor(torch.int8, (77,))}, path)
        evict_from_page_cache(path)
        assert_same_as_safetensors(load(path, mode, chunk_bytes=65536), path)

    def test_a_file_without_tensors_loads_as_an_empty_model(self, tmp_path):
        path = tmp_path / "empty.safetensors"
        save_file({}, path)
        for strategy in CpuStrategy:
            model = load_file(path, cpu_strategy=strategy)
            assert model.tensors == {} and model.size_bytes == 0


class TestCpuBuffers:
    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_tensors_are_views_into_one_buffer_holding_the_data_region(self, every_dtype_file, mode):
        model = load(every_dtype_file, mode)
        file_bytes = every_dtype_file.read_bytes()
        assert bytes(model.buffer.numpy()) == file_bytes[model.header.data_offset :]
        storages = {t.untyped_storage().data_ptr() for t in model.tensors.values() if t.numel()}
        assert storages == {model.buffer.untyped_storage().data_ptr()}

    def test_writing_to_a_mapped_tensor_never_changes_the_file(self, every_dtype_file):
        before = every_dtype_file.read_bytes()
        model = load_file(every_dtype_file, cpu_strategy="mmap")
        model.tensors["t_F32"].fill_(1.0)
        assert every_dtype_file.read_bytes() == before
        assert torch.equal(model.tensors["t_F32"], torch.ones(3, 5))

    def test_the_result_reports_its_size_source_method_and_timings(self, every_dtype_file):
        model = load_file(every_dtype_file, cpu_strategy="read")
        assert model.size_bytes == every_dtype_file.stat().st_size - model.header.data_offset
        assert model.source is LoadSource.DISK and model.method == "read" and model.path == str(every_dtype_file)
        t = model.timings
        assert t.total_s >= t.header_s + t.data_s and t.total_s > 0

    def test_pinning_without_a_gpu_gives_ordinary_memory(self, every_dtype_file):
        model = load_file(every_dtype_file, pin_memory=True)
        assert model.pinned is has_cuda and model.method == "read"

    def test_preparing_for_the_cpu_allocates_nothing(self):
        with Loader() as loader:
            loader.prepare("cpu")
            assert loader.ring_bytes == 0

    def test_one_loader_loads_many_files_and_each_result_stays_valid(self, tmp_path):
        paths = []
        for i in range(3):
            paths.append(tmp_path / f"m{i}.safetensors")
            save_file({"w": random_tensor(torch.float32, (1000 + i,), seed=i)}, paths[-1])
        with Loader(LoadOptions(chunk_bytes=4096, reader_threads=2, cpu_strategy="read")) as loader:
            models = [loader.load(p) for p in paths]
        for model, path in zip(models, paths):
            assert_same_as_safetensors(model, path)


class TestDirectIo:
    def test_direct_io_reads_bypass_the_page_cache_where_the_filesystem_allows(self, every_dtype_file):
        model = load_file(every_dtype_file, cpu_strategy="read", direct_io=True)
        assert model.method in {"read+direct", "read"}
        assert_same_as_safetensors(model, every_dtype_file)

    def test_a_filesystem_refusing_o_direct_falls_back_to_buffered_reads(self, every_dtype_file, monkeypatch):
        real_fcntl = fcntl.fcntl

        def refusing_fcntl(fd, cmd, arg=0):
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, cmd, arg)

        monkeypatch.setattr(loader_mod.fcntl, "fcntl", refusing_fcntl)
        model = load_file(every_dtype_file, cpu_strategy="read", direct_io=True)
        assert model.method == "read"
        assert_same_as_safetensors(model, every_dtype_file)

    def test_a_filesystem_refusing_o_direct_reads_falls_back_to_buffered_reads(self, every_dtype_file, monkeypatch):
        real_preadv = os.preadv
        refused: list[int] = []

        def refusing_preadv(fd, buffers, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                refused.append(fd)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(loader_mod.os, "preadv", refusing_preadv)
        model = load_file(every_dtype_file, cpu_strategy="read", direct_io=True)
        assert model.method == "read" and refused
        assert_same_as_safetensors(model, every_dtype_file)


    def test_direct_io_under_the_default_mapping_strategy_reads_instead(self, every_dtype_file):
        model = load_file(every_dtype_file, direct_io=True)  # cpu_strategy defaults to mmap
        assert model.method in {"read+direct", "read"} and loader_mod.DEFAULT_CPU_STRATEGY is CpuStrategy.MMAP
        assert_same_as_safetensors(model, every_dtype_file)

    @pytest.mark.parametrize("nth", [2, 5])
    def test_a_short_direct_read_mid_file_is_finished_with_buffered_reads(self, many_windows_file, monkeypatch, nth):
        fake = ShortDirectRead(many_windows_file, nth=nth)
        monkeypatch.setattr(loader_mod.os, "preadv", fake)
        try:
            model = load_file(many_windows_file, cpu_strategy="read", direct_io=True, chunk_bytes=4096 * 8, reader_threads=3)
        finally:
            os.close(fake.plain)
        if model.method == "read":
            pytest.skip("this filesystem refuses O_DIRECT")
        assert fake.fired and model.method == "read+direct+buffered"
        assert_same_as_safetensors(model, many_windows_file)

    def test_a_direct_read_refused_mid_file_is_finished_with_buffered_reads(self, many_windows_file, monkeypatch):
        real_preadv = os.preadv
        direct_calls: list[int] = []

        def refusing_later(fd, buffers, offset):
            if is_direct(fd):
                direct_calls.append(offset)
                if len(direct_calls) > 3:  # the probe and two windows went through
                    raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(loader_mod.os, "preadv", refusing_later)
        model = load_file(many_windows_file, cpu_strategy="read", direct_io=True, chunk_bytes=4096, reader_threads=2)
        if model.method == "read":
            pytest.skip("this filesystem refuses O_DIRECT")
        assert model.method == "read+direct+buffered" and len(direct_calls) > 3
        assert_same_as_safetensors(model, many_windows_file)


class TestReadFailures:
    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_a_read_failing_mid_load_is_a_loader_error_and_the_loader_works_after(self, many_windows_file, monkeypatch, mode):
        opts = {k: v for k, v in mode.items() if k != "pin_memory"}
        with Loader(LoadOptions(chunk_bytes=4096, reader_threads=3, **opts)) as loader:
            with monkeypatch.context() as m:
                m.setattr(loader_mod.os, "preadv", fail_reads_from(20 * 4096, OSError(errno.EIO, "Input/output error")))
                if mode.get("cpu_strategy") == "mmap":  # mappings fault pages in; make the populate step fail instead
                    m.setattr(loader_mod, "_libc", lambda: None)
                    m.setattr(loader_mod, "_all_resident", lambda *a: False)
                    m.setattr(torch.Tensor, "sum", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
                with pytest.raises(LoaderError, match=r"reading .*windows.safetensors failed: OSError.*Input/output error"):
                    loader.load(many_windows_file, pin_memory=mode.get("pin_memory", False))
            assert_same_as_safetensors(loader.load(many_windows_file, pin_memory=mode.get("pin_memory", False)), many_windows_file)

    @pytest.mark.parametrize("direct_io", [False, True])
    def test_a_file_that_ends_early_while_loading_is_reported_as_truncated(self, many_windows_file, monkeypatch, direct_io):
        monkeypatch.setattr(loader_mod.os, "preadv", fail_reads_from(30 * 4096, None))
        with pytest.raises(LoaderError, match="truncated or replaced while loading"):
            load_file(many_windows_file, cpu_strategy="read", direct_io=direct_io, chunk_bytes=4096)

    def test_running_out_of_device_memory_is_a_retryable_capacity_failure_for_jobs(self):
        from stoker.agent.jobs import _as_job_failure

        err = DeviceOutOfMemory("out of memory on cuda:0: m.safetensors needs 5 bytes")
        failure = _as_job_failure(err)
        assert isinstance(err, LoaderError) and failure.reason == "InsufficientVRAM" and failure.retryable


class TestIdentity:
    def test_a_loaded_model_records_the_file_it_came_from(self, every_dtype_file):
        model = load_file(every_dtype_file)
        assert model.identity == FileIdentity.of(every_dtype_file)

    def test_a_file_renamed_over_the_old_one_has_another_identity(self, every_dtype_file, tmp_path):
        before = FileIdentity.of(every_dtype_file)
        (tmp_path / "new").write_bytes(every_dtype_file.read_bytes())
        os.replace(tmp_path / "new", every_dtype_file)
        assert FileIdentity.of(every_dtype_file) != before


class TestRejections:
    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_a_truncated_file_is_refused_before_any_data_is_read(self, every_dtype_file, mode):
        every_dtype_file.write_bytes(every_dtype_file.read_bytes()[:-3])
        with pytest.raises(HeaderError) as info:
            load(every_dtype_file, mode)
        assert info.value.reason is HeaderProblem.TRUNCATED

    def test_a_corrupt_header_is_refused(self, tmp_path):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", 4) + b"nope")
        with pytest.raises(HeaderError) as info:
            load_file(path)
        assert info.value.reason is HeaderProblem.BAD_JSON

    def test_devices_other_than_cpu_and_cuda_are_refused(self, every_dtype_file):
        with pytest.raises(LoaderError, match="only cpu and cuda"):
            load_file(every_dtype_file, device="meta")

    @pytest.mark.skipif(has_cuda, reason="checks the message on machines without a GPU")
    def test_loading_onto_cuda_without_a_gpu_says_so(self, every_dtype_file):
        with pytest.raises(LoaderError, match="CUDA is not available"):
            load_file(every_dtype_file, device="cuda")

    @pytest.mark.parametrize("bad", [{"chunk_bytes": 1000}, {"reader_threads": 0}, {"ring_buffers": 0}, {"cpu_strategy": "x"}])
    def test_invalid_options_are_refused(self, bad):
        with pytest.raises(ValueError):
            LoadOptions(**bad)

    def test_every_known_dtype_has_a_torch_dtype(self):
        assert {name: loader_mod.torch_dtype(name).itemsize for name in DTYPE_ITEM_BYTES} == dict(DTYPE_ITEM_BYTES)


@gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("direct_io", [False, True])
    def test_every_dtype_loads_onto_the_gpu_byte_for_byte(self, every_dtype_file, direct_io):
        model = load_file(every_dtype_file, device="cuda", chunk_bytes=8192, reader_threads=3, ring_buffers=4, direct_io=direct_io)
        assert model.device.type == "cuda" and model.method.startswith("pinned-ring")
        assert all(t.device.type == "cuda" for t in model.tensors.values())
        assert_same_as_safetensors(model, every_dtype_file)

    def test_misaligned_tensors_are_cloned_on_the_gpu(self, misaligned_file):
        model = load_file(misaligned_file, device="cuda")
        assert set(model.cloned) == {"f32", "f64"}
        assert all(t.data_ptr() % t.element_size() == 0 for t in model.tensors.values())
        assert_same_as_safetensors(model, misaligned_file)

    def test_prepare_allocates_the_ring_before_the_first_load(self, every_dtype_file):
        with Loader(LoadOptions(chunk_bytes=8192, ring_buffers=3)) as loader:
            loader.prepare("cuda")
            ring = [slot.host.data_ptr() for slot in loader._ring]
            assert loader.ring_bytes == 3 * 8192
            assert_same_as_safetensors(loader.load(every_dtype_file, device="cuda"), every_dtype_file)
            assert [slot.host.data_ptr() for slot in loader._ring] == ring

    def test_the_pinned_ring_is_allocated_once_and_reused(self, tmp_path):
        paths = []
        for i in range(3):
            paths.append(tmp_path / f"m{i}.safetensors")
            save_file({"w": random_tensor(torch.float16, (50_000 + i,), seed=i)}, paths[-1])
        with Loader(LoadOptions(chunk_bytes=16384, reader_threads=2, ring_buffers=3)) as loader:
            first = loader.load(paths[0], device="cuda")
            ring = [slot.host.data_ptr() for slot in loader._ring]
            later = [loader.load(p, device="cuda") for p in paths[1:]]
            assert [slot.host.data_ptr() for slot in loader._ring] == ring
            assert loader.ring_bytes == 3 * 16384
        for model, path in zip([first, *later], paths):
            assert_same_as_safetensors(model, path)

    def test_thousands_of_tiny_tensors_load_onto_the_gpu(self, tmp_path):
        tensors = {f"t{i}": random_tensor(torch.bfloat16, (i % 7 + 1,), seed=i) for i in range(3000)}
        path = tmp_path / "tiny.safetensors"
        save_file(tensors, path)
        assert_same_as_safetensors(load_file(path, device="cuda", chunk_bytes=4096), path)

    def test_gpu_tensors_share_one_device_allocation(self, every_dtype_file):
        model = load_file(every_dtype_file, device="cuda")
        storages = {t.untyped_storage().data_ptr() for t in model.tensors.values() if t.numel()}
        assert storages == {model.buffer.untyped_storage().data_ptr()}

    @pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
    def test_a_large_tensor_streams_through_a_two_slot_ring_in_many_windows(self, many_windows_file, direct_io):
        with Loader(LoadOptions(chunk_bytes=4096, reader_threads=3, ring_buffers=2, direct_io=direct_io)) as loader:
            model = loader.load(many_windows_file, device="cuda")
            windows = -(-(many_windows_file.stat().st_size) // 4096)
            assert windows > 100 and loader.ring_bytes == 2 * 4096
        # with direct_io: +direct, or plain where the filesystem refuses O_DIRECT
        assert model.method in ({"pinned-ring+direct", "pinned-ring"} if direct_io else {"pinned-ring"})
        assert model.device.type == "cuda"
        assert_same_as_safetensors(model, many_windows_file)

    @pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
    def test_thousands_of_tiny_tensors_stream_through_a_two_slot_ring(self, tmp_path, direct_io):
        tensors = {f"t{i}": random_tensor(torch.float16, (i % 11 + 1,), seed=i) for i in range(3000)}
        path = tmp_path / "tiny.safetensors"
        save_file(tensors, path)
        model = load_file(path, device="cuda", chunk_bytes=4096, reader_threads=3, ring_buffers=2, direct_io=direct_io)
        assert_same_as_safetensors(model, path)

    @pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), None], ids=["io-error", "truncated"])
    def test_a_load_failing_mid_file_leaves_the_stream_idle_and_the_ring_reusable(self, many_windows_file, monkeypatch, error):
        device = torch.device("cuda", torch.cuda.current_device())
        with Loader(LoadOptions(chunk_bytes=4096, reader_threads=3, ring_buffers=2)) as loader:
            loader.load(many_windows_file, device=device)
            ring = [slot.host.data_ptr() for slot in loader._ring]
            with monkeypatch.context() as m:
                m.setattr(loader_mod.os, "preadv", fail_reads_from(40 * 4096, error))
                with pytest.raises(LoaderError, match="Input/output error" if error else "truncated or replaced"):
                    loader.load(many_windows_file, device=device)
            assert loader.copy_stream(device).query()  # no copy still reads the ring
            again = loader.load(many_windows_file, device=device)
            assert [slot.host.data_ptr() for slot in loader._ring] == ring
        assert_same_as_safetensors(again, many_windows_file)

    def test_a_short_direct_read_mid_file_is_finished_with_buffered_reads_on_the_gpu(self, many_windows_file, monkeypatch):
        fake = ShortDirectRead(many_windows_file, nth=4)
        monkeypatch.setattr(loader_mod.os, "preadv", fake)
        try:
            model = load_file(many_windows_file, device="cuda", direct_io=True, chunk_bytes=4096 * 4, reader_threads=3, ring_buffers=2)
        finally:
            os.close(fake.plain)
        if model.method == "pinned-ring":
            pytest.skip("this filesystem refuses O_DIRECT")
        assert fake.fired and model.method == "pinned-ring+direct+buffered"
        assert_same_as_safetensors(model, many_windows_file)

    def test_running_out_of_gpu_memory_is_reported_as_out_of_memory(self, many_windows_file, monkeypatch):
        with Loader(LoadOptions(chunk_bytes=4096, ring_buffers=2)) as loader:
            loader.load(many_windows_file, device="cuda")  # the ring exists; only the device allocation fails
            real_empty = torch.empty

            def no_room(*args, **kwargs):
                if torch.device(kwargs.get("device", "cpu")).type == "cuda":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
                return real_empty(*args, **kwargs)

            monkeypatch.setattr(loader_mod.torch, "empty", no_room)
            with pytest.raises(DeviceOutOfMemory, match="out of memory on cuda") as info:
                loader.load(many_windows_file, device="cuda")
        assert isinstance(info.value, RuntimeError)


class TestFilesChangingUnderALoad:
    """A file cut short while it loads (rewritten in place by something else): a clean LoaderError,
    never mmap's ValueError or a SIGBUS that would kill the agent."""

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_a_file_truncated_right_after_its_header_was_read(self, many_windows_file, monkeypatch, mode):
        real = loader_mod._read_header_fd

        def read_then_truncate(fd: int):
            header = real(fd)
            os.truncate(many_windows_file, header.data_offset + header.data_size_bytes // 2)
            return header

        monkeypatch.setattr(loader_mod, "_read_header_fd", read_then_truncate)
        with pytest.raises(LoaderError, match="shrank|truncated"):
            load(many_windows_file, mode, chunk_bytes=4096)

    def test_a_mapped_file_truncated_before_its_pages_are_read(self, many_windows_file, monkeypatch):
        evict_from_page_cache(many_windows_file)
        real = Loader._populate

        def truncate_then_populate(self, path, data, **kw):
            os.truncate(many_windows_file, 4096)
            return real(self, path, data, **kw)

        monkeypatch.setattr(Loader, "_populate", truncate_then_populate)
        with pytest.raises(LoaderError, match="shrank"):
            load_file(many_windows_file, cpu_strategy="mmap", chunk_bytes=4096)


class TestOnlyRegularFiles:
    def test_a_fifo_is_refused_at_once_instead_of_blocking_the_load(self, tmp_path):
        fifo = tmp_path / "model.safetensors"
        os.mkfifo(fifo)
        outcome: list[BaseException] = []
        t = threading.Thread(target=lambda: outcome.append(pytest.raises(HeaderError, load_file, fifo).value), daemon=True)
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "loading a FIFO blocked"
        assert outcome and outcome[0].reason is HeaderProblem.NOT_A_FILE


class TestEdgeFilesSafetensorsLoads:
    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_packed_four_bit_tensors_load_as_safetensors_loads_them(self, tmp_path, mode):
        path = write_raw(tmp_path / "f4.safetensors", [("q", "F4", [3, 4], bytes(range(6))), ("b", "U8", [2], b"\1\2")])
        assert_same_as_safetensors(load(path, mode), path)

    @pytest.mark.parametrize("mode", CPU_MODES)
    def test_zero_size_tensors_with_huge_dimensions_load_as_safetensors_loads_them(self, tmp_path, mode):
        path = write_raw(tmp_path / "z.safetensors", [("z", "F32", [0, 2**62, 2**62], b""), ("w", "F32", [2], b"\0" * 8)])
        assert_same_as_safetensors(load(path, mode), path)
