"""Carry out the operator's orders in this agent's CacheAgent spec (I/O).

spec.holds is the full desired set: listed models are downloaded in the background
(behind job downloads) and never evicted; models no longer listed are released, which
makes them evictable again (not deleted) and stops their download unless a job waits
for it (the partial file is kept for a resume). A hold at tier vram (or ram) is a hot
replica: once the file is on disk it is loaded and kept loaded (`hot_holds`); a hold
lowered to disk, or released, is unloaded unless a job is using it.

A held model that is not on disk (or not loaded, for a hot hold) is fetched (loaded)
again until it is: a failed prefetch or load is retried with exponential backoff and
jitter (bounded by `retry_max_s`), so a source that was down, a Secret created late, or
a VRAM budget taken by running jobs heals without a new order. A load failure is not a
source failure: it is logged and retried, never reported in status.modelFailures. A prefetched copy
starts from the model's fleet-wide use rank (ModelCache status.useRank), as a job's
download does, so a replica of a model in steady use is ranked by that use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from stoker import kube
from stoker.agent import pools
from stoker.agent.disk_store import DiskStore, DiskStoreError
from stoker.agent.hot_holds import HotHolds
from stoker.api.cacheagent import CacheAgentSpec, ModelFailure
from stoker.api.modelcache import ModelCache

log = logging.getLogger(__name__)


def retry_delay_s(failures: int, *, initial_s: float, max_s: float, jitter: float) -> float:
    """Wait before the next try after `failures` failures in a row (pure).

    Doubles from `initial_s` up to `max_s`; `jitter` in [0, 1) spreads agents that failed
    together over the upper half of the interval, so they do not retry in lockstep.
    """
    base = min(max_s, initial_s * 2.0 ** min(max(0, failures - 1), 60))
    return base * (0.5 + 0.5 * jitter)


@dataclasses.dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


class OrderFollower:
    def __init__(self, *, objects: kube.Objects, name: str, store: DiskStore,
                 resolve: Callable[[ModelCache], Any], failures: dict[str, ModelFailure],
                 on_change: Callable[[], None], hot: HotHolds | None = None,
                 retry_initial_s: float = 5.0, retry_max_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, jitter: Callable[[], float] = random.random,
                 watch_timeout_s: int = 30) -> None:
        self.objects, self.name, self.store = objects, name, store
        self.resolve, self.failures, self.on_change = resolve, failures, on_change
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._clock, self._jitter = clock, jitter
        self.watch_timeout_s = watch_timeout_s
        """Server-side timeout of one watch request; stopping waits for the current one to end."""
        self.held: set[str] = set()
        self.tiers: dict[str, str] = {}
        """Key -> ordered tier (disk, ram or vram) of every held model."""
        self.hot = hot
        self._unloading: set[asyncio.Task[None]] = set()
        self.observed_generation: int | None = None
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        thread_stop = threading.Event()
        loop = self._loop

        def on_event(kind: str, obj: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the daemon watch thread may outlive the loop at exit
                loop.call_soon_threadsafe(self._on_event, kind, obj)

        watcher = pools.run_in_thread(
            kube.stream_events, self.objects.custom.list_namespaced_custom_object, stop=thread_stop,
            on_event=on_event, group="stoker.dev", version="v1alpha1", namespace=self.objects.namespace,
            plural="cacheagents", field_selector=f"metadata.name={self.name}", timeout_s=self.watch_timeout_s,
            name="watch-orders")
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self.reconcile()
                self._wake.clear()
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait({stopping, woken}, timeout=self._next_retry_in_s(),
                                   return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
        finally:
            thread_stop.set()
            stopping.cancel()
            for task in self._fetching.values():
                task.cancel()
            watcher.cancel()
            if self._unloading:
                await asyncio.gather(*self._unloading, return_exceptions=True)

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            return
        spec = CacheAgentSpec.model_validate(obj.get("spec") or {})
        self.apply(spec, generation=obj["metadata"].get("generation"))

    def apply(self, spec: CacheAgentSpec, *, generation: int | None) -> None:
        """Take in the orders of `spec` (the full desired set of holds)."""
        tiers = {f"{self.objects.namespace}/{h.model}": h.tier for h in spec.holds}
        wanted = set(tiers)
        if self.hot is not None:
            for key, tier in sorted(self.hot.held().items()):
                if tiers.get(key) != tier:
                    log.info("order: stop keeping %s loaded in %s", key, tier)
                    task = self._fetching.pop(key, None)
                    if task is not None:
                        task.cancel()
                    self._unload(key)
        for key in sorted(self.held - wanted):
            log.info("order: release %s", key)
            self.store.release(key)
            task = self._fetching.pop(key, None)
            if task is not None:
                task.cancel()
            self.store.abandon(key)
            self._backoff.pop(key, None)
            self.failures.pop(key, None)  # no longer ordered: its failure says nothing the operator needs
        for key in sorted(wanted - self.held):
            log.info("order: hold %s%s", key, "" if tiers[key] == "disk" else f" and keep it loaded in {tiers[key]}")
            self.store.hold(key)
        for key in sorted(wanted & self.held):
            if tiers[key] != self.tiers.get(key):
                log.info("order: keep %s in %s", key, tiers[key])
        self.held = wanted
        self.tiers = tiers
        # Copies another agent also holds: eviction takes them first (a peer can give them back).
        self.store.set_duplicates(frozenset(f"{self.objects.namespace}/{m}" for m in spec.duplicates))
        self.observed_generation = generation
        self.reconcile()
        self.on_change()

    def reconcile(self) -> None:
        """Start a prefetch for every held model that is neither on disk, nor coming, nor backing off.

        A held model that reached the disk another way (a job downloaded it) forgets its
        failed prefetches: nothing is retried and nothing stands reported."""
        now = self._clock()
        for key in sorted(self.held):
            if self.store.is_cached(key) and not self._wants_load(key):
                self._backoff.pop(key, None)
                if self.failures.pop(key, None) is not None:
                    self.on_change()
                continue
            if key in self._fetching:
                continue
            backoff = self._backoff.get(key)
            if backoff is not None and now < backoff.not_before:
                continue
            self._fetching[key] = asyncio.get_running_loop().create_task(self._prefetch(key), name=f"order {key}")

    def _wants_load(self, key: str) -> bool:
        """A hot hold of `key` that is not loaded (in its tier) yet."""
        tier = self.tiers.get(key, "disk")
        return self.hot is not None and tier != "disk" and self.hot.tier_of(key) != tier

    def _unload(self, key: str) -> None:
        assert self.hot is not None
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.hot.release, key), name=f"unload {key}")
        self._unloading.add(task)
        task.add_done_callback(self._unloaded)

    def _unloaded(self, task: asyncio.Task[Any]) -> None:
        self._unloading.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("unloading a hot replica failed: %s", task.exception())
        self.on_change()

    def hot_models(self) -> dict[str, str]:
        """Key -> tier of the models kept loaded as hot replicas now."""
        return self.hot.held() if self.hot is not None else {}

    def _next_retry_in_s(self) -> float | None:
        waiting = [b.not_before for k, b in self._backoff.items()
                   if k in self.held and k not in self._fetching and (not self.store.is_cached(k) or self._wants_load(k))]
        return max(0.0, min(waiting) - self._clock()) if waiting else None

    async def _prefetch(self, key: str) -> None:
        name = key.rsplit("/", 1)[-1]
        failure: ModelFailure | None = None
        local = False
        load_error: _LoadFailed | None = None
        identity: dict[str, Any] = {}  # of the ModelCache read: a failure names its uid and generation
        try:
            obj = await asyncio.to_thread(self.objects.get, "ModelCache", name)
            mc = ModelCache.model_validate(obj)
            identity = {"uid": mc.metadata.get("uid"), "generation": mc.metadata.get("generation")}
            source = await asyncio.to_thread(self.resolve, mc)
            # The copy starts from the model's fleet-wide rank, as a job's download does.
            cached = self.store.is_cached(key)
            path = await self.store.prefetch(source, rank_hint_s=mc.status.use_rank if mc.status is not None else None)
            if not cached:
                log.info("order: %s is on disk", key)
            if self._wants_load(key):
                await self._load(key, path)
        except asyncio.CancelledError:
            raise
        except _LoadFailed as exc:
            failure = None
            load_error = exc
        except DiskStoreError as exc:
            failure = ModelFailure(name=name, reason=exc.reason, message=exc.message, retryable=exc.retryable,
                                   at=kube.now_rfc3339(), size_bytes=exc.size_bytes, **identity)
            local = exc.local  # this agent's disk or memory: retried, but never reported against the model
        except Exception as exc:
            retryable = True
            if kube.is_not_found(exc):
                reason, message = "ModelNotFound", f"ModelCache {key} does not exist"
            else:  # e.g. a credential that cannot be found (JobFailed from the source lookup)
                given = getattr(exc, "reason", None)
                reason = given if isinstance(given, str) and given.isalnum() else "PrefetchFailed"
                message = str(getattr(exc, "message", None) or exc)
                retryable = bool(getattr(exc, "retryable", True))
            failure = ModelFailure(name=name, reason=reason, message=message, retryable=retryable,
                                   at=kube.now_rfc3339(), **identity)
        finally:
            if self._fetching.get(key) is asyncio.current_task():  # a re-hold may have started a newer one
                del self._fetching[key]
        if load_error is not None and key in self.held:
            backoff = self._backoff.setdefault(key, _Backoff())
            backoff.failures += 1
            delay_s = retry_delay_s(backoff.failures, initial_s=self.retry_initial_s, max_s=self.retry_max_s,
                                    jitter=self._jitter())
            backoff.not_before = self._clock() + delay_s
            log.warning("could not keep %s loaded (%s); retrying in %.1f s", key, load_error, delay_s)
        elif failure is None:
            self._backoff.pop(key, None)
            self.failures.pop(key, None)
        elif key in self.held:
            backoff = self._backoff.setdefault(key, _Backoff())
            backoff.failures += 1
            delay_s = retry_delay_s(backoff.failures, initial_s=self.retry_initial_s, max_s=self.retry_max_s,
                                    jitter=self._jitter())
            backoff.not_before = self._clock() + delay_s
            log.warning("prefetch of %s failed (%s: %s); retrying in %.1f s", key, failure.reason, failure.message, delay_s)
            if local:
                self.failures.pop(key, None)
            else:
                self.failures[key] = failure
        self._wake.set()
        self.on_change()

    async def _load(self, key: str, path: Any) -> None:
        """Load the hot hold of `key` from `path` in a worker thread (waited for even when cancelled,
        so a release never races a load still running), then drop it at once if the order changed."""
        assert self.hot is not None
        tier = self.tiers[key]
        load = asyncio.ensure_future(asyncio.to_thread(self.hot.load, key, path, tier))  # type: ignore[arg-type]
        try:
            await asyncio.shield(load)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await load
            raise
        except Exception as exc:
            raise _LoadFailed(f"{type(exc).__name__}: {exc}"[:500]) from exc
        finally:
            if load.done() and not load.cancelled() and load.exception() is None and self.tiers.get(key) != tier:
                self._unload(key)
        self.on_change()


class _LoadFailed(Exception):
    """A hot hold could not be loaded (budget, memory, file); retried with backoff."""
