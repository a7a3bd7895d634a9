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

Recording is best effort, as in client-go: a write that fails on the connection (a
reset keep-alive connection, a refused or timed-out connect: urllib3 errors that are
not OSError) or with a 429/5xx answer is tried once more after `retry_s`; then, or at
once for any other refusal, the Event is dropped and counted. No failure ever stops a
writer thread, so `flush()` and shutdown never wait on a queue nobody drains.
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

import urllib3.exceptions
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


def _is_transient(exc: Exception) -> bool:
    """Worth one more try: the connection failed, or the server was overloaded or failing."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, (OSError, urllib3.exceptions.HTTPError))


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _ts(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EventRecorder:
    """Records Events through `EventCorrelator` on background threads."""

    def __init__(self, api: client.ApiClient, *, component: str = "stoker-operator", threads: int = 2,
                 correlator: EventCorrelator | None = None, wall: Callable[[], float] = time.time,
                 busy: Callable[[], bool] = lambda: False, yield_s: float = 0.5, retry_s: float = 0.5,
                 warn_every_s: float = 30.0) -> None:
        self.core = client.CoreV1Api(api)
        self.component = component
        self.correlator = correlator or EventCorrelator()
        self.wall = wall
        self.busy = busy
        self.yield_s = yield_s
        self.retry_s = retry_s
        self.warn_every_s = warn_every_s
        """Failed writes are logged as warnings at most this often (the rest at DEBUG, counted)."""
        self._warned_at = -float("inf")
        self._unwarned = 0
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
            if self._is_busy():
                # Give way to bindings (not woken by new events); repeats keep merging meanwhile.
                self._stopping.wait(self.yield_s)
            with self._cond:
                ev = self.correlator.take()
                if ev is None:
                    continue
                self._writing += 1
            try:
                self._write(ev)
            except Exception:  # a bug building the Event: lose this one, keep the thread
                metrics.EVENTS_DROPPED.inc()
                log.exception("could not build event %s", ev.reason)
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
        for attempt in (1, 2):
            try:
                self._create(ns, body)
            except Exception as exc:  # best effort, like client-go: never fail the caller, never end the thread
                if attempt == 1 and _is_transient(exc) and not self._stopping.is_set():
                    log.debug("retrying event %s on %s/%s after %s", ev.reason, ns, meta.get("name"), _describe(exc))
                    self._stopping.wait(self.retry_s)
                    continue
                metrics.EVENTS_DROPPED.inc()
                self._warn_dropped(ev, ns, exc)
                return
            metrics.EVENTS_WRITTEN.inc()
            return

    def _create(self, namespace: str, body: dict[str, Any]) -> None:
        response = self.core.create_namespaced_event(namespace, body, _preload_content=False)
        try:
            response.read()  # drain it so that the connection can go back to the pool
        finally:
            response.release_conn()

    def _is_busy(self) -> bool:
        try:
            return bool(self.busy())
        except Exception:  # a broken probe must not stop the writers; write as if idle
            log.exception("the busy() probe of the event recorder failed")
            return False

    def _warn_dropped(self, ev: PendingEvent, namespace: str, exc: Exception) -> None:
        what = f"could not record event {ev.reason} on {namespace}/{ev.ref.get('metadata', {}).get('name')}: {_describe(exc)}"
        now = time.monotonic()
        with self._cond:
            quiet = now - self._warned_at < self.warn_every_s
            if quiet:
                self._unwarned += 1
            else:
                unwarned, self._warned_at, self._unwarned = self._unwarned, now, 0
        if quiet:
            log.debug("%s", what)
            return
        more = f" ({unwarned} more dropped since the last warning)" if unwarned else ""
        log.warning("%s%s; Events are best effort, see stoker_events_dropped_total", what, more)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued event is written or dropped (tests, shutdown); False on timeout."""
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
