"""RAM and VRAM tiers: budgets hold, LRU order, models in use are never evicted, loads are shared."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from stoker.agent.disk_cache import InsufficientCache
from stoker.agent.hot_tiers import ModelInUse, NotResident, RamTier, TierEntry, VramTier
from stoker.agent.loader import FileIdentity, LoadedModel, Loader, LoadOptions, LoadSource, LoadTimings, build_views, load_file
from stoker.agent.safetensors_header import Header, TensorSpec

has_cuda = torch.cuda.is_available()


class FakeClock:
    """Virtual time: advances one second per reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def model_of(size_bytes: int, *, fill: int = 7, version: int | None = None) -> LoadedModel:
    """An in-memory model; with ``version`` it claims to come from that version of a file."""
    header = Header(data_offset=64, tensors=(TensorSpec(name="w", dtype="U8", shape=(size_bytes,), begin=0, end=size_bytes),))
    buffer = torch.full((size_bytes,), fill, dtype=torch.uint8)
    tensors, cloned = build_views(buffer, header)
    return LoadedModel(
        tensors=tensors, header=header, buffer=buffer, device=buffer.device,
        source=LoadSource.DISK, method="read", timings=LoadTimings(), cloned=cloned, identity=file_version(version),
    )  # fmt: skip


def file_version(version: int | None) -> FileIdentity | None:
    return None if version is None else FileIdentity(device=1, inode=100 + version, size_bytes=1, mtime_ns=version)


def keys(tier: VramTier | RamTier) -> list[str]:
    return [e.key for e in tier.snapshot().entries]


def poll(predicate, *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.001)


