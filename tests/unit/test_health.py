"""The agent's probes: ready while its Lease is renewed, dead only when renewals stall or fail for long."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from stoker.agent.health import Health, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> Health:
    return Health(stale_after_s=15, failing_renewals_limit_s=300, clock=clock)


def started(health: Health) -> Health:
    health.renewal(ok=True)
    health.started()
    return health


def test_a_starting_agent_is_alive_but_not_ready(health: Health) -> None:
    assert health.live()[0] and not health.ready()[0]
    health.renewal(ok=True)  # the first renewal alone is not enough: it must have registered too
    assert not health.ready()[0]
    health.started()
    assert health.live()[0] and health.ready()[0]


def test_a_stalled_renewal_loop_fails_liveness_after_the_lease_duration(health: Health, clock: Clock) -> None:
    started(health)
    clock.now += 15
    assert health.live()[0] and health.ready()[0]
    clock.now += 1  # no attempt finished, good or bad, for longer than the Lease lasts
    ok, detail = health.live()
    assert not ok and "stuck" in detail
    assert not health.ready()[0]


def test_failing_renewals_make_the_agent_unready_at_once_and_dead_only_after_the_limit(health: Health,
                                                                                         clock: Clock) -> None:
    started(health)
    for _ in range(60):  # an API server away for five minutes: renewals keep failing every 5 s
        clock.now += 5
        health.renewal(ok=False)
        if clock.now - 1000 > 15:
            assert not health.ready()[0]
        if clock.now - 1000 <= 300:
            assert health.live()[0], clock.now - 1000
    clock.now += 5
    health.renewal(ok=False)
    ok, detail = health.live()
    assert not ok and "every Lease renewal failed for 305s" in detail
    health.renewal(ok=True)
    assert health.live()[0] and health.ready()[0]


def test_a_draining_agent_stays_alive_and_leaves_readiness(health: Health, clock: Clock) -> None:
    started(health)
    health.stopping()
    clock.now += 600
    assert health.live() == (True, "draining")
    assert health.ready() == (False, "draining")


def test_the_endpoints_answer_with_the_probe_status(health: Health, clock: Clock) -> None:
    server, port = serve(health, port=0, addr="127.0.0.1")
    try:
        def get(path: str) -> tuple[int, dict]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert get("/healthz")[0] == 200 and get("/readyz")[0] == 503
        started(health)
        assert get("/readyz") == (200, {"ok": True, "detail": "Lease renewed 0.0s ago"})
        clock.now += 60
        status, body = get("/healthz")
        assert status == 503 and "stuck" in body["detail"]
        assert get("/metrics")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
