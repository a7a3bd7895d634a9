"""The order follower: the retry schedule for held models that could not be fetched (pure), and its loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from stoker.agent.disk_store import DiskStoreError
from stoker.agent.orders import OrderFollower, retry_delay_s
from stoker.api.cacheagent import CacheAgentSpec


def test_the_delay_doubles_from_the_initial_one_up_to_the_cap() -> None:
    delays = [retry_delay_s(n, initial_s=5, max_s=60, jitter=0.999999) for n in range(1, 7)]
    assert [round(d) for d in delays] == [5, 10, 20, 40, 60, 60]


@given(failures=st.integers(min_value=0, max_value=10_000), jitter=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_jitter_keeps_every_delay_within_the_upper_half_of_its_interval_and_under_the_cap(failures: int, jitter: float) -> None:
    delay = retry_delay_s(failures, initial_s=2.0, max_s=300.0, jitter=jitter)
    base = min(300.0, 2.0 * 2 ** min(max(0, failures - 1), 60))
    assert base / 2 <= delay <= base <= 300


# ---- the order loop ---------------------------------------------------------------------


class FailingStore:
    """The disk store's order-facing calls; every prefetch fails, retryably."""

    def __init__(self) -> None:
        self.cached: set[str] = set()
        self.prefetches = 0

    def is_cached(self, key: str) -> bool:
        return key in self.cached

    def hold(self, key: str) -> None:
        pass

    def release(self, key: str) -> None:
        pass

    def abandon(self, key: str) -> bool:
        return False

    def set_duplicates(self, keys: frozenset[str]) -> None:
        self.duplicates = keys

    async def prefetch(self, source: object, *, rank_hint_s: float | None = None) -> None:
        self.prefetches += 1
        raise DiskStoreError("HTTPServerError", "the model server answered 503", retryable=True)


class NoWatch:
    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no watch in this test")


class Objects:
    namespace = "ns"
    custom = NoWatch()

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
                "spec": {"source": {"url": f"https://models.test/{name}.safetensors"}}}


def test_a_held_model_a_job_downloaded_after_its_prefetch_failed_is_neither_retried_nor_reported() -> None:
    async def main() -> None:
        now = [0.0]
        store, failures = FailingStore(), {}
        passes = [0]
        follower = OrderFollower(objects=Objects(), name="agent-0", store=store,  # type: ignore[arg-type]
                                 resolve=lambda mc: object(), failures=failures, on_change=lambda: None,
                                 retry_initial_s=5.0, retry_max_s=5.0, clock=lambda: now[0], jitter=lambda: 0.0)
        reconcile = follower.reconcile

        def counted() -> None:
            passes[0] += 1
            reconcile()

        follower.reconcile = counted  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.create_task(follower.run(stop))
        await asyncio.sleep(0)
        follower.apply(CacheAgentSpec.model_validate({"holds": [{"model": "m"}]}), generation=1)
        deadline = time.monotonic() + 10
        while "ns/m" not in failures:
            assert time.monotonic() < deadline, "the prefetch failure was never recorded"
            await asyncio.sleep(0.005)
        assert follower._next_retry_in_s() == 2.5  # half of the first delay, as the jitter is 0
        store.cached.add("ns/m")  # a job downloaded the model meanwhile
        now[0] = 10.0  # and the retry is due
        follower.reconcile()
        assert follower._next_retry_in_s() is None and failures == {}
        before = passes[0]
        await asyncio.sleep(0.2)  # the loop, left alone, must now wait instead of spinning
        stop.set()
        await asyncio.wait_for(loop, timeout=10)
        assert passes[0] - before < 5 and store.prefetches == 1

    asyncio.run(main())


def test_the_operators_word_on_duplicates_reaches_the_disk_tier() -> None:
    from stoker.agent.orders import OrderFollower
    from stoker.api.cacheagent import CacheAgentSpec

    store = FailingStore()
    follower = OrderFollower(objects=type("O", (), {"namespace": "ns"})(), name="a", store=store,  # type: ignore[arg-type]
                             resolve=lambda mc: None, failures={}, on_change=lambda: None)
    follower.apply(CacheAgentSpec(duplicates=["m1", "m2"]), generation=2)
    assert store.duplicates == frozenset({"ns/m1", "ns/m2"})
    follower.apply(CacheAgentSpec(), generation=3)
    assert store.duplicates == frozenset()