class TestVramTier:
    def test_the_least_recently_used_model_is_evicted_first(self):
        tier = VramTier(300, clock=FakeClock())
        for key in "abc":
            tier.put(key, model_of(100))
        with tier.acquire("a"):
            pass
        tier.put("d", model_of(100))
        assert set(keys(tier)) == {"a", "c", "d"} and tier.used_bytes == 300

    def test_a_model_in_use_is_never_evicted(self):
        tier = VramTier(200, clock=FakeClock())
        tier.put("busy", model_of(100))
        tier.put("idle", model_of(100))
        with tier.acquire("busy"):
            tier.put("new", model_of(100))
            assert set(keys(tier)) == {"busy", "new"}
            with pytest.raises(InsufficientCache) as info:
                tier.put("huge", model_of(150))
            assert info.value.tier == "VRAM" and info.value.key == "huge" and info.value.pinned_bytes == 100
        tier.put("huge", model_of(150))
        assert keys(tier) == ["huge"]

    def test_evicting_a_model_in_use_is_refused(self):
        tier = VramTier(100)
        tier.put("m", model_of(10))
        with tier.acquire("m"), pytest.raises(ModelInUse, match="1 job"):
            tier.evict("m")
        assert tier.evict("m") is True and tier.evict("m") is False

    def test_acquire_loads_a_missing_model_once_and_holds_it(self):
        tier = VramTier(100, clock=FakeClock())
        calls = []

        def load() -> LoadedModel:
            calls.append(1)
            return model_of(40)

        with tier.acquire("m", load=load, size_bytes=40) as model:
            assert model.size_bytes == 40
            assert tier.snapshot().entries == (TierEntry(key="m", size_bytes=40, last_used=1001.0, in_use=1),)
        with tier.acquire("m", load=load, size_bytes=40):
            pass
        assert len(calls) == 1 and tier.snapshot().entries[0].in_use == 0

    def test_concurrent_requests_for_one_model_share_a_single_load(self):
        tier = VramTier(100)
        arrived, release = [], threading.Event()
        calls, results = [], []

        def load() -> LoadedModel:
            calls.append(1)
            release.wait()
            return model_of(10)

        def job() -> None:
            arrived.append(1)
            with tier.acquire("m", load=load, size_bytes=10) as model:
                results.append(model)

        threads = [threading.Thread(target=job) for _ in range(6)]
        for t in threads:
            t.start()
        poll(lambda: len(arrived) == 6 and calls)
        release.set()
        for t in threads:
            t.join()
        assert len(calls) == 1 and len(results) == 6 and all(r is results[0] for r in results)

    def test_a_load_in_flight_reserves_its_room(self):
        tier = VramTier(100)
        started, release = threading.Event(), threading.Event()

        def slow_load() -> LoadedModel:
            started.set()
            release.wait()
            return model_of(80)

        def use_a() -> None:
            with tier.acquire("a", load=slow_load, size_bytes=80):
                pass

        worker = threading.Thread(target=use_a)
        worker.start()
        started.wait()
        assert tier.snapshot().reserved_bytes == 80
        with pytest.raises(InsufficientCache):
            tier.put("b", model_of(30))
        release.set()
        worker.join()
        assert tier.snapshot().reserved_bytes == 0 and keys(tier) == ["a"]

    def test_a_failed_load_frees_its_reservation_and_the_next_caller_retries(self):
        tier = VramTier(100)

        def broken() -> LoadedModel:
            raise OSError("disk gone")

        with pytest.raises(OSError), tier.acquire("m", load=broken, size_bytes=50):
            pass
        assert tier.snapshot().reserved_bytes == 0 and "m" not in tier
        with tier.acquire("m", load=lambda: model_of(50), size_bytes=50) as model:
            assert model.size_bytes == 50

    def test_acquiring_a_missing_model_without_a_loader_says_so(self):
        tier = VramTier(100)
        with pytest.raises(NotResident, match="not in the VRAM tier"), tier.acquire("nope"):
            pass
        with pytest.raises(ValueError, match="size_bytes"), tier.acquire("nope", load=lambda: model_of(1)):
            pass

    def test_evicted_models_can_be_demoted_to_the_ram_tier(self):
        ram = RamTier(1000)
        vram = VramTier(100, on_evict=ram.put)
        vram.put("a", model_of(60, fill=3))
        vram.put("b", model_of(60, fill=4))
        assert keys(vram) == ["b"] and "a" in ram
        back = ram.to_device("a", "cpu")
        assert back.source is LoadSource.RAM and torch.equal(back.tensors["w"], torch.full((60,), 3, dtype=torch.uint8))

    def test_the_snapshot_lists_models_most_recently_used_first_with_bytes(self):
        tier = VramTier(1000, clock=FakeClock())
        tier.put("old", model_of(10))
        tier.put("new", model_of(20))
        snap = tier.snapshot()
        assert [(e.key, e.size_bytes) for e in snap.entries] == [("new", 20), ("old", 10)]
        assert snap.tier == "VRAM" and snap.used_bytes == 30 and snap.free_bytes == 970
        assert snap.entries[0].last_used > snap.entries[1].last_used

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.sampled_from(["put", "hold", "unhold", "evict"]), st.sampled_from("abcdef"), st.integers(1, 60)),
            max_size=40,
        )
    )
    def test_the_budget_holds_and_held_models_stay_under_any_sequence(self, ops):
        tier = VramTier(150, clock=FakeClock())
        held: dict[str, list] = {}
        for op, key, size in ops:
            try:
                if op == "put":
                    tier.put(key, model_of(size))
                elif op == "hold":
                    cm = tier.acquire(key)
                    cm.__enter__()
                    held.setdefault(key, []).append(cm)
                elif op == "unhold" and held.get(key):
                    held[key].pop().__exit__(None, None, None)
                elif op == "evict":
                    tier.evict(key)
            except (InsufficientCache, NotResident, ModelInUse):
                pass
            snap = tier.snapshot()
            assert snap.used_bytes <= snap.budget_bytes
            resident = {e.key: e.in_use for e in snap.entries}
            for k, cms in held.items():
                if cms:
                    assert resident.get(k) == len(cms)


