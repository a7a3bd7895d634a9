"""The agent's reporting: status writes debounced in virtual time, and API calls that give up
on a server that never answers instead of blocking their thread (and the Lease) for good."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.agent import status_report
from stoker.agent.reporter import LeaseKeeper, StatusWriter
from stoker.api.cacheagent import Bandwidths, CacheAgentStatus

pytestmark = pytest.mark.timeout(120)


class VirtualTime:
    """A clock and `wait` for StatusWriter in which time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def wait(self, event: asyncio.Event, timeout_s: float) -> None:
        if event.is_set():
            return
        timer = asyncio.get_running_loop().create_future()
        self._timers.append((self.now + timeout_s, timer))
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def settle(self) -> None:
        for _ in range(20):  # let every task woken so far run to its next wait
            await asyncio.sleep(0)

    async def advance(self, seconds: float, *, step_s: float = 0.01) -> None:
        end = round(self.now + seconds, 6)
        while self.now < end:
            self.now = min(end, round(self.now + step_s, 6))
            for deadline, timer in self._timers:
                if deadline <= self.now and not timer.done():
                    timer.set_result(None)
            self._timers = [(d, t) for d, t in self._timers if not t.done()]
            await self.settle()


class RecordingObjects:
    """Records each CacheAgent status write with the virtual time it was made at."""

    namespace = "ns"

    def __init__(self, time_: VirtualTime) -> None:
        self.time = time_
        self.writes: list[tuple[float, dict[str, Any]]] = []

    def patch_status(self, kind: str, name: str, status: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.writes.append((self.time.now, status))
        return {}


async def inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


def status_with(slots: int) -> CacheAgentStatus:
    empty = status_report.TierView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=())
    disk = status_report.DiskView(budget_bytes=0, used_bytes=0, reserved_bytes=0, entries=(), downloads=())
    identity = status_report.Identity(pod="p", node="n", zone="", gpu_model="cpu", vram_bytes=0)
    return status_report.build_status(identity=identity, disk=disk, ram=empty, vram=empty, slots=slots, running=[],
                                      failures=[], bandwidth=Bandwidths(), observed_generation=None)


def test_status_writes_are_debounced_and_a_change_after_a_quiet_spell_goes_out_at_once() -> None:
    async def main() -> None:
        vt = VirtualTime()
        objects = RecordingObjects(vt)
        value = {"slots": 1}
        writer = StatusWriter(objects, name="agent-0", build=lambda: status_with(value["slots"]),  # type: ignore[arg-type]
                              min_interval_s=1.0, max_interval_s=60.0, clock=vt.clock, wait=vt.wait, call=inline)
        await writer.write_if_changed()
        stop = asyncio.Event()
        loop = asyncio.create_task(writer.run(stop))
        await vt.settle()

        for i in range(60):  # a change and a kick every 50 ms for 3 s
            value["slots"] = 10 + i
            writer.kick()
            await vt.advance(0.05)
        await vt.advance(1.0)
        times = [t for t, _ in objects.writes]
        assert 3 <= len(times) <= 5, times  # the first write, then at most one a second
        assert all(b - a >= 1.0 - 1e-6 for a, b in zip(times, times[1:])), times
        assert objects.writes[-1][1]["slots"] == 69  # the last value went out

        written = len(objects.writes)
        await vt.advance(30.0)  # nothing changes: nothing is written
        assert len(objects.writes) == written

        changed_at = vt.now
        value["slots"] = 99
        writer.kick()
        await vt.settle()
        assert objects.writes[-1] == (changed_at, objects.writes[-1][1]) and objects.writes[-1][1]["slots"] == 99

        await vt.advance(61.0)  # unchanged for the maximum interval: written anyway, to repair edits by others
        assert len(objects.writes) == written + 2
        stop.set()
        await vt.advance(1.0)
        await asyncio.wait_for(loop, timeout=10)

    asyncio.run(main())


def test_a_change_without_a_kick_is_written_within_the_minimum_interval() -> None:
    async def main() -> None:
        vt = VirtualTime()
        objects = RecordingObjects(vt)
        value = {"slots": 1}
        writer = StatusWriter(objects, name="agent-0", build=lambda: status_with(value["slots"]),  # type: ignore[arg-type]
                              min_interval_s=1.0, clock=vt.clock, wait=vt.wait, call=inline)
        await writer.write_if_changed()
        stop = asyncio.Event()
        loop = asyncio.create_task(writer.run(stop))
        await vt.advance(5.0)
        value["slots"] = 2
        changed_at = vt.now
        await vt.advance(1.5)
        assert [s["slots"] for _, s in objects.writes] == [1, 2]
        assert objects.writes[-1][0] - changed_at <= 1.0 + 1e-6
        stop.set()
        await vt.advance(1.0)
        await asyncio.wait_for(loop, timeout=10)

    asyncio.run(main())


# ---- API calls against a server that accepts connections and never answers -----------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """http://127.0.0.1:<port> of a server that reads requests and never answers (a half-open peer)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    closing = threading.Event()

    def accept() -> None:
        while not closing.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        closing.set()
        listener.close()
        for conn in held:
            conn.close()


def api_client(url: str) -> client.ApiClient:
    config = client.Configuration(host=url)
    return client.ApiClient(config)


def finishes_within(fn: Any, timeout_s: float) -> BaseException | None:
    """Run `fn` in a thread; the exception it raised, or fail when it is still blocked after `timeout_s`."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=timeout_s)
    assert outcome, f"the call was still blocked after {time.monotonic() - started:.0f}s"
    return outcome[0]


def test_a_lease_renewal_gives_up_on_a_server_that_never_answers_within_its_renew_interval(silent_server) -> None:
    keeper = LeaseKeeper(api_client(silent_server), namespace="ns", name="agent-0", duration_s=15, renew_s=2.0)
    started = time.monotonic()
    error = finishes_within(keeper.renew_once, timeout_s=15)
    assert error is not None and time.monotonic() - started < 10


def test_object_calls_give_up_on_a_server_that_never_answers(silent_server) -> None:
    objects = kube.Objects(api_client(silent_server), "ns", request_timeout=(0.5, 0.5))
    for call in (lambda: objects.get("GenerationJob", "a"),
                 lambda: objects.patch_status("GenerationJob", "a", {"phase": "Running"}, resource_version="1")):
        assert finishes_within(call, timeout_s=15) is not None


def test_a_watch_lists_with_the_request_timeout_and_reads_for_a_little_longer_than_its_server_timeout() -> None:
    calls: list[dict[str, Any]] = []
    stop = threading.Event()

    def list_fn(**kwargs: Any) -> Any:
        calls.append(kwargs)
        if kwargs.get("watch"):
            stop.set()
            raise ConnectionError("the test ends the watch here")
        return {"items": [], "metadata": {"resourceVersion": "7"}}

    kube.stream_events(list_fn, stop=stop, on_event=lambda *_: None, timeout_s=30, namespace="ns")
    listing, watching = calls
    assert listing["_request_timeout"] == kube.REQUEST_TIMEOUT_S
    assert watching["timeout_seconds"] == 30
    assert watching["_request_timeout"] == (kube.REQUEST_TIMEOUT_S[0], 30 + kube.WATCH_READ_MARGIN_S)
