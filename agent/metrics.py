"""Prometheus metrics of one agent, in a registry of its own.

Each `AgentMetrics` owns a private `CollectorRegistry`, so several agents (tests,
the local demo) can live in one process without clashing over metric names.
Metrics are separate from logs: counters and gauges here, events in the log.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stoker import metrics as shared
from stoker.agent.job_metrics import JobMetrics

__all__ = ["AgentMetrics", "DOWNLOAD_DURATION_BUCKETS_S", "InstrumentedWeights", "LoadRates", "TierSnapshotLike"]

DOWNLOAD_DURATION_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class AgentMetrics:
    """The agent's metrics; tiers are `disk`, `ram` and `vram`. Every label value comes from a
    fixed set (tiers, outcomes, download failure reasons)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = shared.register_build_info(r, component="agent")
        self.job_slots = Gauge("stoker_agent_job_slots", "Generations this agent runs at once (its slots).", registry=r)
        self.cache_hits = Counter("stoker_agent_cache_hits", "Requests served from a cache tier.", ["tier"], registry=r)
        self.cache_misses = Counter(
            "stoker_agent_cache_misses", "Requests that a cache tier could not serve.", ["tier"], registry=r
        )
        self.evictions = Counter("stoker_agent_cache_evictions", "Models evicted from a cache tier.", ["tier"], registry=r)
        self.used_bytes = Gauge("stoker_agent_cache_used_bytes", "Bytes held in a cache tier.", ["tier"], registry=r)
        self.reserved_bytes = Gauge(
            "stoker_agent_cache_reserved_bytes", "Bytes reserved for loads or downloads in flight.", ["tier"], registry=r
        )
        self.budget_bytes = Gauge("stoker_agent_cache_budget_bytes", "Byte budget of a cache tier.", ["tier"], registry=r)
        self.downloaded_bytes = Counter(
            "stoker_agent_downloaded_bytes", "Bytes received by model downloads.", registry=r
        )
        self.download_duration = Histogram(
            "stoker_agent_download_duration_seconds",
            "Duration of successful model downloads.",
            buckets=DOWNLOAD_DURATION_BUCKETS_S,
            registry=r,
        )
        self.download_failures = Counter(
            "stoker_agent_download_failures",
            "Failed model downloads by reason (a fixed set; others are counted as 'other').", ["reason"], registry=r
        )
        self.downloads_in_progress = Gauge(
            "stoker_agent_downloads_in_progress", "Model downloads running or queued.", registry=r
        )
        self.download_bandwidth = Gauge(
            "stoker_agent_download_bandwidth_bytes_per_second",
            "Measured download bandwidth (moving average of recent downloads).",
            registry=r,
        )
        self.load_bandwidth = Gauge(
            "stoker_agent_load_bandwidth_bytes_per_second",
            "Measured load rate into the device by source tier (moving average of recent loads).",
            ["source"],
            registry=r,
        )
        self.jobs = JobMetrics(r)

    def watch_tier(self, tier: str, snapshot: Callable[[], TierSnapshotLike]) -> None:
        """Publish a hot tier's used, reserved and budget bytes, read from `snapshot()` at scrape time."""
        self.used_bytes.labels(tier).set_function(lambda: snapshot().used_bytes)
        self.reserved_bytes.labels(tier).set_function(lambda: snapshot().reserved_bytes)
        self.budget_bytes.labels(tier).set_function(lambda: snapshot().budget_bytes)

    def render(self) -> bytes:
        """The exposition text, as served on /metrics."""
        return prometheus_client.generate_latest(self.registry)

    def serve(self, *, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, int]:
        """Serve /metrics on `addr`:`port` from a daemon thread; port 0 picks a free one (logged).
        Returns the server and its port."""
        return shared.serve(self.registry, port=port, addr=addr)

    def count_download_failure(self, reason: object) -> None:
        self.download_failures.labels(shared.reason_label(reason)).inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (for tests and the status report); 0 when absent."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got


class TierSnapshotLike(Protocol):
    @property
    def used_bytes(self) -> int: ...
    @property
    def reserved_bytes(self) -> int: ...
    @property
    def budget_bytes(self) -> int: ...


class LoadRates:
    """Measured load rates into the device, by the tier the bytes came from (disk or ram).

    An exponentially weighted moving average of recent loads, as bytes per second: what
    placement divides a model's size by to estimate its load time on this agent.
    """

    WEIGHT = 0.3

    def __init__(self, metrics: AgentMetrics | None = None) -> None:
        self._bps: dict[str, float] = {}
        self._metrics = metrics
        self._lock = threading.Lock()  # loads finish in worker threads

    def record(self, source: str, *, size_bytes: int, seconds: float) -> None:
        if size_bytes <= 0 or seconds <= 0:
            return
        rate = size_bytes / seconds
        with self._lock:
            prev = self._bps.get(source)
            self._bps[source] = value = rate if prev is None else prev + self.WEIGHT * (rate - prev)
        if self._metrics is not None:
            self._metrics.load_bandwidth.labels(source).set(value)

    def bps(self, source: str) -> float:
        """The current estimate, 0 before the first load from `source`."""
        with self._lock:
            return self._bps.get(source, 0.0)


class InstrumentedWeights:
    """The agent's `Weights` with hits and misses counted per hot tier and load rates measured.

    Same interface: `use()` is wrapped, everything else is passed through. A `use` served
    from VRAM is a VRAM hit; otherwise a VRAM miss, and (with a RAM tier) a RAM hit or miss.
    The disk tier counts its own hits and misses when the file is looked up.
    """

    def __init__(self, weights: Any, *, metrics: AgentMetrics, rates: LoadRates) -> None:
        self._weights = weights
        self._metrics = metrics
        self.rates = rates

    def __getattr__(self, name: str) -> Any:
        return getattr(self._weights, name)

    @contextlib.contextmanager
    def use(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with self._weights.use(*args, **kwargs) as (model, tier):
            self.record(tier, size_bytes=model.size_bytes, seconds=model.timings.total_s)
            yield model, tier

    def record(self, tier: str, *, size_bytes: int, seconds: float) -> None:
        hits, misses = self._metrics.cache_hits, self._metrics.cache_misses
        (hits if tier == "vram" else misses).labels("vram").inc()
        if tier == "vram":
            return  # resident: nothing was moved
        if self._weights.ram is not None:
            (hits if tier == "ram" else misses).labels("ram").inc()
        self.rates.record("ram" if tier == "ram" else "disk", size_bytes=size_bytes, seconds=seconds)
