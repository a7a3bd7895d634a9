"""The disk tier on real files, with downloads from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import numpy as np
import pytest
import safetensors.numpy

from stoker.agent import status_report
from stoker.agent.disk_store import DiskStore, DiskStoreError, ModelSource, Priority
from stoker.agent.download import DownloadPolicy, Downloader, partial_paths
from stoker.agent.metrics import AgentMetrics
from stoker.agent.settings import AgentSettings, SettingsError, parse_size_bytes
from stoker.api.cacheagent import Bandwidths, CacheAgentStatus
from stoker.testing.model_server import ModelServer
from stoker.userank import DEFAULT_HALF_LIFE_S, add_use

T = TypeVar("T")
MODEL_BYTES = 256 * 1024


def make_model(seed: int, *, size_bytes: int = MODEL_BYTES) -> bytes:
    """A real safetensors file of about `size_bytes` with random weights."""
    rng = np.random.default_rng(seed)
    return safetensors.numpy.save({"unet.weight": rng.standard_normal(size_bytes // 4, dtype=np.float32)})


MODELS = {f"m{i}.safetensors": make_model(i) for i in range(4)}
SIZE = len(MODELS["m0.safetensors"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer(MODELS) as srv:
        yield srv


@pytest.fixture
def downloader() -> Iterator[Downloader]:
    policy = DownloadPolicy(allow_http=True, backoff_initial_s=0.001, backoff_max_s=0.01, trust_env=False, max_attempts=3)
    with Downloader(policy) as d:
        yield d


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def make_store(tmp_path: pathlib.Path, downloader: Downloader) -> Callable[..., DiskStore]:
    def make(**kwargs: object) -> DiskStore:
        options: dict[str, object] = {
            "cache_dir": tmp_path / "cache",
            "budget_bytes": 10 * SIZE,
            "downloader": downloader,
            "metrics": AgentMetrics(),
            "clock": Clock(),
        }
        options.update(kwargs)
        return DiskStore(**options)  # type: ignore[arg-type]

    return make


def source(server: ModelServer, i: int, **kwargs: object) -> ModelSource:
    name = f"m{i}.safetensors"
    options: dict[str, object] = {"key": f"team/m{i}", "url": server.url(name), "sha256": sha(MODELS[name])}
    options.update(kwargs)
    return ModelSource(**options)  # type: ignore[arg-type]


def files_in(store: DiskStore) -> list[str]:
    return sorted(p.name for p in store.models_dir.iterdir())


class TestEnsure:
    def test_a_model_is_downloaded_verified_and_named_after_its_identity(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            path = await store.ensure(source(server, 0))
            assert path.read_bytes() == MODELS["m0.safetensors"]
            assert path.parent == store.models_dir and "m0" not in path.name
            snap = store.snapshot()
            assert [(m.key, m.size_bytes, m.preloaded) for m in snap.models] == [("team/m0", SIZE, False)]
            assert (snap.used_bytes, snap.reserved_bytes, snap.downloads) == (SIZE, 0, ())
            assert snap.download_bandwidth_bytes_per_s is not None
            await store.close()

        run(main())

    def test_a_second_request_is_a_hit_without_another_download(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        metrics = AgentMetrics()

        async def main() -> None:
            store = make_store(metrics=metrics)
            await store.start()
            await store.ensure(source(server, 0))
            await store.ensure(source(server, 0))
            await store.close()

        run(main())
        assert server.request_count() == 1
        assert metrics.value("stoker_agent_cache_hits_total", {"tier": "disk"}) == 1
        assert metrics.value("stoker_agent_cache_misses_total", {"tier": "disk"}) == 1
        assert metrics.value("stoker_agent_downloaded_bytes_total") == SIZE

    def test_concurrent_requests_for_one_model_share_one_download(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.rate_bytes_per_s = 4 * 2**20

        async def main() -> None:
            store = make_store()
            await store.start()
            paths = await asyncio.gather(*(store.ensure(source(server, 0)) for _ in range(5)))
            assert len(set(paths)) == 1
            await store.close()

        run(main())
        assert server.request_count() == 1

    def test_progress_of_a_running_download_is_in_the_snapshot(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.rate_bytes_per_s = 1 * 2**20

        async def main() -> None:
            store = make_store()
            await store.start()
            task = asyncio.create_task(store.ensure(source(server, 0)))
            await until(lambda: any(0 < d.bytes_done < SIZE for d in store.snapshot().downloads))
            snap = store.snapshot()
            (download,) = snap.downloads
            assert download.key == "team/m0" and download.total_bytes == SIZE and download.running
            # reserved as the bytes arrive: ahead of them, never more than the file
            assert download.bytes_done <= snap.reserved_bytes <= SIZE
            assert snap.models == ()
            await task
            await store.close()

        run(main())

    def test_a_changed_source_replaces_the_old_file(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            old = await store.ensure(source(server, 0))
            new = await store.ensure(source(server, 1, key="team/m0"))
            assert new != old and not old.exists()
            assert new.read_bytes() == MODELS["m1.safetensors"]
            assert store.snapshot().used_bytes == SIZE
            await store.close()

        run(main())


class TestEviction:
    def test_the_least_recently_used_model_is_evicted_to_make_room(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store(budget_bytes=int(2.5 * SIZE))
            await store.start()
            p0 = await store.ensure(source(server, 0))
            p1 = await store.ensure(source(server, 1))
            await store.ensure(source(server, 0))  # m0 becomes the most recently used
            await store.ensure(source(server, 2))
            assert p0.exists() and not p1.exists()
            assert [m.key for m in store.snapshot().models] == ["team/m2", "team/m0"]
            await store.close()

        run(main())

    def test_with_the_peer_tier_on_a_copy_other_agents_also_hold_is_evicted_first(
        self, server: ModelServer, make_store: Callable[..., DiskStore], tmp_path: pathlib.Path
    ) -> None:
        class NoPeerHolds:
            """The peer tier is on, but no other agent holds what is asked for: the source serves it."""

            def fetch(self, request: object, **kwargs: object) -> None:
                return None

        async def main(peer_tier: bool) -> list[str]:
            store = make_store(budget_bytes=int(2.5 * SIZE), cache_dir=tmp_path / f"peer-tier-{peer_tier}")
            if peer_tier:
                store.peers = NoPeerHolds()  # type: ignore[assignment]
                store.duplicate_discount_s = 8 * 3600.0
            await store.start()
            await store.ensure(source(server, 0))
            await store.ensure(source(server, 1))
            await store.ensure(source(server, 0))  # m0 is the most recently used...
            store.set_duplicates(frozenset({"team/m0"}))  # ...but another agent holds it too
            await store.ensure(source(server, 2))
            kept = sorted(m.key for m in store.snapshot().models)
            await store.close()
            return kept

        # without the peer tier the operator's word changes nothing: plain LRU drops m1
        assert run(main(False)) == ["team/m0", "team/m2"]
        # with it, m0 can come back from a peer and goes first; m1 is the fleet's only copy
        assert run(main(True)) == ["team/m1", "team/m2"]

    def test_models_in_use_or_held_are_not_evicted_and_the_error_says_why(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store(budget_bytes=int(2.5 * SIZE))
            await store.start()
            await store.ensure(source(server, 1))
            store.hold("team/m1")
            path = await store.ensure(source(server, 0))
            store.pin("team/m0")  # a job uses it
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(source(server, 2))
            assert info.value.reason == "InsufficientCache" and info.value.retryable
            assert "pinned" in info.value.message and path.exists()
            store.unpin("team/m0")
            store.release("team/m1")
            await store.ensure(source(server, 2))
            assert [m.key for m in store.snapshot().models] == ["team/m2", "team/m0"]
            assert store.snapshot().reserved_bytes == 0
            await store.close()

        run(main())

    def test_a_hold_given_before_the_download_protects_the_model(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store(budget_bytes=int(1.5 * SIZE))
            await store.start()
            store.hold("team/m0")
            await store.prefetch(source(server, 0))
            assert store.snapshot().models[0].held
            with pytest.raises(DiskStoreError):
                await store.ensure(source(server, 1))
            await store.close()

        run(main())


class TestSafety:
    def test_a_file_that_is_not_valid_safetensors_is_discarded(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.add("junk.safetensors", os.urandom(4096))

        async def main() -> None:
            store = make_store()
            await store.start()
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(ModelSource(key="team/junk", url=server.url("junk.safetensors")))
            assert info.value.reason == "InvalidSafetensors"
            assert files_in(store) == [] and store.snapshot().reserved_bytes == 0
            await store.close()

        run(main())

    def test_a_checksum_mismatch_leaves_nothing_behind(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        server.faults.corrupt = True

        async def main() -> None:
            store = make_store()
            await store.start()
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(source(server, 0))
            assert info.value.reason == "ChecksumMismatch" and not info.value.retryable
            assert files_in(store) == [] and store.snapshot().reserved_bytes == 0
            await store.close()

        run(main())

    def test_pickle_formats_are_refused_even_when_allowed_since_nothing_could_load_them(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.add("old.ckpt", b"not really a pickle")

        async def main() -> None:
            store = make_store()
            await store.start()
            for allow in (False, True):
                ckpt = ModelSource(key="team/old", url=server.url("old.ckpt"), format="ckpt", allow_pickle=allow)
                with pytest.raises(DiskStoreError) as info:
                    await store.ensure(ckpt)
                assert info.value.reason == "UnsupportedFormat" and "convert" in info.value.message
            assert server.request_count() == 0 and store.snapshot().models == ()
            await store.close()

        run(main())

    def test_a_modelcache_created_again_under_its_name_never_gets_the_old_copy(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            old = source(server, 0, model_uid="uid-old")
            first = await store.ensure(old)
            store.hold("team/m0")  # a replica target, as the operator ordered for the old ModelCache
            again = source(server, 0, model_uid="uid-new")  # same name, same URL, same bytes
            second = await store.ensure(again)
            assert second != first and not first.exists(), "the old copy was served or kept"
            (view,) = store.snapshot().models
            assert (view.key, view.model_uid, view.held) == ("team/m0", "uid-new", True)
            await store.close()
            restarted = make_store()
            await restarted.start()
            assert [m.model_uid for m in restarted.snapshot().models] == ["uid-new"]
            await restarted.close()

        run(main())
        assert server.request_count("m0.safetensors") == 2

    def test_plain_http_is_refused_when_not_allowed(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        async def main() -> None:
            with Downloader(DownloadPolicy(trust_env=False)) as strict:
                store = make_store(downloader=strict)
                await store.start()
                with pytest.raises(DiskStoreError) as info:
                    await store.ensure(source(server, 0))
                assert info.value.reason == "URLNotAllowed"
                await store.close()

        run(main())

    def test_a_server_that_does_not_announce_the_size_is_fine_space_is_reserved_as_bytes_arrive(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.send_content_length = False

        async def main() -> None:
            store = make_store(budget_bytes=int(1.5 * SIZE))
            await store.start()
            path = await store.ensure(source(server, 0))
            assert path.read_bytes() == MODELS["m0.safetensors"]
            snap = store.snapshot()
            assert (snap.used_bytes, snap.reserved_bytes) == (SIZE, 0)
            await store.close()

        run(main())


class TestPriority:
    def test_queued_job_downloads_start_before_queued_prefetches(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.rate_bytes_per_s = 2 * 2**20

        async def main() -> None:
            store = make_store(max_downloads=1)
            await store.start()
            first = asyncio.create_task(store.ensure(source(server, 0)))
            await until(lambda: server.request_count() == 1)
            prefetch = asyncio.create_task(store.prefetch(source(server, 1)))
            await until(lambda: len(store.snapshot().downloads) == 2)
            job = asyncio.create_task(store.ensure(source(server, 2)))
            await until(lambda: len(store.snapshot().downloads) == 3)
            queued = [(d.key, d.priority, d.running) for d in store.snapshot().downloads]
            assert queued == [("team/m0", Priority.JOB, True), ("team/m2", Priority.JOB, False), ("team/m1", Priority.PREFETCH, False)]
            await asyncio.gather(first, prefetch, job)
            await store.close()

        run(main())
        assert [r.path for r in server.requests] == ["/m0.safetensors", "/m2.safetensors", "/m1.safetensors"]

    def test_a_job_waiting_on_a_queued_prefetch_raises_its_priority(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.rate_bytes_per_s = 2 * 2**20

        async def main() -> None:
            store = make_store(max_downloads=1)
            await store.start()
            first = asyncio.create_task(store.ensure(source(server, 0)))
            await until(lambda: server.request_count() == 1)
            p1 = asyncio.create_task(store.prefetch(source(server, 1)))
            p2 = asyncio.create_task(store.prefetch(source(server, 2)))
            await until(lambda: len(store.snapshot().downloads) == 3)
            job = asyncio.create_task(store.ensure(source(server, 2)))
            await until(lambda: store.snapshot().downloads[1].key == "team/m2")
            await asyncio.gather(first, p1, p2, job)
            await store.close()

        run(main())
        assert [r.path for r in server.requests] == ["/m0.safetensors", "/m2.safetensors", "/m1.safetensors"]


class TestRestart:
    def test_lru_order_and_last_use_survive_a_restart(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        clock = Clock()

        async def first_life() -> list[tuple[str, float]]:
            store = make_store(clock=clock)
            await store.start()
            for i in (0, 1, 2):
                await store.ensure(source(server, i))
            await store.ensure(source(server, 0))
            await store.close()
            return [(m.key, m.last_used) for m in store.snapshot().models]

        async def second_life() -> tuple[list[tuple[str, float]], list[str]]:
            store = make_store(clock=clock, budget_bytes=int(3.5 * SIZE))
            await store.start()
            before = [(m.key, m.last_used) for m in store.snapshot().models]
            await store.ensure(source(server, 3))
            after = [m.key for m in store.snapshot().models]
            await store.close()
            return before, after

        remembered = run(first_life())
        before, after = run(second_life())
        assert before == remembered and [k for k, _ in before] == ["team/m0", "team/m2", "team/m1"]
        assert after == ["team/m3", "team/m0", "team/m2"]  # m1 was the least recently used

    def test_use_history_survives_a_restart_so_a_one_off_model_goes_first(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        clock = Clock()

        async def main() -> list[str]:
            store = make_store(clock=clock)
            await store.start()
            for i in (0, 1, 2):
                await store.ensure(source(server, i))
            for key in ("team/m0", "team/m0", "team/m1", "team/m2"):  # m0: two jobs; m1, m2: one each
                store.pin(key)
                store.unpin(key)
            await store.close()
            again = make_store(clock=clock, budget_bytes=int(3.5 * SIZE))
            await again.start()
            await again.ensure(source(server, 3))
            kept = [m.key for m in again.snapshot().models]
            await again.close()
            return kept

        # plain LRU would evict m0 (least recently used); ranking by use frequency evicts m1, used once
        assert sorted(run(main())) == ["team/m0", "team/m2", "team/m3"]

    def test_a_smaller_budget_after_restart_evicts_the_least_recently_used(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            for i in (0, 1, 2):
                await store.ensure(source(server, i))
            await store.close()
            smaller = make_store(budget_bytes=int(1.5 * SIZE))
            await smaller.start()
            assert [m.key for m in smaller.snapshot().models] == ["team/m2"]
            assert len([n for n in files_in(smaller) if not n.endswith(".json")]) == 1
            await smaller.close()

        run(main())

    def test_files_that_cannot_be_trusted_are_removed_on_start(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            good = await store.ensure(source(server, 0))
            truncated = await store.ensure(source(server, 1))
            flipped = await store.ensure(source(server, 2))
            await store.close()
            with truncated.open("r+b") as fh:
                fh.truncate(100)
            data = bytearray(flipped.read_bytes())
            data[-1] ^= 0xFF
            flipped.write_bytes(bytes(data))
            (store.models_dir / "stray.safetensors").write_bytes(b"x" * 10)
            (store.models_dir / "orphan.safetensors.part").write_bytes(b"x" * 10)

            again = make_store(verify_on_start=True)
            await again.start()
            assert [m.key for m in again.snapshot().models] == ["team/m0"]
            assert files_in(again) == sorted([good.name, good.name + ".meta.json"])
            await again.close()

        run(main())

    def test_an_interrupted_download_is_kept_reserved_then_resumed_and_never_reported_as_cached(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        big = make_model(7, size_bytes=2 * 2**20)
        server.add("big.safetensors", big)
        server.faults.rate_bytes_per_s = 4 * 2**20
        big_source = ModelSource(key="team/big", url=server.url("big.safetensors"), sha256=sha(big))

        async def main() -> None:
            store = make_store(budget_bytes=4 * len(big))
            await store.start()
            task = asyncio.create_task(store.ensure(big_source))
            await until(lambda: any(d.bytes_done > 300_000 for d in store.snapshot().downloads))
            await store.close()  # stops the download, keeps the partial file
            with pytest.raises(DiskStoreError) as info:
                await task
            assert info.value.reason == "Cancelled" and info.value.retryable

            again = make_store(budget_bytes=4 * len(big))
            await again.start()
            snap = again.snapshot()
            # the bytes on disk stay reserved, not the whole file: the rest is reserved as it arrives
            (part,) = again.models_dir.glob("*.part")
            assert snap.models == () and snap.parked_partial_bytes == part.stat().st_size == snap.reserved_bytes
            assert 300_000 < snap.reserved_bytes < len(big)
            server.faults.rate_bytes_per_s = None
            path = await again.ensure(big_source)
            assert path.read_bytes() == big
            assert again.snapshot().reserved_bytes == 0 and again.snapshot().used_bytes == len(big)
            await again.close()

        run(main())
        (resumed,) = server.range_requests("big.safetensors")
        assert int(resumed.removeprefix("bytes=").rstrip("-")) > 300_000

    def test_a_kept_partial_download_gives_way_when_space_is_needed(
        self, server: ModelServer, make_store: Callable[..., DiskStore], tmp_path: pathlib.Path
    ) -> None:
        async def main() -> None:
            store = make_store(budget_bytes=SIZE + 500)
            await store.start()
            dest = store.models_dir / source(server, 0).file_name
            part, sidecar = partial_paths(dest)
            part.write_bytes(MODELS["m0.safetensors"][:1000])
            sidecar.write_text(json.dumps({"resume_key": source(server, 0).digest, "sha256": sha(MODELS["m0.safetensors"]), "validator": None, "total_bytes": SIZE}))
            dest.with_name(dest.name + ".pending.json").write_text(json.dumps({"key": "team/m0", "source": source(server, 0).digest}))
            await store.close()
            again = make_store(budget_bytes=SIZE + 500)
            await again.start()
            assert again.snapshot().parked_partial_bytes == 1000  # what is on disk, not the whole file
            await again.ensure(source(server, 1))
            assert again.snapshot().parked_partial_bytes == 0 and not part.exists()
            await again.close()

        run(main())

    def test_kill_9_during_a_download_then_restart_resumes_without_reporting_a_partial_file(
        self, server: ModelServer, make_store: Callable[..., DiskStore], tmp_path: pathlib.Path
    ) -> None:
        big = make_model(9, size_bytes=4 * 2**20)
        server.add("big.safetensors", big)
        server.faults.rate_bytes_per_s = 2 * 2**20
        cache_dir = tmp_path / "cache"
        script = textwrap.dedent(
            f"""
            import asyncio, pathlib
            from stoker.agent.disk_store import DiskStore, ModelSource
            from stoker.agent.download import Downloader, DownloadPolicy

            async def main():
                store = DiskStore(cache_dir=pathlib.Path({str(cache_dir)!r}), budget_bytes={8 * len(big)},
                                  downloader=Downloader(DownloadPolicy(allow_http=True, trust_env=False)))
                await store.start()
                await store.ensure(ModelSource(key="team/big", url={server.url("big.safetensors")!r}, sha256={sha(big)!r}))

            asyncio.run(main())
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while not any(p.stat().st_size > 500_000 for p in cache_dir.glob("models/*.part")):
                assert proc.poll() is None, "the agent process exited before it was killed"
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        async def main() -> None:
            store = make_store(budget_bytes=8 * len(big))
            await store.start()
            assert store.snapshot().models == ()
            assert not store.is_cached("team/big")
            server.faults.rate_bytes_per_s = None
            path = await store.ensure(ModelSource(key="team/big", url=server.url("big.safetensors"), sha256=sha(big)))
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha(big)
            assert [m.key for m in store.snapshot().models] == ["team/big"]
            await store.close()

        run(main())
        (resumed,) = server.range_requests("big.safetensors")
        assert int(resumed.removeprefix("bytes=").rstrip("-")) > 500_000


