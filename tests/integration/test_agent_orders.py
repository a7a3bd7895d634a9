"""The agent's reporting and order following against the real API server, in process.

The pieces `stoker-agent` wires together (DiskStore, StatusWriter, LeaseKeeper,
OrderFollower) run here on one event loop against the session's kube-apiserver, with
models served over HTTP from 127.0.0.1, so each behaviour can be driven and timed.
The test plays the operator: it writes orders into the CacheAgent spec and conditions
into its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import safetensors.numpy
from kubernetes import client, watch

from stoker import kube
from stoker.agent import status_report
from stoker.agent.disk_store import DiskStore, DiskStoreError, ModelSource
from stoker.agent.download import DownloadPolicy, Downloader
from stoker.agent.jobs import model_source
from stoker.agent.orders import OrderFollower
from stoker.agent.reporter import LeaseKeeper, StatusWriter, register
from stoker.api.cacheagent import Bandwidths, ModelFailure
from stoker.testing.model_server import ModelServer

T = TypeVar("T")
AGENT = "agent-o"
MODEL_BYTES = 512 * 1024


def make_model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return safetensors.numpy.save({"w": rng.standard_normal(MODEL_BYTES // 4, dtype=np.float32)})


MODELS = {f"m{i}": make_model(i) for i in range(4)}
SIZE = len(MODELS["m0"])


async def eventually(predicate: Callable[[], T], *, timeout_s: float = 30.0, message: str = "condition") -> T:
    """Poll `predicate` (blocking calls allowed: it runs in a thread) until it is truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = await asyncio.to_thread(predicate)
        except Exception:  # noqa: BLE001 - the object may not exist yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {message}")
        await asyncio.sleep(0.05)


@dataclasses.dataclass
class Agent:
    objects: kube.Objects
    store: DiskStore
    writer: StatusWriter
    orders: OrderFollower
    failures: dict[str, ModelFailure]
    extra: dict[str, Any]
    """Values the status builder reads (tests change them to change the status)."""

    def status(self) -> dict[str, Any]:
        return self.objects.get("CacheAgent", AGENT).get("status") or {}

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status().get("models", []) if m["name"] == name), None)

    def hold(self, *names: str) -> None:
        self.objects.patch("CacheAgent", AGENT, {"spec": {"holds": [{"model": n} for n in names]}})


@contextlib.asynccontextmanager
async def running_agent(objects: kube.Objects, cache_dir: pathlib.Path, *, min_interval_s: float = 0.2,
                        max_interval_s: float = 600.0, retry_initial_s: float = 5.0,
                        attempts: int = 3, run_writer: bool = True) -> AsyncIterator[Agent]:
    downloader = Downloader(DownloadPolicy(allow_http=True, trust_env=False, max_attempts=attempts,
                                           backoff_initial_s=0.01, backoff_max_s=0.05))
    store = DiskStore(cache_dir=cache_dir, budget_bytes=2 * SIZE, downloader=downloader)
    await store.start()
    await asyncio.to_thread(register, objects, name=AGENT, pod_name=AGENT)
    failures: dict[str, ModelFailure] = {}
    extra: dict[str, Any] = {"slots": 1}
    writer: StatusWriter
    orders = OrderFollower(objects=objects, name=AGENT, store=store, resolve=lambda mc: model_source(objects, mc),
                           failures=failures, on_change=lambda: writer.kick(), retry_initial_s=retry_initial_s,
                           retry_max_s=2 * retry_initial_s, watch_timeout_s=1)
    identity = status_report.Identity(pod=AGENT, node="node-a", zone="", gpu_model="cpu", vram_bytes=0)
    empty = status_report.TierView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=())

    def build():  # type: ignore[no-untyped-def]
        snap = store.snapshot()
        disk = status_report.DiskView(
            budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes, reserved_bytes=snap.reserved_bytes,
            entries=tuple(status_report.DiskEntryView(key=m.key, size_bytes=m.size_bytes, last_used=m.last_used,
                                                      preloaded=m.preloaded, held=m.held) for m in snap.models),
            downloads=tuple(status_report.DownloadView(key=d.key, bytes_done=d.bytes_done, total_bytes=d.total_bytes)
                            for d in snap.downloads))
        return status_report.build_status(identity=identity, disk=disk, ram=empty, vram=empty, slots=extra["slots"],
                                          running=[], failures=list(failures.values()), bandwidth=Bandwidths(),
                                          observed_generation=orders.observed_generation)

    writer = StatusWriter(objects, name=AGENT, build=build, min_interval_s=min_interval_s, max_interval_s=max_interval_s,
                          on_missing=lambda: register(objects, name=AGENT, pod_name=AGENT))
    await writer.write_if_changed()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(orders.run(stop))]
    if run_writer:
        tasks.append(asyncio.create_task(writer.run(stop)))
    try:
        yield Agent(objects=objects, store=store, writer=writer, orders=orders, failures=failures, extra=extra)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        await store.close()
        downloader.close()


