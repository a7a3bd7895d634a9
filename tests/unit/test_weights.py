"""Weights: tiers in order, staging into RAM, stale copies never served, demotion off the load path."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from stoker.agent.loader import LoadedModel, Loader, LoadOptions
from stoker.agent.weights import Weights
from stoker.testing.page_cache import evict_from_page_cache

has_cuda = torch.cuda.is_available()
CPU = torch.device("cpu")


def write_model(path: Path, *, fill: float, numel: int = 4096) -> Path:
    """A small model whose every weight is ``fill``; written to a new file renamed over ``path``."""
    tmp = path.with_suffix(".part")
    save_file({"w": torch.full((numel,), fill), "b": torch.arange(3, dtype=torch.int32)}, tmp)
    os.replace(tmp, path)
    return path


def fill_of(model: LoadedModel) -> float:
    return float(model.tensors["w"][0])


class CountingLoader(Loader):
    """A real loader that records every load it performs."""

    def __init__(self) -> None:
        super().__init__(LoadOptions(chunk_bytes=4096, reader_threads=2))
        self.loads: list[str] = []
        self.before_load: list = []

    def load(self, path, *, device="cpu", pin_memory=False):  # type: ignore[no-untyped-def]
        for hook in self.before_load:
            hook(str(path))
        self.loads.append(os.path.basename(path))
        return super().load(path, device=device, pin_memory=pin_memory)


@pytest.fixture
def loader():
    with CountingLoader() as ldr:
        yield ldr


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {k: write_model(tmp_path / f"{k}.safetensors", fill=float(i + 1)) for i, k in enumerate("abc")}


def cached(path: Path) -> bool:
    """Whether every page of the file is in the page cache (mincore over a mapping of it)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable, so ctypes can take its address
    try:
        anchor = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.addressof(anchor), size, vec)
        del anchor
        assert rc == 0, f"mincore failed: errno {ctypes.get_errno()}"
        return all(v & 1 for v in vec)
    finally:
        m.close()


def size_of(path: Path) -> int:
    return st_load_file(path)["w"].numel() * 4 + 12


def weights_with(loader: Loader, *, vram_models: int = 3, ram_bytes: int = 1 << 24) -> Weights:
    w = Weights(loader=loader, device=CPU, vram_budget_bytes=vram_models * 16_396, ram_budget_bytes=ram_bytes, ram_tier=True)
    return w


class TestUse:
    def test_a_model_comes_from_disk_then_stays_in_vram(self, loader, models):
        weights = weights_with(loader)
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "disk" and fill_of(model) == 1.0
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "vram" and fill_of(model) == 1.0
        assert loader.loads == ["a.safetensors"]

    def test_a_ram_copy_that_vanishes_before_the_copy_falls_back_to_the_file(self, loader, models):
        weights = weights_with(loader)
        weights.stage("a", models["a"])
        assert weights.tier_of("a") == "ram"
        real = weights.ram.to_device

        def evicted_meanwhile(key, device, **kw):  # the RAM tier evicts it right after the check
            weights.ram.evict(key)
            return real(key, device, **kw)

        weights.ram.to_device = evicted_meanwhile
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "disk" and fill_of(model) == 1.0

    def test_a_model_whose_file_was_replaced_is_loaded_again_from_the_new_file(self, loader, models):
        weights = weights_with(loader)
        with weights.use("a", models["a"]) as (model, _):
            assert fill_of(model) == 1.0
        write_model(models["a"], fill=9.0)  # the source changed and was downloaded again
        assert weights.tier_of("a", models["a"]) == "disk"
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "disk" and fill_of(model) == 9.0
        assert weights.vram.used_bytes == size_of(models["a"])

    def test_a_stale_ram_copy_is_not_served(self, loader, models):
        weights = weights_with(loader)
        weights.stage("a", models["a"])
        write_model(models["a"], fill=5.0)
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "disk" and fill_of(model) == 5.0
        assert "a" not in weights.ram

    def test_a_stale_model_still_in_use_stays_valid_and_is_counted_until_released(self, loader, models):
        weights = weights_with(loader)
        forgotten: list[str] = []
        weights.on_evict.append(forgotten.append)
        size = size_of(models["a"])
        with weights.use("a", models["a"]) as (old, _):
            write_model(models["a"], fill=7.0)
            with weights.use("a", models["a"]) as (new, tier):
                assert tier == "disk" and fill_of(new) == 7.0 and fill_of(old) == 1.0
                assert weights.vram.used_bytes == 2 * size and [e.key for e in weights.vram.snapshot().entries] == ["a"]
            assert forgotten == ["a"]
        assert weights.vram.used_bytes == size

    def test_a_file_replaced_with_identical_bytes_is_still_a_new_file(self, loader, models):
        weights = weights_with(loader)
        with weights.use("a", models["a"]):
            pass
        write_model(models["a"], fill=1.0)
        with weights.use("a", models["a"]) as (_, tier):
            assert tier == "disk"


