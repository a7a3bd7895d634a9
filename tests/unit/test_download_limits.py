"""Hostile model sources cost bounded time and space: a trickle is cut off, a download ends by
its deadline, a claimed size evicts nothing, and a download nobody waits for stops."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import numpy as np
import pytest
import safetensors.numpy

from stoker.agent import http_guard
from stoker.agent.disk_store import DiskStore, DiskStoreError, ModelSource
from stoker.agent.download import DownloadError, DownloadFailure, DownloadPolicy, DownloadRequest, Downloader
from stoker.agent.metrics import AgentMetrics
from stoker.testing.model_server import ModelServer

T = TypeVar("T")


def make_model(seed: int, size_bytes: int = 256 * 1024) -> bytes:
    rng = np.random.default_rng(seed)
    return safetensors.numpy.save({"w": rng.standard_normal(size_bytes // 4, dtype=np.float32)})


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


def policy(**kwargs: object) -> DownloadPolicy:
    options: dict[str, object] = {"allow_http": True, "backoff_initial_s": 0.01, "backoff_max_s": 0.02,
                                  "trust_env": False, "max_attempts": 2}
    options.update(kwargs)
    return DownloadPolicy(**options)  # type: ignore[arg-type]


class TestTrickles:
    def test_a_source_sending_a_byte_at_a_time_is_cut_off_by_the_minimum_rate(
            self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        server.faults.rate_bytes_per_s, server.faults.chunk_bytes = 20, 1  # a byte every 50 ms: no read ever times out
        started = time.monotonic()
        with Downloader(policy(min_bytes_per_s=1000, throughput_window_s=0.5, read_timeout_s=30)) as d:
            with pytest.raises(DownloadError) as info:
                d.download(DownloadRequest(url=server.url("m0.safetensors"), dest=tmp_path / "m0"))
        elapsed = time.monotonic() - started
        assert info.value.reason == DownloadFailure.TIMEOUT and info.value.attempts == 2
        assert "slower than 1000 bytes/s" in info.value.message
        assert elapsed < 5, elapsed  # two windows and a backoff, not the hours the trickle would take

    def test_a_download_ends_at_its_deadline_whatever_the_rate_and_keeps_its_bytes(
            self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        server.faults.rate_bytes_per_s = 64 * 1024  # steady, and far too slow for the deadline
        started = time.monotonic()
        with Downloader(policy(deadline_s=1.0, min_bytes_per_s=0, max_attempts=6)) as d:
            with pytest.raises(DownloadError) as info:
                d.download(DownloadRequest(url=server.url("m0.safetensors"), dest=tmp_path / "m0"))
        assert info.value.reason == DownloadFailure.DEADLINE_EXCEEDED and info.value.retryable
        assert "within 1 s" in info.value.message
        assert time.monotonic() - started < 3
        assert 0 < (tmp_path / "m0.part").stat().st_size < SIZE  # kept for a resume elsewhere or later

    def test_a_fast_source_is_not_bothered_by_the_limits(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        with Downloader(policy(min_bytes_per_s=1000, throughput_window_s=0.2, deadline_s=30)) as d:
            result = d.download(DownloadRequest(url=server.url("m1.safetensors"), dest=tmp_path / "m1"))
        assert result.path.read_bytes() == MODELS["m1.safetensors"]


class TestSocketReads:
    @pytest.mark.parametrize("read_bytes", [0, 1 << 20])
    def test_a_bulk_client_takes_what_the_socket_holds_in_one_read(self, tmp_path: pathlib.Path, read_bytes: int) -> None:
        body = bytes(range(256)) * (16 * 1024)  # 4 MiB
        with ModelServer({"big.bin": body}) as srv, \
                httpx.Client(transport=http_guard.GuardedTransport(read_bytes=read_bytes)) as client:
            with client.stream("GET", srv.url("big.bin")) as response:
                time.sleep(0.3)  # the server fills the loopback socket's buffer (128 KiB or more)
                chunks = list(response.iter_raw())
        assert b"".join(chunks) == body
        if read_bytes:
            assert 64 * 1024 < max(map(len, chunks)) <= read_bytes
        else:
            assert max(map(len, chunks)) <= 64 * 1024  # httpcore's own read size


@pytest.fixture
def make_store(tmp_path: pathlib.Path) -> Iterator[Callable[..., DiskStore]]:
    downloader = Downloader(policy(max_attempts=2, min_bytes_per_s=0))

    def make(**kwargs: object) -> DiskStore:
        options: dict[str, object] = {"cache_dir": tmp_path / "cache", "budget_bytes": 4 * SIZE,
                                      "downloader": downloader, "metrics": AgentMetrics()}
        options.update(kwargs)
        return DiskStore(**options)  # type: ignore[arg-type]

    yield make
    downloader.close()


def source(server: ModelServer, i: int, **kwargs: object) -> ModelSource:
    name = f"m{i}.safetensors"
    options: dict[str, object] = {"key": f"team/m{i}", "url": server.url(name), "sha256": sha(MODELS[name])}
    options.update(kwargs)
    return ModelSource(**options)  # type: ignore[arg-type]


async def full_cache(store: DiskStore, server: ModelServer) -> None:
    await store.start()
    for i in range(3):  # 3 of the 4 sizes of the budget
        await store.ensure(source(server, i))


class TestSpaceAsBytesArrive:
    def test_a_size_claimed_by_the_server_and_never_sent_evicts_nothing_and_is_released(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        server.add("liar.safetensors", b"0123456789")

        async def main() -> None:
            store = make_store()
            await full_cache(store, server)
            server.faults.claimed_length = 3 * SIZE  # fits only by evicting everything; ten bytes come
            server.faults.range_support = False  # (else the resume's answer admits the file is 10 bytes)
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(ModelSource(key="team/liar", url=server.url("liar.safetensors")))
            assert info.value.reason == "ConnectionFailed" and info.value.retryable
            snap = store.snapshot()
            assert sorted(m.key for m in snap.models) == ["team/m0", "team/m1", "team/m2"]
            assert snap.reserved_bytes == snap.parked_partial_bytes == 10  # only what is on disk
            await store.close()

        run(main())

    def test_a_claimed_size_hint_with_a_missing_file_evicts_nothing_and_reserves_nothing(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        async def main() -> None:
            store = make_store()
            await full_cache(store, server)
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(ModelSource(key="team/gone", url=server.url("gone.safetensors"), size_bytes=3 * SIZE))
            assert info.value.reason == "HTTPNotFound"
            snap = store.snapshot()
            assert len(snap.models) == 3 and snap.reserved_bytes == 0
            await store.close()

        run(main())

    def test_a_claim_that_could_never_fit_fails_before_anything_is_evicted(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        async def main() -> None:
            store = make_store()
            await full_cache(store, server)
            with pytest.raises(DiskStoreError) as info:
                await store.ensure(source(server, 3, size_bytes=95 * 2**20, sha256=None))
            assert info.value.reason == "ExceedsDiskBudget" and info.value.size_bytes == 95 * 2**20
            assert len(store.snapshot().models) == 3 and store.snapshot().reserved_bytes == 0
            await store.close()

        run(main())
        assert server.request_count("m3.safetensors") == 0

    def test_a_real_download_evicts_as_its_bytes_arrive_and_the_budget_holds(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        big = make_model(9, size_bytes=2 * SIZE)
        server.add("big.safetensors", big)
        server.faults.rate_bytes_per_s = 4 * SIZE  # slow enough to watch the reservation grow
        reserved: list[int] = []

        async def main() -> None:
            store = make_store()
            await full_cache(store, server)
            task = asyncio.create_task(store.ensure(ModelSource(key="team/big", url=server.url("big.safetensors"),
                                                                sha256=sha(big))))
            while not task.done():
                snap = store.snapshot()
                assert snap.used_bytes + snap.reserved_bytes <= snap.budget_bytes
                reserved.append(snap.reserved_bytes)
                await asyncio.sleep(0.01)
            assert (await task).read_bytes() == big
            assert len(store.snapshot().models) == 2  # two of the three made room, one by one
            await store.close()

        run(main())
        growing = sorted(set(reserved) - {0})
        assert len(growing) >= 3 and growing[0] < SIZE  # it grew in steps, starting small


class TestNobodyWaits:
    def test_a_download_stops_when_its_only_job_stops_waiting(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        big = make_model(10, size_bytes=2 * SIZE)
        server.add("big.safetensors", big)
        server.faults.rate_bytes_per_s = SIZE

        async def main() -> None:
            store = make_store(budget_bytes=10 * SIZE)
            await store.start()
            job = asyncio.create_task(store.ensure(ModelSource(key="team/big", url=server.url("big.safetensors"),
                                                               sha256=sha(big))))
            await until(lambda: any(d.bytes_done > 10_000 for d in store.snapshot().downloads))
            job.cancel()  # the job was deleted
            await until(lambda: store.snapshot().downloads == ())
            snap = store.snapshot()
            assert 10_000 < snap.parked_partial_bytes < len(big)  # kept for a resume, reserved as far as it got
            await store.close()

        run(main())

    def test_a_download_another_job_still_waits_for_goes_on(
            self, server: ModelServer, make_store: Callable[..., DiskStore]) -> None:
        server.faults.rate_bytes_per_s = 2 * SIZE

        async def main() -> None:
            store = make_store()
            await store.start()
            first = asyncio.create_task(store.ensure(source(server, 0)))
            second = asyncio.create_task(store.ensure(source(server, 0)))
            await until(lambda: any(d.bytes_done > 0 for d in store.snapshot().downloads))
            first.cancel()
            assert (await second).read_bytes() == MODELS["m0.safetensors"]
            await store.close()

        run(main())
        assert server.request_count("m0.safetensors") == 1