@pytest.fixture
def objects(api_client, namespace) -> kube.Objects:
    objs = kube.Objects(api_client, namespace)
    objs.core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=AGENT),
        spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="stoker:dev")])))
    return objs


@pytest.fixture
def server(objects: kube.Objects) -> Iterator[ModelServer]:
    with ModelServer({f"{name}.safetensors": data for name, data in MODELS.items()}) as srv:
        for name, data in MODELS.items():
            objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                          "metadata": {"name": name}, "spec": {"source": {
                                              "url": srv.url(f"{name}.safetensors"),
                                              "sha256": hashlib.sha256(data).hexdigest()}}})
        yield srv


def source(objects: kube.Objects, server: ModelServer, name: str) -> ModelSource:
    return ModelSource(key=f"{objects.namespace}/{name}", url=server.url(f"{name}.safetensors"),
                       sha256=hashlib.sha256(MODELS[name]).hexdigest())


class StatusWatch:
    """Counts the writes the API server sees to one CacheAgent's status."""

    def __init__(self, objects: kube.Objects) -> None:
        self.objects = objects
        self.versions: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        version = self.objects.get("CacheAgent", AGENT)["metadata"]["resourceVersion"]
        while not self._stop.is_set():
            for event in watch.Watch().stream(
                    self.objects.custom.list_namespaced_custom_object, "stoker.dev", "v1alpha1", self.objects.namespace,
                    "cacheagents", field_selector=f"metadata.name={AGENT}", resource_version=version, timeout_seconds=1):
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] == "MODIFIED":
                    self.versions.append((time.monotonic(), event["object"].get("status") or {}))

    def __enter__(self) -> StatusWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [s for at, s in self.versions if at >= t]


class TestStatusReports:
    def test_an_operator_written_condition_survives_the_agents_status_writes(self, objects, tmp_path) -> None:
        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache", run_writer=False) as agent:
                ready = {"type": "Ready", "status": "True", "reason": "LeaseRenewed", "message": "the agent renews its Lease",
                         "lastTransitionTime": "2026-01-01T00:00:00Z"}
                await asyncio.to_thread(objects.patch_status, "CacheAgent", AGENT, {"conditions": [ready]})
                for slots in (2, 3, 4):
                    agent.extra["slots"] = slots
                    assert await agent.writer.write_if_changed()
                await agent.writer.write_if_changed(force=True)
                status = await asyncio.to_thread(agent.status)
                assert status["slots"] == 4
                assert status["conditions"] == [ready]

        asyncio.run(main())

    def test_a_burst_of_changes_gives_far_fewer_writes_than_changes_and_the_last_value_goes_out(
            self, objects, tmp_path) -> None:
        # The debounce timing itself is checked in virtual time (tests/unit/test_reporter.py).
        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache", min_interval_s=1.0) as agent:
                with StatusWatch(objects) as seen:
                    burst_start = time.monotonic()
                    for i in range(60):  # a change and a kick every 50 ms
                        agent.extra["slots"] = 10 + i
                        agent.writer.kick()
                        await asyncio.sleep(0.05)
                    await eventually(lambda: agent.status().get("slots") == 69, timeout_s=30, message="the last value")
                    await eventually(lambda: seen.since(burst_start) and seen.since(burst_start)[-1]["slots"] == 69,
                                     timeout_s=30, message="the watch to see the last write")
                    writes = len(seen.since(burst_start))
                    assert 1 <= writes <= 20, f"{writes} writes for 60 changes"

        asyncio.run(main())

    def test_a_status_someone_else_changed_is_put_right_within_the_maximum_interval(self, objects, tmp_path) -> None:
        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache", max_interval_s=1.0) as agent:
                await asyncio.to_thread(objects.patch_status, "CacheAgent", AGENT, {"slots": 42, "node": "elsewhere"})
                await eventually(lambda: agent.status().get("node") == "node-a", timeout_s=10, message="the repair")
                assert agent.status()["slots"] == 1

        asyncio.run(main())

    def test_a_deleted_cache_agent_is_registered_again_by_the_next_write(self, objects, tmp_path) -> None:
        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache") as agent:
                await asyncio.to_thread(objects.delete, "CacheAgent", AGENT)
                agent.extra["slots"] = 2
                agent.writer.kick()
                status = await eventually(agent.status, timeout_s=10, message="the CacheAgent back")
                assert status["slots"] == 2
                ca = await asyncio.to_thread(objects.get, "CacheAgent", AGENT)
                assert ca["metadata"]["ownerReferences"][0]["name"] == AGENT

        asyncio.run(main())