class TestPreload:
    @pytest.fixture
    def preload_dir(self, tmp_path: pathlib.Path) -> pathlib.Path:
        root = tmp_path / "preload"
        root.mkdir()
        (root / "baked.safetensors").write_bytes(MODELS["m0.safetensors"])
        (tmp_path / "outside.safetensors").write_bytes(MODELS["m1.safetensors"])
        manifest = {
            "models": [
                {"key": "team/baked", "file": "baked.safetensors", "sha256": sha(MODELS["m0.safetensors"])},
                {"key": "team/escape", "file": "../outside.safetensors"},
                {"key": "team/missing", "file": "missing.safetensors"},
            ]
        }
        (root / "manifest.json").write_text(json.dumps(manifest))
        return root

    def test_baked_in_models_are_served_without_download_and_cost_no_budget(
        self, server: ModelServer, make_store: Callable[..., DiskStore], preload_dir: pathlib.Path
    ) -> None:
        async def main() -> None:
            store = make_store(preload_dir=preload_dir, budget_bytes=SIZE)
            await store.start()
            path = await store.ensure(source(server, 0, key="team/baked"))
            assert path == (preload_dir / "baked.safetensors").resolve()
            snap = store.snapshot()
            assert [(m.key, m.preloaded, m.held) for m in snap.models] == [("team/baked", True, True)]
            assert (snap.used_bytes, snap.preloaded_bytes, snap.free_bytes) == (0, SIZE, SIZE)
            # the same bytes under another name are found by digest
            assert await store.ensure(source(server, 0, key="other/name")) == path
            # a full budget evicts downloads, never the baked-in model
            await store.ensure(source(server, 1))
            await store.ensure(source(server, 2))
            assert path.exists()
            await store.close()

        run(main())
        assert [r.path for r in server.requests] == ["/m1.safetensors", "/m2.safetensors"]

    def test_manifest_entries_outside_the_preload_directory_are_ignored(
        self, server: ModelServer, make_store: Callable[..., DiskStore], preload_dir: pathlib.Path
    ) -> None:
        async def main() -> None:
            store = make_store(preload_dir=preload_dir)
            await store.start()
            assert [m.key for m in store.snapshot().models] == ["team/baked"]
            await store.close()

        run(main())

    def test_baked_in_files_that_are_not_valid_safetensors_are_ignored_at_start(
        self, server: ModelServer, make_store: Callable[..., DiskStore], preload_dir: pathlib.Path
    ) -> None:
        (preload_dir / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"x" * 64)
        (preload_dir / "cut.safetensors").write_bytes(MODELS["m2.safetensors"][:-10])
        manifest = json.loads((preload_dir / "manifest.json").read_text())
        manifest["models"] += [{"key": "team/pickle", "file": "pickle.safetensors"},
                               {"key": "team/cut", "file": "cut.safetensors"}]
        (preload_dir / "manifest.json").write_text(json.dumps(manifest))

        async def main() -> None:
            store = make_store(preload_dir=preload_dir)
            await store.start()
            assert [m.key for m in store.snapshot().models] == ["team/baked"]
            await store.close()

        run(main())


