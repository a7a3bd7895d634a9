"""Prometheus metrics of one agent, in a registry of its own.

Each `AgentMetrics` owns a private `CollectorRegistry`, so several agents (tests,
the local demo) can live in one process without clashing over metric names.
Metrics are separate from logs: counters and gauges here, events in the log.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AgentMetrics", "DOWNLOAD_DURATION_BUCKETS_S"]

DOWNLOAD_DURATION_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class AgentMetrics:
    """The agent's metrics; tiers are `disk`, `ram` and `vram`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
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
            "stoker_agent_download_failures", "Failed model downloads by reason.", ["reason"], registry=r
        )
        self.downloads_in_progress = Gauge(
            "stoker_agent_downloads_in_progress", "Model downloads running or queued.", registry=r
        )
        self.download_bandwidth = Gauge(
            "stoker_agent_download_bandwidth_bytes_per_second",
            "Measured download bandwidth (moving average of recent downloads).",
            registry=r,
        )

    def render(self) -> bytes:
        """The exposition text, as served on /metrics."""
        return prometheus_client.generate_latest(self.registry)

    def serve(self, *, port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
        """Serve /metrics on `port` from a daemon thread; port 0 picks a free one."""
        return prometheus_client.start_http_server(port, addr=addr, registry=self.registry)  # type: ignore[return-value]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (for tests and the status report); 0 when absent."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
