"""Carry out the operator's orders in this agent's CacheAgent spec (I/O).

spec.holds is the full desired set: listed models are downloaded in the background
(behind job downloads) and never evicted; models no longer listed are released, which
makes them evictable again, not deleted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from stoker import kube
from stoker.agent.disk_store import DiskStore, DiskStoreError
from stoker.api.cacheagent import CacheAgentSpec, ModelFailure
from stoker.api.modelcache import ModelCache

log = logging.getLogger(__name__)


class OrderFollower:
    def __init__(self, *, objects: kube.Objects, name: str, store: DiskStore,
                 resolve: Callable[[ModelCache], Any], failures: dict[str, ModelFailure],
                 on_change: Callable[[], None]) -> None:
        self.objects, self.name, self.store = objects, name, store
        self.resolve, self.failures, self.on_change = resolve, failures, on_change
        self.held: set[str] = set()
        self.observed_generation: int | None = None
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        thread_stop = threading.Event()
        watcher = asyncio.create_task(asyncio.to_thread(
            kube.stream_events, self.objects.custom.list_namespaced_custom_object, stop=thread_stop,
            on_event=lambda kind, obj: self._loop.call_soon_threadsafe(self._on_event, kind, obj),  # type: ignore[union-attr]
            group="stoker.dev", version="v1alpha1", namespace=self.objects.namespace, plural="cacheagents",
            field_selector=f"metadata.name={self.name}"))
        await stop.wait()
        thread_stop.set()
        for task in self._fetching.values():
            task.cancel()
        watcher.cancel()

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            return
        spec = CacheAgentSpec.model_validate(obj.get("spec") or {})
        self.apply(spec, generation=obj["metadata"].get("generation"))

    def apply(self, spec: CacheAgentSpec, *, generation: int | None) -> None:
        wanted = {f"{self.objects.namespace}/{h.model}" for h in spec.holds}
        for key in sorted(self.held - wanted):
            log.info("order: release %s", key)
            self.store.release(key)
            task = self._fetching.pop(key, None)
            if task is not None:
                task.cancel()
        for key in sorted(wanted - self.held):
            log.info("order: hold %s", key)
            self.store.hold(key)
            if key not in self._fetching:
                self._fetching[key] = asyncio.create_task(self._prefetch(key))
        self.held = wanted
        self.observed_generation = generation
        self.on_change()

    async def _prefetch(self, key: str) -> None:
        name = key.rsplit("/", 1)[-1]
        try:
            obj = await asyncio.to_thread(self.objects.get, "ModelCache", name)
            source = await asyncio.to_thread(self.resolve, ModelCache.model_validate(obj))
            await self.store.prefetch(source)
            self.failures.pop(key, None)
            log.info("order: %s is on disk", key)
        except asyncio.CancelledError:
            raise
        except DiskStoreError as exc:
            log.warning("prefetch of %s failed: %s", key, exc.message)
            self.failures[key] = ModelFailure(name=name, reason=exc.reason, message=exc.message,
                                              retryable=exc.retryable, at=kube.now_rfc3339())
        except Exception as exc:
            reason = getattr(exc, "reason", None)
            log.warning("prefetch of %s failed: %s", key, exc)
            self.failures[key] = ModelFailure(name=name, reason=reason if isinstance(reason, str) and reason.isalpha() else "PrefetchFailed",
                                              message=str(exc)[:1000], retryable=True, at=kube.now_rfc3339())
        finally:
            self._fetching.pop(key, None)
            self.on_change()
