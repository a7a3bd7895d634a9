"""The agent's presence in the API: its CacheAgent, its Lease, its status reports (I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker import kube
from stoker.api import API_VERSION
from stoker.api.cacheagent import CacheAgentStatus
from stoker.api.protocol import FLEET_LABEL, LEASE_DURATION_S, LEASE_RENEW_S

log = logging.getLogger(__name__)

T = TypeVar("T")


def register(objects: kube.Objects, *, name: str, pod_name: str, fleet: str | None = None) -> dict[str, Any]:
    """Create this agent's CacheAgent, or adopt the one a previous run left.

    The CacheAgent is owned by the agent's Pod, so it goes away with the Pod. The agent
    only creates it and writes its status (it has no right to patch the object itself):
    one left by an earlier Pod of the same name is adopted as it is, and when the garbage
    collector removes it with that Pod, `StatusWriter` registers again. With a `fleet`, the
    CacheAgent carries its label, so that only that fleet's operator manages it.
    """
    owner: list[dict[str, Any]] = []
    try:
        pod = objects.core.read_namespaced_pod(pod_name, objects.namespace, _request_timeout=objects.request_timeout)
        owner = [{"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid,
                  "controller": True, "blockOwnerDeletion": False}]
    except ApiException as exc:
        if exc.status != 404:
            raise
        log.warning("pod %s/%s not found: CacheAgent %s will have no owner and outlive this process",
                    objects.namespace, pod_name, name)
    try:
        obj = objects.create("CacheAgent", {
            "apiVersion": API_VERSION, "kind": "CacheAgent",
            "metadata": {"name": name, "ownerReferences": owner, **({"labels": {FLEET_LABEL: fleet}} if fleet else {})},
            "spec": {},
        })
        log.info("registered CacheAgent %s/%s", objects.namespace, name)
    except ApiException as exc:
        if exc.status != 409:
            raise
        obj = objects.get("CacheAgent", name)
        if owner and obj["metadata"].get("ownerReferences") != owner:
            log.info("CacheAgent %s/%s belongs to an earlier pod of the same name; adopting it until the garbage "
                     "collector removes it, then registering again", objects.namespace, name)
        else:
            log.info("adopted existing CacheAgent %s/%s", objects.namespace, name)
    return obj


class LeaseKeeper:
    """Renews the agent's coordination.k8s.io Lease: the heartbeat the operator watches.

    Each Lease request gives up after `renew_s` (connect and read), so a half-open
    connection costs one renewal, never every later one: the next try gets a fresh
    connection well within the Lease's duration.
    """

    def __init__(self, api: client.ApiClient, *, namespace: str, name: str,
                 duration_s: int = LEASE_DURATION_S, renew_s: float = LEASE_RENEW_S,
                 on_attempt: Callable[[bool], object] | None = None) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.duration_s, self.renew_s = duration_s, renew_s
        self.on_attempt = on_attempt
        """Called with whether each renewal attempt succeeded (the agent's health endpoint)."""
        # (a floor, so a short test interval does not time out an answer that is merely slow)
        self.request_timeout = (min(kube.REQUEST_TIMEOUT_S[0], max(1.0, renew_s)), max(2.0, renew_s))

    def renew_once(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        body = {"spec": {"holderIdentity": self.name, "leaseDurationSeconds": self.duration_s,
                         "renewTime": kube.now_rfc3339(now)}}
        try:
            self.coordination.patch_namespaced_lease(self.name, self.namespace, body,
                                                     _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(self.namespace, client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name),
                spec=client.V1LeaseSpec(holder_identity=self.name, lease_duration_seconds=self.duration_s,
                                        acquire_time=now, renew_time=now)), _request_timeout=self.request_timeout)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ok = False
            try:
                await asyncio.to_thread(self.renew_once)
                ok = True
            except Exception as exc:  # keep trying: a missed renewal is what the grace period is for
                log.warning("lease renewal failed: %s", exc)
            if self.on_attempt is not None:
                self.on_attempt(ok)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.renew_s)
            except TimeoutError:
                pass


# Status fields the operator writes (one writer per field, stoker.api.protocol): never sent by
# the agent, or each of its merge patches would reset them.
OPERATOR_FIELDS = frozenset({"conditions"})


Wait = Callable[[asyncio.Event, float], Awaitable[object]]
"""Wait until the event is set or the seconds have passed, whichever comes first."""


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout_s)


class StatusWriter:
    """Writes the CacheAgent status when it changes, debounced: at most one write per
    `min_interval_s`, at once when `kick()` says something significant happened and the
    last write is older than that; and at least every `max_interval_s`, so a status changed
    by someone else is put right. The Lease, not the status, is the heartbeat.

    `clock`, `wait` and `call` (how blocking API calls run) are seams for tests in virtual time."""

    def __init__(self, objects: kube.Objects, *, name: str, build: Callable[[], CacheAgentStatus],
                 min_interval_s: float = 1.0, max_interval_s: float = 60.0,
                 on_missing: Callable[[], object] | None = None, clock: Callable[[], float] = time.monotonic,
                 wait: Wait = wait_event,
                 call: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> None:
        self.objects, self.name, self.build = objects, name, build
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.on_missing = on_missing
        """Called (in a worker thread) when the CacheAgent is gone, to register it again."""
        self._clock, self._wait, self._call = clock, wait, call
        self._kicked = asyncio.Event()
        self._last: dict[str, Any] | None = None
        self.writes = 0

    def kick(self) -> None:
        self._kicked.set()

    async def write_if_changed(self, *, force: bool = False) -> bool:
        status = {k: v for k, v in self.build().wire().items() if k not in OPERATOR_FIELDS}
        if status == self._last and not force:
            return False
        # Lists replace wholesale under a merge patch; fields that disappeared are sent as null.
        try:
            await self._call(self.objects.patch_status, "CacheAgent", self.name, _with_nulls(status, self._last))
        except ApiException as exc:
            if exc.status != 404 or self.on_missing is None:
                raise
            log.warning("CacheAgent %s/%s is gone; registering it again", self.objects.namespace, self.name)
            await self._call(self.on_missing)
            await self._call(self.objects.patch_status, "CacheAgent", self.name, status)
        self._last = status
        self.writes += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        last_write = self._clock()  # the caller wrote the first status before starting the loop
        while not stop.is_set():
            await self._wait(self._kicked, self.min_interval_s)  # a change unkicked goes out within this too
            self._kicked.clear()
            pause = self.min_interval_s - (self._clock() - last_write)
            if pause > 0:
                await self._wait(stop, pause)  # debounce: coalesce bursts of changes
                if stop.is_set():
                    break
            try:
                if await self.write_if_changed(force=self._clock() - last_write >= self.max_interval_s):
                    last_write = self._clock()
            except Exception as exc:
                log.warning("status write for CacheAgent %s failed: %s", self.name, exc)
                self._last = None


def _with_nulls(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """A merge patch from `old` to `new`: fields that disappeared are set to null."""
    patch = dict(new)
    for key in (old or {}):
        if key not in new:
            patch[key] = None
    return patch
