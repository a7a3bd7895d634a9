"""Prometheus metrics of the operator, served on --metrics-port (shell).

All metrics live in one private registry, so several operators in one process (tests)
do not collide in the global one.
"""

from __future__ import annotations

import logging

import prometheus_client as prom

log = logging.getLogger(__name__)

REGISTRY = prom.CollectorRegistry(auto_describe=True)

PENDING_JOBS = prom.Gauge(
    "stoker_pending_jobs", "GenerationJobs waiting for a binding.", registry=REGISTRY)
BOUND_JOBS = prom.Gauge(
    "stoker_bound_jobs", "GenerationJobs bound to an agent and not finished.", registry=REGISTRY)
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
    "stoker_requeues_total", "Jobs sent back to Pending, by reason.", ["reason"], registry=REGISTRY)
JOB_FAILURES = prom.Counter(
    "stoker_job_failures_total", "Jobs the operator failed, by reason.", ["reason"], registry=REGISTRY)
REPLICA_SHORTFALL = prom.Gauge(
    "stoker_replica_shortfall", "Held disk copies missing across all ModelCaches (targets not met yet).",
    registry=REGISTRY)
HOT_REPLICA_SHORTFALL = prom.Gauge(
    "stoker_hot_replica_shortfall", "Loaded copies missing across all ModelCaches.", registry=REGISTRY)
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


def serve(port: int, *, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a daemon thread; 0 disables."""
    if port <= 0:
        return
    prom.start_http_server(port, addr=addr, registry=REGISTRY)
    log.info("serving metrics on %s:%d", addr, port)


# Failure reasons come from agents as text; a label value from outside this set would let any
# writer of a job's status add a time series. Others are counted as "Other".
KNOWN_REASONS = frozenset({
    # the operator's own (stoker.operator.jobstate.Reason)
    "AttemptsExhausted", "DeadlineExceeded", "ModelUnavailable", "Cancelled", "AgentLost",
    # the agents' (downloads, credentials, outputs, files, runners, the job loop)
    "ChecksumMismatch", "SizeMismatch", "HTTPNotFound", "HTTPForbidden", "HTTPUnauthorized", "HTTPClientError",
    "HTTPServerError", "HTTPTooManyRequests", "ConnectionFailed", "Timeout", "DeadlineExceeded", "SizeUnknown",
    "URLNotAllowed", "TooManyRedirects", "IOError", "InvalidRequest", "InsufficientCache", "InvalidSafetensors",
    "InvalidHeader", "PickleFormatNotAllowed", "PickleRefused", "SourceChanged",
    "CredentialNotAllowed", "CredentialHostNotAllowed", "SecretNotFound", "SecretForbidden", "SecretUnreadable",
    "SecretKeyMissing", "InvalidCredential",
    "OutputFailed", "InvalidOutputURL", "OutputURLNotAllowed",
    "ModelNotFound", "InvalidModelKind", "InvalidSpec", "InsufficientVRAM", "UnsupportedCheckpoint",
    "UnsupportedLora", "UnsupportedVae", "InvalidParameters", "GenerationFailed", "BackendUnavailable",
    "BackendFailed", "AgentError", "AgentStopping", "APIUnavailable", "StatusRejected",
})


def reason_label(reason: str | None) -> str:
    """`reason` as a metric label value: itself when it is a known reason, else "Other"."""
    return reason if reason in KNOWN_REASONS else "Other"