class TestFileIdentity:
    def test_a_model_read_from_another_file_is_not_served_and_is_loaded_again(self):
        tier = VramTier(100)
        tier.put("m", model_of(10, fill=1, version=1))
        loads = []
        with tier.acquire("m", load=lambda: loads.append(1) or model_of(10, fill=2, version=2), size_bytes=10,
                          identity=file_version(2)) as model:  # fmt: skip
            assert int(model.tensors["w"][0]) == 2
        assert loads == [1] and tier.used_bytes == 10 and tier.holds("m", file_version(2)) and not tier.holds("m", file_version(1))

    def test_a_request_without_an_identity_takes_whatever_is_held(self):
        tier = VramTier(100)
        tier.put("m", model_of(10, version=1))
        with tier.acquire("m") as model:
            assert model.identity == file_version(1)

    def test_a_stale_model_in_use_stays_counted_until_its_last_user_releases_it(self):
        stale: list[str] = []
        tier = VramTier(25, on_stale=lambda key, model: stale.append(key))
        tier.put("m", model_of(10, fill=1, version=1))
        with tier.acquire("m", identity=file_version(1)) as old:
            with tier.acquire("m", load=lambda: model_of(10, fill=2, version=2), size_bytes=10, identity=file_version(2)) as new:
                assert (int(old.tensors["w"][0]), int(new.tensors["w"][0])) == (1, 2)
                snap = tier.snapshot()
                assert snap.used_bytes == 20 and [(e.key, e.in_use) for e in snap.entries] == [("m", 1)]
                assert stale == ["m"]
                with pytest.raises(InsufficientCache) as info:  # the retired copy cannot be evicted
                    tier.put("x", model_of(10))
                assert info.value.pinned_bytes == 20
        assert tier.used_bytes == 10
        tier.put("x", model_of(10))
        assert set(keys(tier)) == {"m", "x"}

    def test_a_stale_model_nobody_uses_is_dropped_without_being_demoted(self):
        ram = RamTier(1000)
        vram = VramTier(100, on_evict=ram.put)
        vram.put("m", model_of(10, version=1))
        with pytest.raises(NotResident):
            with vram.acquire("m", identity=file_version(2)):
                pass
        assert "m" not in vram and "m" not in ram and vram.used_bytes == 0

    def test_the_ram_tier_serves_only_the_file_asked_for(self):
        ram = RamTier(1000)
        ram.put("m", model_of(10, version=1))
        assert ram.to_device("m", "cpu", identity=file_version(1)).identity == file_version(1)
        with pytest.raises(NotResident):
            ram.to_device("m", "cpu", identity=file_version(2))
        assert "m" not in ram

    def test_put_replaces_a_copy_of_an_older_file(self):
        ram = RamTier(1000)
        ram.put("m", model_of(10, fill=1, version=1))
        ram.put("m", model_of(10, fill=2, version=2))
        assert int(ram.to_device("m", "cpu").tensors["w"][0]) == 2 and ram.used_bytes == 10


    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.sampled_from(["put", "hold", "unhold"]), st.sampled_from("abc"), st.integers(1, 3), st.integers(1, 60)),
            max_size=40,
        )
    )
    def test_the_budget_holds_while_files_change_under_models_in_use(self, ops):
        tier = VramTier(150, clock=FakeClock())
        held: list = []
        for op, key, version, size in ops:
            try:
                if op == "put":
                    tier.put(key, model_of(size, version=version))
                elif op == "hold":
                    cm = tier.acquire(key, identity=file_version(version))
                    cm.__enter__()
                    held.append(cm)
                elif op == "unhold" and held:
                    held.pop(0).__exit__(None, None, None)
            except (InsufficientCache, NotResident):
                pass
            assert tier.used_bytes <= tier.budget_bytes
        for cm in held:
            cm.__exit__(None, None, None)
        snap = tier.snapshot()
        assert snap.used_bytes == sum(e.size_bytes for e in snap.entries) and all(e.in_use == 0 for e in snap.entries)


