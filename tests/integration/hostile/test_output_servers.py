"""Hostile output servers: a delivery ends by its deadline whatever the server does, its user sees
one generic reason (an open port and a closed one read alike), the agent's memory stays flat, and
the Lease is renewed all along."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from stoker.testing.operator_harness import wait_for
from stoker.testing.output_server import OutputServer

GENERIC = "the image could not be delivered"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shown(status: dict, port: int) -> str:  # type: ignore[type-arg]
    """What the user reads, with the case's own port and timing taken out."""
    text = f"{status.get('message')} | {status['history'][-1].get('message')}"
    return re.sub(r"\(\d+ tries in \d+ s\)", "(N tries)", text.replace(str(port), "PORT"))


MODES = ["status-403", "status-500", "redirect", "closed-port", "silent"]


@pytest.fixture(scope="module")
def refusals(suite) -> Iterator[dict[str, tuple[dict, int, OutputServer]]]:  # type: ignore[no-untyped-def,type-arg]
    """One job per hostile output server, all delivering at once; mode -> (final status, port, redirect target)."""
    target = OutputServer("store")
    servers = {mode: OutputServer(mode.partition("-")[0] if mode != "closed-port" else "store",
                                  status=int(mode.partition("-")[2] or 200) if mode.startswith("status") else 200,
                                  location="") for mode in MODES}
    with contextlib.ExitStack() as stack:
        stack.enter_context(target)
        for server in servers.values():
            stack.enter_context(server)
            server.location = target.url("stolen.png")
        jobs = {}
        for mode, server in servers.items():
            port = closed_port() if mode == "closed-port" else server.port
            jobs[mode] = (suite.name("job"), port)
            suite.job(jobs[mode][0], output_url=f"http://127.0.0.1:{port}/bucket/out.png?X-Signature=s3cr3t")
        yield {mode: (suite.final(name, timeout_s=120), port, target) for mode, (name, port) in jobs.items()}


@pytest.mark.parametrize("mode", MODES)
def test_a_refusing_or_unreachable_output_server_fails_the_job_with_one_generic_reason(suite, unharmed, refusals, mode) -> None:  # type: ignore[no-untyped-def]
    st, port, target = refusals[mode]
    assert st["phase"] == "Failed" and st["reason"] == "AttemptsExhausted", st
    assert st["history"][-1]["reason"] == "OutputFailed" and GENERIC in st["history"][-1]["message"], st
    assert "s3cr3t" not in str(st)
    assert target.request_count() == 0  # a redirect is never followed
    for word in ("403", "500", "refused", "redirect", "timed out", "Connect", "Timeout"):
        assert word not in shown(st, port), shown(st, port)
    unharmed()


def test_an_open_port_a_closed_port_and_silence_read_alike_to_the_job_author(refusals) -> None:  # type: ignore[no-untyped-def]
    """Output URLs come from job authors: what they see must not help them map ports."""
    texts = {mode: shown(st, port) for mode, (st, port, _) in refusals.items()}
    assert len(set(texts.values())) == 1, texts


def test_a_gigabyte_answer_is_never_read(suite, unharmed) -> None:  # type: ignore[no-untyped-def]
    rss_before = suite.agent_rss_bytes()
    with OutputServer("huge", body_bytes=1 << 30) as server:
        job = suite.name("job")
        suite.job(job, output_url=server.url(f"bucket/{job}.png"))
        st = suite.final(job)
        assert st["phase"] == "Succeeded", st
        assert server.sent_body_bytes < 128 << 20  # the agent hung up instead of reading a gigabyte
    assert suite.agent_rss_bytes() - rss_before < 256 << 20
    unharmed()


def test_trickling_output_servers_do_not_stop_the_lease_or_other_jobs(suite, unharmed) -> None:  # type: ignore[no-untyped-def]
    """Every delivery thread is held by a trickle: the Lease, the watches and the canary go on."""
    leases = client.CoordinationV1Api(suite.admin.core.api_client)
    with OutputServer("trickle", gap_s=0.5) as server:
        jobs = [suite.name("job") for _ in range(3)]  # slots + queue slots: every job place the agent has
        for job in jobs:
            suite.job(job, output_url=server.url(f"bucket/{job}.png"))
        wait_for(lambda: server.request_count() >= 3, timeout_s=60, message="all three deliveries to hang")
        started = time.monotonic()
        renewals, last = 0, leases.read_namespaced_lease("agent-0", suite.ns).spec.renew_time
        while time.monotonic() - started < 5:  # the deliveries still hang throughout (deadline 10 s)
            now = leases.read_namespaced_lease("agent-0", suite.ns).spec.renew_time
            renewals, last = renewals + (now != last), now
            time.sleep(0.2)
        assert renewals >= 3, renewals  # renewed every second or so, as if nothing happened
        ready = next(c for c in suite.admin.get("CacheAgent", "agent-0")["status"].get("conditions", [])
                     if c["type"] == "Ready")
        assert ready["status"] == "True", ready
        for job in jobs:
            suite.failed(job, "AttemptsExhausted", attempt_reason="OutputFailed", says=GENERIC)
    unharmed()