class TestStage:
    def test_staging_reads_the_model_into_ram_without_touching_vram(self, loader, models):
        weights = weights_with(loader)
        weights.stage("a", models["a"])
        assert "a" in weights.ram and "a" not in weights.vram and weights.tier_of("a", models["a"]) == "ram"
        assert weights.ram.to_device("a", "cpu").pinned is has_cuda
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "ram" and fill_of(model) == 1.0

    def test_staging_a_model_already_in_vram_or_ram_reads_nothing(self, loader, models):
        weights = weights_with(loader)
        with weights.use("a", models["a"]):
            pass
        reads: list[str] = []
        real_put_file = weights.ram.put_file
        weights.ram.put_file = lambda key, path, **kw: (reads.append(key), real_put_file(key, path, **kw))
        weights.stage("a", models["a"])
        assert "a" not in weights.ram
        weights.stage("b", models["b"])
        weights.stage("b", models["b"])
        assert reads == ["b"] and loader.loads == ["a.safetensors"]

    def test_staging_a_model_the_ram_budget_cannot_fit_does_nothing(self, loader, models):
        weights = weights_with(loader, ram_bytes=100)
        weights.stage("a", models["a"])
        assert "a" not in weights.ram and weights.ram.used_bytes == 0

    def test_staging_replaces_a_ram_copy_of_an_older_file(self, loader, models):
        weights = weights_with(loader)
        weights.stage("a", models["a"])
        write_model(models["a"], fill=3.0)
        weights.stage("a", models["a"])
        assert fill_of(weights.ram.to_device("a", "cpu")) == 3.0

    def test_staging_on_an_agent_without_a_ram_tier_only_warms_the_page_cache(self, loader, models):
        weights = Weights(loader=loader, device=CPU, vram_budget_bytes=1 << 20, ram_budget_bytes=1 << 20)
        assert weights.ram is None
        evict_from_page_cache(models["a"])
        weights.stage("a", models["a"])
        assert "a" not in weights.vram and loader.loads == []
        deadline = time.monotonic() + 10
        while not cached(models["a"]):  # the kernel reads ahead in the background
            assert time.monotonic() < deadline, "the file never reached the page cache"
            time.sleep(0.01)

    def test_staging_a_missing_file_says_so(self, loader, tmp_path):
        with pytest.raises(FileNotFoundError):
            weights_with(loader).stage("x", tmp_path / "missing.safetensors")


class TestDemotion:
    def test_a_model_leaving_vram_is_read_into_ram_after_the_load_that_evicted_it(self, loader, models):
        weights = weights_with(loader, vram_models=1)
        with weights.use("a", models["a"]):
            pass
        seen_during_load: list[bool] = []
        loader.before_load.append(lambda path: seen_during_load.append("a" in weights.ram))
        with weights.use("b", models["b"]) as (model, tier):
            assert tier == "disk" and fill_of(model) == 2.0
        assert seen_during_load == [False]  # nothing was copied back inside b's load
        assert weights.settle(timeout_s=10)
        assert "a" in weights.ram and "a" not in weights.vram
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "ram" and fill_of(model) == 1.0
        weights.close()

    def test_a_model_whose_file_is_gone_is_copied_out_of_vram_at_once(self, loader, models):
        weights = weights_with(loader, vram_models=1)
        with weights.use("a", models["a"]) as (model, _):
            expected = model.buffer.clone()
        models["a"].unlink()
        with weights.use("b", models["b"]):
            assert "a" in weights.ram
        assert torch.equal(weights.ram.to_device("a", "cpu").buffer, expected)

    def test_a_model_whose_file_changed_is_not_kept_in_ram(self, loader, models):
        weights = weights_with(loader, vram_models=1)
        with weights.use("a", models["a"]):
            pass
        write_model(models["a"], fill=4.0)
        with weights.use("b", models["b"]):
            pass
        assert weights.settle(timeout_s=10) and "a" not in weights.ram

    def test_runners_hear_of_every_model_leaving_vram(self, loader, models):
        weights = weights_with(loader, vram_models=1)
        left: list[str] = []
        weights.on_evict.append(left.append)
        for key in "abc":
            with weights.use(key, models[key]):
                pass
        assert left == ["a", "b"]
        weights.close()

    def test_staging_runs_while_another_model_is_in_use(self, loader, models):
        weights = weights_with(loader)
        done = threading.Event()
        with weights.use("a", models["a"]):
            worker = threading.Thread(target=lambda: (weights.stage("b", models["b"]), done.set()))
            worker.start()
            assert done.wait(10)
        worker.join()
        assert weights.tier_of("b") == "ram"


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
class TestCuda:
    def test_a_staged_model_reaches_the_gpu_from_ram_byte_for_byte(self, loader, models):
        weights = Weights(loader=loader, device=torch.device("cuda"), vram_budget_bytes=1 << 24, ram_budget_bytes=1 << 24)
        weights.stage("a", models["a"])
        assert weights.ram.to_device("a", "cpu").pinned and "a" not in weights.vram
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "ram" and model.device.type == "cuda" and model.method == "ram-copy"
            expected = st_load_file(models["a"])
            for name, want in expected.items():
                assert torch.equal(model.tensors[name].cpu().view(torch.uint8), want.view(torch.uint8))
        weights.close()

    def test_a_gpu_model_leaving_vram_comes_back_from_pinned_ram(self, loader, models):
        weights = Weights(loader=loader, device=torch.device("cuda"), vram_budget_bytes=size_of(models["a"]), ram_budget_bytes=1 << 24)
        with weights.use("a", models["a"]) as (_, tier):
            assert tier == "disk"
        with weights.use("b", models["b"]):
            pass
        assert weights.settle(timeout_s=30)
        with weights.use("a", models["a"]) as (model, tier):
            assert tier == "ram" and model.device.type == "cuda" and fill_of(model) == 1.0
        weights.close()
