"""Hostile model sources: whatever a server does, the job fails with the reason that names it,
the agent's slots, cache and Lease are unharmed, and a deleted job's download stops."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stoker.testing.model_server import Faults, ModelServer
from stoker.testing.operator_harness import wait_for

GOOD = "tiny-sd15"


@pytest.fixture
def source(suite) -> Iterator[ModelServer]:  # type: ignore[no-untyped-def]
    """A model server of the case's own (its faults touch nobody else), holding a copy of a good checkpoint."""
    with ModelServer({"model.safetensors": suite.files[GOOD]}) as server:
        yield server


def sha_of(suite: Any) -> str:
    return hashlib.sha256(suite.files[GOOD].read_bytes()).hexdigest()


def fault(**switches: Any) -> Callable[[Faults], None]:
    def apply(faults: Faults) -> None:
        for key, value in switches.items():
            setattr(faults, key, value)
    return apply


# (id, faults, ModelCache options, job status reason, last attempt's reason, words in the message)
CASES = [
    ("not-found", fault(status_override=404), {}, "HTTPNotFound", "HTTPNotFound", "check spec.source.url"),
    ("forbidden", fault(status_override=403), {}, "HTTPForbidden", "HTTPForbidden", "permissions"),
    ("unauthorized", fault(required_token="t0k3n"), {}, "HTTPUnauthorized", None, "secretRef"),
    ("server-error", fault(status_override=500), {}, "AttemptsExhausted", "HTTPServerError", "500"),
    ("too-many-requests", fault(status_override=429), {}, "AttemptsExhausted", "HTTPTooManyRequests", "429"),
    ("trickle", fault(rate_bytes_per_s=50, chunk_bytes=1), {}, "AttemptsExhausted", "Timeout", "slower than 4000 bytes/s"),
    ("drops-connection", fault(drop_after_bytes=1000, drop_count=100), {}, "AttemptsExhausted", "ConnectionFailed",
     "connection dropped"),
    ("corrupt-bytes", fault(corrupt=True), {"sha": True}, "ChecksumMismatch", "ChecksumMismatch", "discarded"),
    ("wrong-digest", fault(), {"sha256": "0" * 64}, "ChecksumMismatch", "ChecksumMismatch", "expected 000"),
    ("size-hint-lie", fault(), {"size_bytes": 95 * 2**20}, "SizeMismatch", "SizeMismatch", "sizeBytes"),
    # A size beyond every agent's whole budget fails the model at once: no agent could ever hold it.
    ("claims-more-than-the-budget", fault(claimed_length=2**40), {}, "ModelUnavailable", None, "disk budget"),
    ("claims-95-mib-sends-a-few", fault(claimed_length=95 * 2**20, range_support=False), {}, "AttemptsExhausted",
     "ConnectionFailed", "connection dropped"),
]


@pytest.mark.parametrize(("faults", "options", "reason", "attempt_reason", "says"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_hostile_model_server_fails_the_job_with_its_reason_and_harms_nothing_else(
        suite, unharmed, source, faults, options, reason, attempt_reason, says) -> None:  # type: ignore[no-untyped-def]
    faults(source.faults)
    model, job = suite.name("mc"), suite.name("job")
    options = dict(options)
    if options.pop("sha", False):
        options["sha256"] = sha_of(suite)
    suite.model(model, source.url("model.safetensors"), **options)
    reserved_before = suite.disk_reserved_bytes()
    suite.job(job, model=model)
    suite.failed(job, reason, attempt_reason=attempt_reason, says=says)
    # No size a server or a ModelCache only claimed stays reserved (at most the bytes that came,
    # kept for a resume), and nothing was evicted for it (the canary below is still cached).
    arrived = suite.files[GOOD].stat().st_size
    wait_for(lambda: suite.disk_reserved_bytes() <= reserved_before + arrived, timeout_s=10,
             message=lambda: f"reservations to go back: {suite.disk_reserved_bytes()} bytes reserved")
    unharmed()


def test_a_redirect_to_a_host_that_is_not_allowed_is_not_followed(suite, unharmed, source) -> None:  # type: ignore[no-untyped-def]
    with ModelServer({"model.safetensors": suite.files[GOOD]}, host="127.0.0.2") as elsewhere:
        source.faults.redirects = {"model.safetensors": elsewhere.url("model.safetensors")}
        model, job = suite.name("mc"), suite.name("job")
        suite.model(model, source.url("model.safetensors"))
        suite.job(job, model=model)
        suite.failed(job, "URLNotAllowed", says="not in the agent's download host allowlist")
        assert elsewhere.request_count() == 0
    unharmed()


def test_a_redirect_loop_ends(suite, unharmed, source) -> None:  # type: ignore[no-untyped-def]
    source.faults.redirects = {"model.safetensors": source.url("again.safetensors"),
                               "again.safetensors": source.url("model.safetensors")}
    model, job = suite.name("mc"), suite.name("job")
    suite.model(model, source.url("model.safetensors"))
    suite.job(job, model=model)
    suite.failed(job, "TooManyRedirects", says="redirected more than")
    unharmed()


def test_deleting_a_job_stops_its_stalled_download_and_frees_its_place(suite, unharmed, source) -> None:  # type: ignore[no-untyped-def]
    source.faults.rate_bytes_per_s, source.faults.chunk_bytes = 20_000, 1024  # above the minimum rate, for minutes
    model, stalled = suite.name("mc"), suite.name("job")
    suite.model(model, source.url("model.safetensors"))
    suite.job(stalled, model=model, max_attempts=1)
    wait_for(lambda: any(d["name"] == model for d in (suite.admin.get("CacheAgent", "agent-0").get("status") or {})
                         .get("downloads", [])), timeout_s=30, message="the download to start")
    suite.admin.delete("GenerationJob", stalled)
    # The download stops at once (nobody else waits for it) and the job's place is free again.
    def let_go() -> bool:
        status = suite.admin.get("CacheAgent", "agent-0").get("status") or {}
        return (not any(d["name"] == model for d in status.get("downloads", []))
                and not any(r["name"] == stalled for r in status.get("running", [])))
    wait_for(let_go, timeout_s=10, message="the download to stop and the job to leave the agent")
    requests = source.request_count()
    started = time.monotonic()
    unharmed()
    assert source.request_count() == requests  # nothing fetched it any more
    assert time.monotonic() - started < 30
