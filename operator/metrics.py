"""Prometheus metrics of the operator, served on --metrics-port (shell).

All metrics live in one private registry, so several operators in one process (tests)
do not collide in the global one. Reason labels come from the fixed set in `stoker.metrics`
(agents write their reasons; an unknown one is counted as `other`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import prometheus_client as prom
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stoker import metrics as shared

log = logging.getLogger(__name__)

REGISTRY = prom.CollectorRegistry(auto_describe=True)
BUILD_INFO = shared.register_build_info(REGISTRY, component="operator")

PHASES = ("Pending", "Scheduled", "Running", "Succeeded", "Failed")

PENDING_JOBS = prom.Gauge(
    "stoker_pending_jobs", "GenerationJobs waiting for a binding.", registry=REGISTRY)
BOUND_JOBS = prom.Gauge(
    "stoker_bound_jobs", "GenerationJobs bound to an agent and not finished.", registry=REGISTRY)
JOBS_FINISHED = prom.Counter(
    "stoker_jobs_finished_total", "GenerationJobs seen to finish (Succeeded or Failed, whoever wrote it), by phase.",
    ["phase"], registry=REGISTRY)
BIND_LATENCY = prom.Histogram(
    "stoker_bind_latency_seconds",
    "From a job's creationTimestamp (one-second resolution) to its binding being written.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600), registry=REGISTRY)
BINDINGS = prom.Counter(
    "stoker_bindings_total", "Jobs bound, by the cache tier of the checkpoint on the chosen agent.",
    ["tier"], registry=REGISTRY)
BIND_CONFLICTS = prom.Counter(
    "stoker_bind_conflicts_total", "Bindings refused by a resourceVersion precondition (the job had changed).",
    registry=REGISTRY)
REQUEUES = prom.Counter(
    "stoker_requeues_total", "Jobs sent back to Pending, by reason (a fixed set; others are counted as 'other').",
    ["reason"], registry=REGISTRY)
JOB_FAILURES = prom.Counter(
    "stoker_job_failures_total", "Jobs the operator failed, by reason (a fixed set; others are counted as 'other').",
    ["reason"], registry=REGISTRY)
UNSCHEDULABLE = prom.Counter(
    "stoker_unschedulable_total", "Pending jobs reported as impossible to place, by reason (one of "
    "ModelCacheNotFound, NoReadyAgent, TooLargeForAnyAgent, InsufficientVRAM, Unschedulable).", ["reason"],
    registry=REGISTRY)
REPLICA_SHORTFALL = prom.Gauge(
    "stoker_replica_shortfall", "Held disk copies missing across all ModelCaches (targets not met yet).",
    registry=REGISTRY)
HOT_REPLICA_SHORTFALL = prom.Gauge(
    "stoker_hot_replica_shortfall", "Loaded copies missing across all ModelCaches.", registry=REGISTRY)
AGENTS = prom.Gauge("stoker_agents", "CacheAgents the operator knows (Ready or not).", registry=REGISTRY)
READY_AGENTS = prom.Gauge("stoker_ready_agents", "CacheAgents whose Lease is being renewed.", registry=REGISTRY)
PASS_SECONDS = prom.Histogram(
    "stoker_scheduling_pass_seconds", "Time to gather state and plan one scheduling pass.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=REGISTRY)
EVENTS_WRITTEN = prom.Counter(
    "stoker_events_written_total", "Kubernetes Events created (each may stand for several merged ones).",
    registry=REGISTRY)
EVENTS_AGGREGATED = prom.Counter(
    "stoker_events_aggregated_total", "Events merged into one already waiting to be written (its count grew).",
    registry=REGISTRY)
EVENTS_DROPPED = prom.Counter(
    "stoker_events_dropped_total",
    "Kubernetes Events not recorded: too many distinct ones waiting, or writing them failed (refused, or no connection).",
    registry=REGISTRY)
SOURCE_FAILED_MODELS = prom.Gauge(
    "stoker_source_failed_models", "ModelCaches whose source counts as Failed (their jobs fail with ModelUnavailable).",
    registry=REGISTRY)
LEADER = prom.Gauge("stoker_leader", "1 while this operator holds the leader Lease.", registry=REGISTRY)


class JobsCollector(Collector):
    """Jobs by phase and the age of the oldest pending job, read from the operator's state at
    scrape time (a standby has the same watches, so it reports them too)."""

    def __init__(self) -> None:
        self.state: Any = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(self.state)

    def _families(self, state: Any = None) -> Iterator[GaugeMetricFamily]:
        by_phase = GaugeMetricFamily("stoker_jobs", "GenerationJobs the operator knows, by phase.", labels=["phase"])
        oldest = GaugeMetricFamily(
            "stoker_oldest_pending_job_age_seconds",
            "Seconds since the creation of the oldest job waiting for a binding (0 when none waits).")
        counts: Counter[str] = Counter()
        first_created: float | None = None
        if state is not None:
            with state.lock:
                for job in state.jobs.values():
                    counts[str(job.phase)] += 1
                for key in state.pending:
                    job = state.jobs.get(key)
                    if job is not None and (first_created is None or job.created_at < first_created):
                        first_created = job.created_at
        for phase in PHASES:
            by_phase.add_metric([phase], counts.get(phase, 0))
        oldest.add_metric([], 0.0 if first_created is None else max(0.0, time.time() - first_created))
        yield by_phase
        yield oldest


JOBS = JobsCollector()
REGISTRY.register(JOBS)


def watch_state(state: Any) -> None:
    """Report `state`'s jobs (the last operator built in this process wins)."""
    JOBS.state = state


def count_finished(before: Any, after: Any) -> None:
    """Count a job that went from a non-terminal phase to a terminal one."""
    if before is not None and not before.terminal and after.terminal:
        JOBS_FINISHED.labels(str(after.phase)).inc()


def serve(port: int, *, addr: str) -> int:
    """Serve /metrics on `addr`:`port` in a daemon thread (0 picks a free port); returns the port."""
    _server, bound = shared.serve(REGISTRY, port=port, addr=addr)
    return bound