class TestRamTier:
    @pytest.fixture
    def model_file(self, tmp_path: Path) -> Path:
        path = tmp_path / "m.safetensors"
        save_file({"w": torch.randn(64, 33), "b": torch.arange(5, dtype=torch.int32), "odd": torch.ones(3, dtype=torch.uint8)}, path)
        return path

    def test_a_file_read_into_the_ram_tier_comes_back_byte_for_byte(self, model_file):
        tier = RamTier(1 << 20)
        with Loader(LoadOptions(chunk_bytes=4096)) as loader:
            tier.put_file("m", model_file, loader=loader)
        model = tier.to_device("m", "cpu")
        expected = st_load_file(model_file)
        assert all(torch.equal(model.tensors[k].view(torch.uint8), v.view(torch.uint8)) for k, v in expected.items())
        assert model.source is LoadSource.RAM and tier.snapshot().entries[0].size_bytes == model.size_bytes

    def test_a_mapped_model_is_copied_into_memory_the_tier_owns(self, model_file):
        mapped = load_file(model_file, cpu_strategy="mmap")
        tier = RamTier(1 << 20)
        tier.put("m", mapped)
        held = tier.to_device("m", "cpu")
        assert held.buffer.data_ptr() != mapped.buffer.data_ptr()
        assert torch.equal(held.buffer, mapped.buffer)

    def test_the_ram_budget_evicts_least_recently_used_models(self, model_file):
        size = load_file(model_file).size_bytes
        tier = RamTier(2 * size, clock=FakeClock())
        loader = Loader()
        for key in ("a", "b"):
            tier.put_file(key, model_file, loader=loader)
        tier.to_device("a", "cpu")
        tier.put_file("c", model_file, loader=loader)
        assert set(keys(tier)) == {"a", "c"} and tier.used_bytes <= tier.budget_bytes

    def test_every_copy_evicted_from_the_ram_tier_is_handed_to_on_evict(self, model_file):
        size = load_file(model_file).size_bytes
        evicted: list[tuple[str, int]] = []
        tier = RamTier(2 * size, clock=FakeClock(), on_evict=lambda key, model: evicted.append((key, model.size_bytes)))
        loader = Loader()
        for key in ("a", "b", "c"):
            tier.put_file(key, model_file, loader=loader)
        assert evicted == [("a", size)]
        tier.evict("b")
        assert evicted == [("a", size), ("b", size)]

    def test_host_views_keep_the_copy_they_share_alive(self, model_file):
        tier = RamTier(1 << 20)
        tier.put_file("m", model_file, loader=Loader())
        view = tier.to_device("m", "cpu")
        tier.evict("m")
        assert view.pinned is has_cuda and view._keepalive
        expected = st_load_file(model_file)
        assert all(torch.equal(view.tensors[k].view(torch.uint8), v.view(torch.uint8)) for k, v in expected.items())

    def test_put_file_records_the_file_and_reads_it_again_once_replaced(self, model_file, tmp_path):
        tier = RamTier(1 << 20)
        loader = Loader()
        tier.put_file("m", model_file, loader=loader)
        first = FileIdentity.of(model_file)
        tier.put_file("m", model_file, loader=loader)
        assert tier.holds("m", first)
        save_file({"w": torch.zeros(64, 33)}, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", model_file)
        tier.put_file("m", model_file, loader=loader)
        assert tier.holds("m", FileIdentity.of(model_file)) and set(tier.to_device("m", "cpu").tensors) == {"w"}

    def test_a_model_larger_than_the_budget_is_refused_with_the_tier_named(self, model_file):
        with pytest.raises(InsufficientCache) as info:
            RamTier(10).put_file("m", model_file, loader=Loader())
        assert info.value.tier == "RAM" and "m" in str(info.value)

    def test_asking_for_a_model_the_tier_does_not_hold_says_so(self):
        with pytest.raises(NotResident, match="not in the RAM tier"):
            RamTier(10).to_device("x", "cpu")

    @pytest.mark.gpu
    @pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
    def test_a_pinned_host_copy_moves_to_the_gpu_in_one_copy(self, model_file):
        tier = RamTier(1 << 20)
        tier.put_file("m", model_file, loader=Loader())
        model = tier.to_device("m", "cuda")
        assert model.method == "ram-copy" and model.device.type == "cuda"
        expected = st_load_file(model_file)
        for k, v in expected.items():
            assert torch.equal(model.tensors[k].cpu().view(torch.uint8), v.view(torch.uint8))
        storages = {t.untyped_storage().data_ptr() for t in model.tensors.values()}
        assert storages == {model.buffer.untyped_storage().data_ptr()}

    @pytest.mark.gpu
    @pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
    def test_a_gpu_model_evicted_from_vram_is_kept_pinned_in_ram(self, model_file):
        ram = RamTier(1 << 20)
        vram = VramTier(load_file(model_file).size_bytes, on_evict=ram.put)
        loader = Loader()
        vram.put("a", loader.load(model_file, device="cuda"))
        vram.put("b", loader.load(model_file, device="cuda"))
        assert "a" in ram and ram.to_device("a", "cpu").pinned

    @pytest.mark.gpu
    @pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
    def test_copying_to_a_full_gpu_is_reported_as_out_of_memory(self, model_file, monkeypatch):
        from stoker.agent import hot_tiers
        from stoker.agent.loader import DeviceOutOfMemory

        tier = RamTier(1 << 20)
        tier.put_file("m", model_file, loader=Loader())
        real_empty = torch.empty

        def no_room(*args, **kwargs):
            if torch.device(kwargs.get("device", "cpu")).type == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return real_empty(*args, **kwargs)

        monkeypatch.setattr(hot_tiers.torch, "empty", no_room)
        with pytest.raises(DeviceOutOfMemory, match="out of memory on cuda"):
            tier.to_device("m", "cuda")
        assert tier.snapshot().entries[0].in_use == 0


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
class TestVramTierOnTheGpu:
    def test_acquire_loads_through_the_loader_once_and_keeps_the_model_on_the_gpu(self, tmp_path):
        path = tmp_path / "m.safetensors"
        save_file({"w": torch.randn(257, 129).half(), "b": torch.arange(9, dtype=torch.int64)}, path)
        size = load_file(path).size_bytes
        tier = VramTier(2 * size)
        loads = []
        with Loader(LoadOptions(chunk_bytes=4096, reader_threads=2, ring_buffers=2)) as loader:

            def load() -> LoadedModel:
                loads.append(1)
                return loader.load(path, device="cuda")

            for _ in range(3):
                with tier.acquire("m", load=load, size_bytes=size, identity=FileIdentity.of(path)) as model:
                    assert model.device.type == "cuda" and tier.snapshot().entries[0].in_use == 1
                    for k, v in st_load_file(path).items():
                        assert torch.equal(model.tensors[k].cpu().view(torch.uint8), v.view(torch.uint8))
        assert loads == [1] and tier.used_bytes == size
