"""What an agent reports about models it could not fetch (CacheAgent status.modelFailures):
each failure names the ModelCache (uid and generation) it was about, so that the operator
can tell a failure of an earlier ModelCache or spec from one of the current; a released
hold takes its model's failure along."""

from __future__ import annotations

import asyncio
import copy
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from stoker.agent import jobs
from stoker.agent.disk_store import DiskStoreError, ModelSource
from stoker.agent.job_metrics import JobMetrics
from stoker.agent.orders import OrderFollower
from stoker.agent.runner.base import ArtifactKind
from stoker.api.cacheagent import CacheAgentSpec, ModelFailure

pytestmark = pytest.mark.timeout(60)


class FakeObjects:
    namespace = "ns"

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}

    def add(self, name: str, *, uid: str, generation: int) -> None:
        self.models[name] = {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                             "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": generation},
                             "spec": {"source": {"url": f"http://models.test/{name}.safetensors"}}}

    def get(self, kind: str, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.models[name])


class BadSourceStore:
    """A disk store whose every fetch finds the wrong bytes."""

    def __init__(self) -> None:
        self.held: set[str] = set()

    def _mismatch(self, source: ModelSource) -> DiskStoreError:
        return DiskStoreError("ChecksumMismatch", f"{source.key}: sha256 differs", key=source.key)

    async def ensure(self, source: ModelSource, **_: Any) -> pathlib.Path:
        raise self._mismatch(source)

    async def prefetch(self, source: ModelSource, **_: Any) -> None:
        raise self._mismatch(source)

    def is_cached(self, key: str) -> bool:
        return False

    def hold(self, key: str) -> None:
        self.held.add(key)

    def release(self, key: str) -> None:
        self.held.discard(key)

    def abandon(self, key: str) -> None:
        pass

    def set_duplicates(self, keys: frozenset[str]) -> None:
        pass


async def until(predicate: Callable[[], Any], *, what: str, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return value


def test_a_job_downloads_permanent_failure_names_the_modelcache_the_job_read(tmp_path: pathlib.Path) -> None:
    objects = FakeObjects()
    objects.add("ckpt", uid="uid-1", generation=4)
    worker = jobs.JobWorker(
        objects=objects,  # type: ignore[arg-type]
        settings=jobs.JobSettings(agent="agent-a", namespace="ns", results_dir=tmp_path),
        store=BadSourceStore(), weights=None, runner=None,  # type: ignore[arg-type]
        metrics=JobMetrics(CollectorRegistry()), on_change=lambda: None)

    async def main() -> None:
        source, _ = await worker._resolve("ckpt", ArtifactKind.CHECKPOINT)
        with pytest.raises(jobs.JobFailed):
            await worker._fetch(source, [], None)

    asyncio.run(main())
    failure = worker.model_failures["ns/ckpt"]
    assert (failure.name, failure.reason, failure.uid, failure.generation) == ("ckpt", "ChecksumMismatch", "uid-1", 4)


def test_a_failed_prefetch_names_the_modelcache_and_releasing_the_hold_drops_the_failure() -> None:
    objects = FakeObjects()
    objects.add("sd", uid="uid-7", generation=2)
    store = BadSourceStore()
    failures: dict[str, ModelFailure] = {}
    follower = OrderFollower(objects=objects, name="agent-a", store=store,  # type: ignore[arg-type]
                             resolve=lambda mc: ModelSource(key=f"ns/{mc.name}", url=mc.spec.source.url),
                             failures=failures, on_change=lambda: None, clock=lambda: 0.0, jitter=lambda: 0.0)

    async def main() -> None:
        follower.apply(CacheAgentSpec.model_validate({"holds": [{"model": "sd"}]}), generation=1)
        failure = await until(lambda: failures.get("ns/sd"), what="the prefetch to fail")
        assert (failure.reason, failure.uid, failure.generation) == ("ChecksumMismatch", "uid-7", 2)
        follower.apply(CacheAgentSpec.model_validate({"holds": []}), generation=2)
        assert failures == {}, "a model no longer held reports no failure"
        assert store.held == set()

    asyncio.run(main())