class TestNotRegularFiles:
    def test_fifos_in_the_cache_folder_do_not_block_the_start_up_scan(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        """A FIFO opened for reading blocks until a writer comes: every file the scan reads must be
        checked to be a regular file first (open with O_NONBLOCK, then fstat)."""

        async def main() -> None:
            store = make_store()
            await store.start()
            kept = await store.ensure(source(server, 0))
            await store.close()
            models = store.models_dir
            os.mkfifo(models / "aaaa.safetensors.meta.json")  # metadata that is a FIFO
            os.mkfifo(models / "bbbb.safetensors")  # data that is a FIFO, with metadata claiming it
            (models / "bbbb.safetensors.meta.json").write_text(json.dumps(
                {"key": "team/fifo", "source": "x", "sha256": "0" * 64, "size_bytes": 0, "format": "safetensors"}))
            os.mkfifo(models / "cccc.safetensors.pending.json")
            os.mkfifo(models / "stray-fifo")
            os.mkfifo(store.cache_dir / "index.json.fifo")
            (store.cache_dir / "index.json").unlink()
            os.mkfifo(store.cache_dir / "index.json")

            again = make_store()
            await asyncio.wait_for(again.start(), timeout=30)
            assert [m.key for m in again.snapshot().models] == ["team/m0"]
            assert files_in(again) == sorted([kept.name, kept.name + ".meta.json"])
            await again.close()

        run(main())


class TestConfiguration:
    def test_settings_come_from_flags_over_environment_over_defaults(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("STOKER_DISK_BUDGET_BYTES", "20GiB")
        monkeypatch.setenv("STOKER_ALLOWED_HOSTS", "models.example.com, .mirror.internal")
        monkeypatch.setenv("STOKER_JOB_SLOTS", "2")
        settings = AgentSettings.from_args(["--cache-dir", str(tmp_path / "c"), "--job-slots", "3", "--allow-http"])
        assert settings.disk_budget_bytes == 20 * 2**30
        assert settings.allowed_hosts == ["models.example.com", ".mirror.internal"]
        assert (settings.job_slots, settings.allow_http, settings.cache_dir.is_dir()) == (3, True, True)
        policy = settings.download_policy()
        assert policy.allow_http and policy.allowed_hosts == frozenset({"models.example.com", ".mirror.internal"})

    def test_credential_settings_name_a_secrets_folder_and_the_secrets_readable_through_the_api(
        self, tmp_path: pathlib.Path
    ) -> None:
        grants = '[{"secret": "hub-token", "hosts": ["models.example.com"]}, {"secret": "late", "hosts": [".hub.example"]}]'
        settings = AgentSettings.from_args(["--cache-dir", str(tmp_path), "--api-secrets", "hub-token, late",
                                            "--secrets-dir", str(tmp_path / "secrets"), "--credentials", grants])
        assert [(g.secret, g.hosts) for g in settings.credentials] == [
            ("hub-token", ("models.example.com",)), ("late", (".hub.example",))]
        assert settings.api_secrets == ["hub-token", "late"] and settings.secrets_dir == tmp_path / "secrets"
        assert AgentSettings.load(cache_dir=tmp_path).secrets_dir == pathlib.Path("/var/run/stoker/secrets")

    def test_the_default_budget_is_50_gib(self, tmp_path: pathlib.Path) -> None:
        assert AgentSettings.load(cache_dir=tmp_path).disk_budget_bytes == 50 * 2**30

    @pytest.mark.parametrize(
        ("flags", "expected"),
        [
            (["--disk-budget-bytes", "0"], "disk budget must be more than 0"),
            (["--disk-budget-bytes", "lots"], "is not a size"),
            (["--max-downloads", "0"], "--max-downloads"),
            (["--preload-dir", "/nonexistent/preload"], "preload_dir"),
            (["--max-downloads", "2", "--max-prefetches", "2"], "must be less than max_downloads"),
        ],
    )
    def test_invalid_settings_are_explained(self, tmp_path: pathlib.Path, flags: list[str], expected: str) -> None:
        with pytest.raises(SettingsError, match=expected):
            AgentSettings.from_args(["--cache-dir", str(tmp_path), *flags])

    def test_a_cache_dir_that_cannot_be_written_is_refused(self, tmp_path: pathlib.Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(SettingsError, match="cache_dir .* cannot be created"):
            AgentSettings.load(cache_dir=blocker / "cache")

    def test_sizes_accept_units(self) -> None:
        assert [parse_size_bytes(v) for v in ("512", "1KiB", "1.5GiB", "2G", "1Ti")] == [
            512, 1024, 3 * 2**29, 2 * 10**9, 2**40,
        ]

    def test_a_store_built_from_settings_uses_them(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        settings = AgentSettings.load(cache_dir=tmp_path / "c", disk_budget_bytes=str(3 * SIZE), allow_http=True)
        metrics = AgentMetrics()

        async def main() -> None:
            store = DiskStore.from_settings(settings, metrics=metrics)
            await store.start()
            await store.ensure(source(server, 0))
            assert store.snapshot().budget_bytes == 3 * SIZE
            await store.close()
            store.downloader.close()

        run(main())
        text = metrics.render().decode()
        assert f'stoker_agent_cache_budget_bytes{{tier="disk"}} {float(3 * SIZE)}' in text
        assert f'stoker_agent_cache_used_bytes{{tier="disk"}} {float(SIZE)}' in text
        assert "stoker_agent_download_duration_seconds_count 1.0" in text

    def test_two_agents_in_one_process_keep_separate_metrics(self) -> None:
        a, b = AgentMetrics(), AgentMetrics()
        a.download_failures.labels("ChecksumMismatch").inc()
        assert a.value("stoker_agent_download_failures_total", {"reason": "ChecksumMismatch"}) == 1
        assert b.value("stoker_agent_download_failures_total", {"reason": "ChecksumMismatch"}) == 0


class TestPrefetch:
    def test_a_prefetch_downloads_and_a_failed_one_raises_its_reason(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            ok, bad = await asyncio.gather(
                store.prefetch(source(server, 0)),
                store.prefetch(ModelSource(key="team/gone", url=server.url("gone.safetensors"))),
                return_exceptions=True)
            assert store.is_cached("team/m0") and not store.is_cached("team/gone")
            assert isinstance(bad, DiskStoreError) and bad.reason == "HTTPNotFound"
            await store.close()

        run(main())


def cache_agent_status(store: DiskStore) -> CacheAgentStatus:
    """The CacheAgent status the agent builds from this store (as `stoker-agent` wires it)."""
    from stoker.agent.main import disk_view

    empty = status_report.TierView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=())
    identity = status_report.Identity(pod="p", node="n", zone="", gpu_model="cpu", vram_bytes=0)
    return status_report.build_status(identity=identity, disk=disk_view(store), ram=empty, vram=empty, slots=1,
                                      running=[], failures=[], bandwidth=Bandwidths(), observed_generation=None)


class TestReporting:
    def test_the_snapshot_maps_onto_cache_agent_status(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        server.add("bad.safetensors", b"\x00" * 64)

        async def main() -> None:
            store = make_store()
            await store.start()
            await store.ensure(source(server, 0))
            store.hold("team/m0")
            with pytest.raises(DiskStoreError):
                await store.ensure(ModelSource(key="team/bad", url=server.url("bad.safetensors"), sha256="0" * 64))
            status = cache_agent_status(store)
            (model,) = status.models
            assert (model.name, model.tier, model.size_bytes, model.held) == ("m0", "disk", SIZE, True)
            assert model.last_used and model.last_used.endswith("Z")
            assert status.disk.used_bytes == SIZE and status.models_on_disk == 1
            (failure,) = store.snapshot().failures
            assert (failure.key, failure.reason, failure.retryable) == ("team/bad", "ChecksumMismatch", False)
            assert (store.snapshot().download_bandwidth_bytes_per_s or 0) > 0
            await store.close()

        run(main())

    def test_a_success_clears_the_previous_failure(self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            server.faults.status_override = 403
            with pytest.raises(DiskStoreError):
                await store.ensure(source(server, 0))
            assert [f.reason for f in store.snapshot().failures] == ["HTTPForbidden"]
            server.faults.status_override = None
            await store.ensure(source(server, 0))
            assert store.snapshot().failures == ()
            await store.close()

        run(main())


class TestStartupChecks:
    def test_a_file_whose_safetensors_header_was_damaged_is_dropped_on_restart_by_default(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            good = await store.ensure(source(server, 0))
            damaged = await store.ensure(source(server, 1))
            await store.close()
            data = bytearray(damaged.read_bytes())
            data[8:10] = b"[["  # the JSON header no longer parses; the size stays the same
            damaged.write_bytes(bytes(data))

            again = make_store()  # verify_on_start is off: no re-hash, but the header is checked
            await again.start()
            assert [m.key for m in again.snapshot().models] == ["team/m0"]
            assert files_in(again) == sorted([good.name, good.name + ".meta.json"])
            await again.close()

        run(main())


class TestAbandon:
    def test_a_released_prefetch_stops_downloading_and_keeps_its_partial_file_for_a_resume(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        big = make_model(11, size_bytes=2 * 2**20)
        server.add("big.safetensors", big)
        server.faults.rate_bytes_per_s = 2 * 2**20
        big_source = ModelSource(key="team/big", url=server.url("big.safetensors"), sha256=sha(big))

        async def main() -> None:
            store = make_store(budget_bytes=4 * len(big))
            await store.start()
            store.hold("team/big")
            prefetch = asyncio.create_task(store.prefetch(big_source))
            await until(lambda: any(d.bytes_done > 200_000 for d in store.snapshot().downloads))
            prefetch.cancel()
            store.release("team/big")
            assert store.abandon("team/big")
            await until(lambda: store.snapshot().downloads == ())
            snap = store.snapshot()
            (part,) = store.models_dir.glob("*.part")
            assert snap.models == () and snap.parked_partial_bytes == part.stat().st_size > 200_000
            server.faults.rate_bytes_per_s = None
            assert (await store.ensure(big_source)).read_bytes() == big
            await store.close()

        run(main())
        (resumed,) = server.range_requests("big.safetensors")
        assert int(resumed.removeprefix("bytes=").rstrip("-")) > 200_000

    def test_a_download_a_job_waits_for_is_not_abandoned(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        server.faults.rate_bytes_per_s = 2 * SIZE

        async def main() -> None:
            store = make_store()
            await store.start()
            prefetch = asyncio.create_task(store.prefetch(source(server, 0)))
            job = asyncio.create_task(store.ensure(source(server, 0), priority=Priority.JOB))
            await until(lambda: any(d.bytes_done > 0 for d in store.snapshot().downloads))
            prefetch.cancel()
            assert not store.abandon("team/m0")
            assert (await job).read_bytes() == MODELS["m0.safetensors"]
            await store.close()

        run(main())
        assert server.request_count("m0.safetensors") == 1


class TestReservingRoom:
    def test_kept_partial_downloads_are_not_thrown_away_when_that_would_not_make_room(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store(budget_bytes=int(1.5 * SIZE))
            await store.start()
            dest = store.models_dir / source(server, 0).file_name
            part, sidecar = partial_paths(dest)
            part.write_bytes(MODELS["m0.safetensors"][:1000])
            sidecar.write_text(json.dumps({"resume_key": source(server, 0).digest, "sha256": sha(MODELS["m0.safetensors"]),
                                           "validator": None, "total_bytes": SIZE}))
            dest.with_name(dest.name + ".pending.json").write_text(json.dumps({"key": "team/m0", "source": source(server, 0).digest}))
            await store.close()
            again = make_store(budget_bytes=int(1.5 * SIZE))
            await again.start()
            too_big = source(server, 1, size_bytes=2 * SIZE, sha256=None)
            with pytest.raises(DiskStoreError) as info:
                await again.ensure(too_big)
            # Larger than the whole budget: said so, with the size, for the operator to fail the model.
            assert (info.value.reason, info.value.size_bytes, info.value.retryable) == ("ExceedsDiskBudget", 2 * SIZE, True)
            assert again.snapshot().parked_partial_bytes == 1000 and part.exists()
            await again.close()

        run(main())
        assert server.request_count() == 0


class TestUseRanks:
    """Frequency ranks (stoker.userank) across restarts, and the fleet rank a download starts from."""

    @staticmethod
    async def used(store: DiskStore, key: str, times: int) -> None:
        for _ in range(times):
            store.pin(key)
            store.unpin(key)

    def test_ranks_and_the_ranks_of_evicted_models_survive_a_restart(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        clock = Clock()

        async def main() -> None:
            store = make_store(clock=clock, budget_bytes=int(2.5 * SIZE))
            await store.start()
            for i, uses in ((0, 3), (1, 1)):
                await store.ensure(source(server, i))
                await self.used(store, f"team/m{i}", uses)
            await store.ensure(source(server, 2))  # evicts m1, used once
            ranks = {k: e.rank_s for k, e in store.state.entries.items()}
            evicted = dict(store.state.evicted)
            assert set(evicted) == {"team/m1"} and ranks["team/m0"] is not None
            await store.close()
            index = json.loads((store.cache_dir / "index.json").read_text())
            assert index["version"] == 2 and set(index["rank"]) == {"team/m0"} and index["evicted"] == evicted

            again = make_store(clock=clock, budget_bytes=int(2.5 * SIZE))
            await again.start()
            assert {k: e.rank_s for k, e in again.state.entries.items()} == ranks
            assert dict(again.state.evicted) == evicted
            await again.ensure(source(server, 1))  # comes back with the rank it had, not as new
            assert again.state.entries["team/m1"].rank_s == evicted["team/m1"]
            await again.close()

        run(main())

    def test_an_index_written_before_ranks_were_saved_still_loads(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            await store.ensure(source(server, 0))
            await self.used(store, "team/m0", 2)
            await store.close()
            path = store.cache_dir / "index.json"
            index = json.loads(path.read_text())
            old = {"version": 1, **{k: index[k] for k in ("last_used", "previous_use", "used")}}
            path.write_text(json.dumps(old))
            again = make_store()
            await again.start()
            entry = again.state.entries["team/m0"]
            assert entry.used and entry.previous_use is not None
            # without a saved rank, the last two uses give it
            assert entry.rank_s == pytest.approx(add_use(entry.previous_use, entry.last_used,
                                                         half_life_s=DEFAULT_HALF_LIFE_S))
            assert again.state.evicted == {}
            await again.close()

        run(main())

    def test_a_download_starts_from_the_fleet_rank_so_a_model_busy_elsewhere_outlives_a_one_off(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        clock = Clock()

        async def main() -> None:
            store = make_store(clock=clock, budget_bytes=int(2.5 * SIZE))
            await store.start()
            busy_elsewhere = clock.now + 3 * DEFAULT_HALF_LIFE_S  # eight recent jobs across the fleet
            await store.ensure(source(server, 0), rank_hint_s=busy_elsewhere)
            await store.ensure(source(server, 1))
            await self.used(store, "team/m1", 1)  # m1 was used last, m0 never here
            snapshot = {m.key: m.rank_s for m in store.snapshot().models}
            assert snapshot["team/m0"] == busy_elsewhere
            status = {m.name: m.rank for m in cache_agent_status(store).models}
            assert status["m0"] == round(busy_elsewhere, 3)
            await store.ensure(source(server, 2))
            assert sorted(store.state.entries) == ["team/m0", "team/m2"], "the one-off goes, not the busy model"
            await store.close()

        run(main())

    def test_waiters_sharing_a_download_give_it_the_highest_of_their_hints(
        self, server: ModelServer, make_store: Callable[..., DiskStore]
    ) -> None:
        async def main() -> None:
            store = make_store()
            await store.start()
            await asyncio.gather(store.prefetch(source(server, 0), rank_hint_s=5e6),
                                 store.ensure(source(server, 0), rank_hint_s=9e6),
                                 store.ensure(source(server, 0)))
            assert server.request_count("m0.safetensors") == 1
            assert store.state.entries["team/m0"].rank_s == 9e6
            await store.close()

        run(main())


@pytest.fixture
def small_volume(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A real 1 MiB tmpfs: a cache volume that fills up long before the disk budget says it should."""
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class TestLocalFaults:
    def test_a_full_volume_is_a_retryable_fault_of_the_agent_that_clears_when_space_comes_back(
        self, server: ModelServer, make_store: Callable[..., DiskStore], small_volume: pathlib.Path
    ) -> None:
        big = make_model(9, size_bytes=2 * 2**20)
        server.add("big.safetensors", big)
        big_source = ModelSource(key="team/big", url=server.url("big.safetensors"), sha256=sha(big))

        async def main() -> None:
            store = make_store(cache_dir=small_volume / "cache", budget_bytes=50 * 2**20)
            await store.start()
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(big_source)
            err = info.value
            assert (err.reason, err.retryable, err.local) == ("DiskFull", True, True)
            assert "not of the model's source" in err.message
            assert [f.reason for f in store.health.faults()] == ["DiskFull"]
            assert store.snapshot().failures == (), "a full disk is no failure of the model"
            assert store.snapshot().reserved_bytes == 0 and not list(store.models_dir.glob("*.part"))
            assert not await store.probe(), "still too small for the file that did not fit"
            subprocess.run(["mount", "-o", "remount,size=16m", str(small_volume)], check=True)
            assert await store.probe() and not store.health.degraded
            assert (await store.ensure(big_source)).read_bytes() == big
            await store.close()

        run(main())