class TestLease:
    def test_the_lease_is_created_renewed_and_recreated_after_deletion(self, api_client, namespace) -> None:
        leases = client.CoordinationV1Api(api_client)

        async def main() -> None:
            keeper = LeaseKeeper(api_client, namespace=namespace, name=AGENT, duration_s=3, renew_s=0.3)
            stop = asyncio.Event()
            task = asyncio.create_task(keeper.run(stop))
            try:
                first = await eventually(lambda: leases.read_namespaced_lease(AGENT, namespace), message="the Lease")
                assert first.spec.holder_identity == AGENT and first.spec.lease_duration_seconds == 3
                renewed = await eventually(
                    lambda: (lease := leases.read_namespaced_lease(AGENT, namespace)).spec.renew_time
                    > first.spec.renew_time and lease, message="a renewal")
                assert renewed.spec.renew_time - first.spec.renew_time < datetime.timedelta(seconds=3)
                await asyncio.to_thread(leases.delete_namespaced_lease, AGENT, namespace)
                await eventually(lambda: leases.read_namespaced_lease(AGENT, namespace), message="the Lease recreated")
            finally:
                stop.set()
                await task

        asyncio.run(main())


class TestOrders:
    def test_a_held_model_is_downloaded_kept_and_once_released_evicted_when_room_is_needed(
            self, objects, server, tmp_path) -> None:
        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache") as agent:  # room for two models
                await asyncio.to_thread(agent.hold, "m0")
                m0 = await eventually(lambda: (m := agent.model("m0")) and m["held"] and m, message="m0 held")
                assert m0["sizeBytes"] == SIZE
                await agent.store.ensure(source(objects, server, "m1"))
                agent.store.pin(f"{objects.namespace}/m1")  # a job is using m1
                with pytest.raises(DiskStoreError) as info:
                    await agent.store.ensure(source(objects, server, "m2"))
                assert info.value.reason == "InsufficientCache"  # m0 is held, m1 in use
                await asyncio.to_thread(agent.hold)  # release everything
                await eventually(lambda: not agent.model("m0")["held"], message="m0 released")
                await agent.store.ensure(source(objects, server, "m2"))
                assert not agent.store.is_cached(f"{objects.namespace}/m0")
                await eventually(lambda: agent.model("m0") is None and agent.model("m2"), message="m0 evicted")

        asyncio.run(main())

    def test_releasing_a_model_stops_its_download_and_keeps_the_partial_file(self, objects, server, tmp_path) -> None:
        server.faults.rate_bytes_per_s = SIZE / 10

        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache") as agent:
                await asyncio.to_thread(agent.hold, "m0")
                await eventually(lambda: any(d["bytesDone"] > 0 for d in agent.status().get("downloads", [])),
                                 message="the download to start")
                await asyncio.to_thread(agent.hold)
                await eventually(lambda: agent.status().get("downloads") == [], timeout_s=10,
                                 message="the download to stop")
                kept = agent.store.snapshot().parked_partial_bytes
                parts = list((tmp_path / "cache" / "models").glob("*.part"))
                size = parts[0].stat().st_size
                assert kept == size and agent.model("m0") is None  # the bytes on disk stay reserved, no more
                await asyncio.sleep(1.0)
                assert 0 < parts[0].stat().st_size == size < SIZE  # nothing more arrives

        asyncio.run(main())

    def test_a_hold_whose_download_failed_is_retried_until_it_is_on_disk(self, objects, server, tmp_path) -> None:
        server.faults.fail_count = 2
        server.faults.fail_status = 503

        async def main() -> None:
            async with running_agent(objects, tmp_path / "cache", attempts=1, retry_initial_s=0.3) as agent:
                await asyncio.to_thread(agent.hold, "m0")
                failure = await eventually(lambda: agent.status().get("modelFailures"), message="the failure report")
                assert failure[0]["name"] == "m0" and failure[0]["retryable"] is True
                await eventually(lambda: (m := agent.model("m0")) and m["held"], timeout_s=20, message="m0 on disk")
                await eventually(lambda: not agent.status().get("modelFailures"), message="the failure cleared")

        asyncio.run(main())
        assert server.request_count("m0.safetensors") == 3
