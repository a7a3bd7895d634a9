"""Kubernetes Events from the operator, aggregated instead of dropped (shell).

Like client-go's EventCorrelator, in two steps:

- similar events: more than `similar_limit` events with the same object, type and
  reason but different messages within `window_s` are combined into one series whose
  message says "(combined from similar events)" and carries the latest detail;
- identical events (same object, type, reason and message) waiting to be written are
  merged into one Event whose `count`, `firstTimestamp` and `lastTimestamp` cover them
  all.

Events are written in the background by a couple of threads, oldest first, and give
way to the writes that matter: while `busy()` says the operator's write pool is
saturated (a burst of bindings), each thread writes only one Event per `yield_s`, and
the rest wait, merging repeats, until the burst is over. Only when `max_pending`
distinct events wait does a new one get dropped, and then it is counted in
`stoker_events_dropped_total` (merges in `stoker_events_aggregated_total`).
Each write creates one Event (the chart grants the operator `create` on events, not
`patch`), so a series that recurs after being written starts a new Event object.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.operator import metrics

log = logging.getLogger(__name__)

COMBINED_PREFIX = "(combined from similar events): "

EventKey = tuple[str, str, str, str, str, str, str]
"""(namespace, kind, name, uid, type, reason, message)."""


@dataclasses.dataclass(slots=True)
class PendingEvent:
    ref: dict[str, Any]
    type: str
    reason: str
    message: str
    count: int
    first_at: float
    last_at: float
    """Wall-clock seconds."""


class EventCorrelator:
    """The aggregation logic, without I/O: `add()` an event, `take()` the next one to write.

    Not thread-safe by itself; `EventRecorder` guards it with a lock."""

    def __init__(self, *, similar_limit: int = 10, window_s: float = 600.0, max_pending: int = 10_000,
                 max_tracked: int = 20_000) -> None:
        self.similar_limit = similar_limit
        self.window_s = window_s
        self.max_pending = max_pending
        self.max_tracked = max_tracked
        self.pending: collections.OrderedDict[EventKey, PendingEvent] = collections.OrderedDict()
        self._similar: collections.OrderedDict[tuple[str, ...], tuple[float, dict[str, None]]] = collections.OrderedDict()
        """(namespace, kind, name, uid, type, reason) -> (window start, distinct messages seen)."""
        self.dropped = 0
        self.aggregated = 0

    def add(self, ref: dict[str, Any], *, type_: str, reason: str, message: str, now: float) -> str:
        """Queue one event; returns "queued", "merged" or "dropped"."""
        meta = ref.get("metadata", {})
        obj = (str(meta.get("namespace", "")), str(ref.get("kind", "")), str(meta.get("name", "")),
               str(meta.get("uid", "")), type_, reason)
        message = message[:1024]
        start, messages = self._similar.get(obj, (now, {}))
        if now - start > self.window_s:
            start, messages = now, {}
        if len(messages) <= self.similar_limit:
            messages[message] = None  # past the limit the series is combined: no need to remember more
        combined = len(messages) > self.similar_limit
        self._similar[obj] = (start, messages)
        self._similar.move_to_end(obj)
        while len(self._similar) > self.max_tracked:
            self._similar.popitem(last=False)
        if combined:
            key: EventKey = (*obj, COMBINED_PREFIX)
            message = COMBINED_PREFIX + message
        else:
            key = (*obj, message)
        current = self.pending.get(key)
        if current is not None:
            current.count += 1
            current.last_at = now
            current.message = message
            current.ref = ref
            self.aggregated += 1
            return "merged"
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return "dropped"
        self.pending[key] = PendingEvent(ref, type_, reason, message, 1, now, now)
        return "queued"

    def take(self) -> PendingEvent | None:
        """The oldest waiting event (with everything merged into it so far), or None."""
        if not self.pending:
            return None
        return self.pending.popitem(last=False)[1]


def _ts(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EventRecorder:
    """Records Events through `EventCorrelator` on background threads."""

    def __init__(self, api: client.ApiClient, *, component: str = "stoker-operator", threads: int = 2,
                 correlator: EventCorrelator | None = None, wall: Callable[[], float] = time.time,
                 busy: Callable[[], bool] = lambda: False, yield_s: float = 0.5) -> None:
        self.core = client.CoreV1Api(api)
        self.component = component
        self.correlator = correlator or EventCorrelator()
        self.wall = wall
        self.busy = busy
        self.yield_s = yield_s
        self._cond = threading.Condition()
        self._stop = False
        self._stopping = threading.Event()
        self._writing = 0
        self._threads = [threading.Thread(target=self._run, name=f"stoker-event-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def record(self, ref: dict[str, Any], *, reason: str, message: str, warning: bool = False) -> None:
        with self._cond:
            outcome = self.correlator.add(ref, type_="Warning" if warning else "Normal", reason=reason,
                                          message=message, now=self.wall())
            if outcome == "queued":
                self._cond.notify()
        if outcome == "merged":
            metrics.EVENTS_AGGREGATED.inc()
        elif outcome == "dropped":
            metrics.EVENTS_DROPPED.inc()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.correlator.pending:
                    self._cond.wait()
                if self._stop and not self.correlator.pending:
                    return
            if self.busy():
                # Give way to bindings (not woken by new events); repeats keep merging meanwhile.
                self._stopping.wait(self.yield_s)
            with self._cond:
                ev = self.correlator.take()
                if ev is None:
                    continue
                self._writing += 1
            try:
                self._write(ev)
            finally:
                with self._cond:
                    self._writing -= 1
                    self._cond.notify_all()

    def _write(self, ev: PendingEvent) -> None:
        meta = ev.ref.get("metadata", {})
        ns = meta.get("namespace", "default")
        # A plain dict, and the response left unparsed: the client's model (de)serialization
        # would cost more CPU than the write itself.
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name', 'x')}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {"apiVersion": ev.ref.get("apiVersion"), "kind": ev.ref.get("kind"),
                               "name": meta.get("name"), "namespace": ns, "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": ev.reason, "message": ev.message, "type": ev.type, "count": ev.count,
            "firstTimestamp": _ts(ev.first_at), "lastTimestamp": _ts(ev.last_at),
            "source": {"component": self.component},
        }
        try:
            response = self.core.create_namespaced_event(ns, body, _preload_content=False)
            response.read()  # drain it so that the connection goes back to the pool
            response.release_conn()
            metrics.EVENTS_WRITTEN.inc()
        except (ApiException, OSError) as exc:  # best-effort, like client-go: never fail the caller
            metrics.EVENTS_DROPPED.inc()
            log.warning("could not record event %s on %s/%s: %s", ev.reason, ns, meta.get("name"),
                        getattr(exc, "reason", exc))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event is written (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.correlator.pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._stopping.set()
        for t in self._threads:
            t.join(timeout_s)
