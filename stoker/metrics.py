"""Metrics pieces the operator and the agent share: build info, the /metrics server, and the
fixed set of failure reasons that may become label values (shell).

Label values come only from fixed sets, so a metric's series stay bounded: a reason an agent
writes (free text as far as the operator can tell) is mapped to one of `FAILURE_REASONS`, or
to `other`.
"""

from __future__ import annotations

import logging
import platform
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge

from stoker import __version__

log = logging.getLogger(__name__)

OTHER = "other"
"""The label value of every reason outside `FAILURE_REASONS`."""

FAILURE_REASONS = frozenset({
    # the operator's own (stoker.operator.jobstate.Reason)
    "AttemptsExhausted", "DeadlineExceeded", "ModelUnavailable", "Cancelled", "AgentLost",
    # downloads (stoker.agent.download.DownloadFailure) and the disk tier
    "ChecksumMismatch", "SizeMismatch", "HTTPNotFound", "HTTPForbidden", "HTTPUnauthorized", "HTTPClientError",
    "HTTPServerError", "HTTPTooManyRequests", "ConnectionFailed", "Timeout", "SizeUnknown", "URLNotAllowed",
    "TooManyRedirects", "IOError", "InvalidRequest", "InsufficientCache", "KeyConflict", "NotCached",
    "SourceChanged", "InvalidSafetensors", "PickleFormatNotAllowed",
    # loading and running (stoker.agent.runner.base.Reason, the job loop)
    "UnsupportedCheckpoint", "UnsupportedLora", "UnsupportedVae", "InvalidParameters", "InsufficientVRAM",
    "GenerationFailed", "BackendUnavailable", "BackendFailed", "OutputFailed", "InvalidHeader", "PickleRefused",
    "LoadFailed", "ModelNotFound", "InvalidModelKind", "APIUnavailable", "AgentError", "AgentStopping",
    "StatusRejected", "PrefetchFailed", "InvalidSpec",
    # model-source credentials
    "SecretNotFound", "SecretForbidden", "SecretUnreadable", "SecretKeyMissing", "InvalidCredential",
})
"""Every reason Stoker itself writes into a job's or a download's failure. A new reason must be
added here, or its failures are counted as `other` (a unit test finds the reasons in the code)."""


def reason_label(reason: object) -> str:
    """`reason` as a label value: itself when it is a known reason, else `other`."""
    text = str(reason) if reason is not None else ""
    return text if text in FAILURE_REASONS else OTHER


def register_build_info(registry: CollectorRegistry, *, component: str) -> Gauge:
    """`stoker_build_info{component, version, python}` = 1, as Prometheus exporters publish theirs."""
    info = Gauge("stoker_build_info", "Always 1; the labels say which Stoker version and component this is.",
                 ["component", "version", "python"], registry=registry)
    info.labels(component, __version__, platform.python_version()).set(1)
    return info


def serve(registry: CollectorRegistry, *, port: int, addr: str) -> tuple[WSGIServer, int]:
    """Serve `registry` on http://addr:port/metrics from a daemon thread; port 0 picks a free
    port. Returns the server and the port it listens on."""
    server, _thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_port)
    log.info("serving metrics on http://%s:%d/metrics", f"[{addr}]" if ":" in addr else addr, bound)
    return server, bound

