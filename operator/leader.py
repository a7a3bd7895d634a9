"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does (shell).

Exactly one operator acts at a time; the others keep their watches warm and wait.
The holder renews the Lease every `retry_period_s`; a candidate takes it over once
it has seen no renewal for `lease_duration_s` on its own monotonic clock (so clock
skew between hosts does not matter). A leader that cannot renew within
`renew_deadline_s` stops acting before anyone else may take over. Bindings also
carry resourceVersion preconditions, so even overlapping leaders cannot bind a job
twice.

A holder's `leaseDurationSeconds` is honoured only up to this candidate's own
`lease_duration_s`: every operator replica runs with the same setting, so a longer
value was written by something else (a hostile or broken client), and believing it
would lock every standby out for as long as it says.

Any exception from the client (an `ApiException`, urllib3's `MaxRetryError` while the
API server restarts, a timeout, a bug) is one failed try: the loop goes on, and a
leader that keeps failing loses leadership after `renew_deadline_s` like one that
cannot reach the server.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.api.protocol import LEASE_LABEL, OPERATOR_LEASE
from stoker.operator import metrics

log = logging.getLogger(__name__)


class LeaderElectionError(RuntimeError):
    """The leader Lease could not be read or written for a reason other than contention."""


@dataclasses.dataclass(frozen=True)
class LeaderSettings:
    namespace: str
    identity: str
    name: str = OPERATOR_LEASE
    lease_duration_s: float = 15.0
    """A candidate takes over after seeing no renewal for this long."""
    renew_deadline_s: float | None = None
    """The leader stops acting when it could not renew for this long (default 2/3 of the duration)."""
    retry_period_s: float | None = None
    """How often to renew or retry (default 1/5 of the duration)."""

    @property
    def deadline_s(self) -> float:
        return self.renew_deadline_s if self.renew_deadline_s is not None else self.lease_duration_s * 2 / 3

    @property
    def period_s(self) -> float:
        return self.retry_period_s if self.retry_period_s is not None else max(0.2, self.lease_duration_s / 5)

    @property
    def request_timeout(self) -> tuple[float, float]:
        """(connect, read) seconds of one Lease request: a hung connection costs one try, not the loop."""
        return (max(1.0, self.period_s), max(1.0, self.deadline_s / 2))


class LeaderElector:
    """Run `run(stop)` in a thread; `is_leader()` says whether to act right now."""

    def __init__(self, api: client.ApiClient, settings: LeaderSettings, *,
                 on_started: Callable[[], None] | None = None, on_lost: Callable[[], None] | None = None) -> None:
        self.api = client.CoordinationV1Api(api)
        self.settings = settings
        self.on_started = on_started
        self.on_lost = on_lost
        self._leader = False
        self._last_renew = 0.0
        self._observed: tuple[str | None, str | None] | None = None
        self._observed_at = 0.0
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        with self._lock:
            return self._leader and time.monotonic() - self._last_renew < self.settings.deadline_s

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        log.info("leader election: %s contends for Lease %s/%s", s.identity, s.namespace, s.name)
        while not stop.is_set():
            try:
                acquired = self._try_acquire_or_renew()
            except Exception as exc:  # noqa: BLE001 - one failed try; the deadline decides the rest
                log.warning("leader election: cannot read or write Lease %s/%s: %s", s.namespace, s.name,
                            _describe(exc))
                acquired = False
            now = time.monotonic()
            with self._lock:
                was = self._leader
                if acquired:
                    self._last_renew = now
                    self._leader = True
                elif was and now - self._last_renew >= s.deadline_s:
                    self._leader = False
                is_now = self._leader
            if is_now and not was:
                log.info("leader election: %s is now the leader", s.identity)
                metrics.LEADER.set(1)
                if self.on_started:
                    self.on_started()
            if was and not is_now:
                log.error("leader election: %s lost the lease; stopping", s.identity)
                metrics.LEADER.set(0)
                if self.on_lost:
                    self.on_lost()
                return
            stop.wait(s.period_s)
        if self.is_leader():
            self.release()

    def _try_acquire_or_renew(self) -> bool:
        s = self.settings
        now = dt.datetime.now(dt.timezone.utc)
        try:
            lease = self.api.read_namespaced_lease(s.name, s.namespace, _request_timeout=s.request_timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=s.name, namespace=s.namespace, labels={LEASE_LABEL: "operator"}),
                spec=client.V1LeaseSpec(holder_identity=s.identity, lease_duration_seconds=int(max(1, s.lease_duration_s)),
                                        acquire_time=now, renew_time=now, lease_transitions=0))
            try:
                self.api.create_namespaced_lease(s.namespace, body, _request_timeout=s.request_timeout)
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or None
        record = (holder, spec.renew_time.isoformat() if spec.renew_time else None)
        mono = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, mono
        if holder == s.identity:
            spec.renew_time = now
            spec.lease_duration_seconds = int(max(1, s.lease_duration_s))
        else:
            duration = honoured_duration_s(spec.lease_duration_seconds, own_s=s.lease_duration_s)
            if holder is not None and mono - self._observed_at < duration:
                return False
            log.info("leader election: taking over Lease %s/%s from %s", s.namespace, s.name, holder or "nobody")
            spec.holder_identity = s.identity
            spec.acquire_time = now
            spec.renew_time = now
            spec.lease_duration_seconds = int(max(1, s.lease_duration_s))
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        lease.spec = spec
        # Labelled, so that the operators' Lease watch (which selects on the label) sees every renewal.
        lease.metadata.labels = {**(lease.metadata.labels or {}), LEASE_LABEL: "operator"}
        try:
            self.api.replace_namespaced_lease(s.name, s.namespace, lease,  # carries resourceVersion
                                              _request_timeout=s.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up so that a standby takes over at once (on clean shutdown)."""
        s = self.settings
        with self._lock:
            self._leader = False
        metrics.LEADER.set(0)
        try:
            lease = self.api.read_namespaced_lease(s.name, s.namespace, _request_timeout=s.request_timeout)
            if lease.spec is None or lease.spec.holder_identity != s.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = dt.datetime.now(dt.timezone.utc)
            self.api.replace_namespaced_lease(s.name, s.namespace, lease, _request_timeout=s.request_timeout)
            log.info("leader election: %s released Lease %s/%s", s.identity, s.namespace, s.name)
        except Exception as exc:  # noqa: BLE001 - best effort: the Lease expires anyway
            log.warning("leader election: could not release Lease %s/%s: %s", s.namespace, s.name, _describe(exc))


def honoured_duration_s(written_s: float | None, *, own_s: float) -> float:
    """How long a candidate waits after the last observed renewal of another holder: the
    holder's leaseDurationSeconds, never more than the candidate's own duration (pure)."""
    if written_s is None or written_s <= 0:
        return own_s
    return min(float(written_s), own_s)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]
