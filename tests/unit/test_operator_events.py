"""Event aggregation: repeats merge into one Event with a count, similar ones combine, none vanish silently;
the recorder's writer threads survive every failure of a write."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.operator import metrics
from stoker.operator.events import COMBINED_PREFIX, EventCorrelator, EventRecorder


def ref(name: str = "job-a", uid: str = "u1", kind: str = "GenerationJob") -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "ns", "uid": uid}}


def test_identical_events_waiting_to_be_written_merge_into_one_with_a_count() -> None:
    c = EventCorrelator()
    assert c.add(ref(), type_="Normal", reason="Requeued", message="agent lost", now=1.0) == "queued"
    assert c.add(ref(), type_="Normal", reason="Requeued", message="agent lost", now=5.0) == "merged"
    ev = c.take()
    assert ev is not None and (ev.count, ev.first_at, ev.last_at) == (2, 1.0, 5.0)
    assert c.take() is None


def test_events_on_different_objects_or_reasons_stay_apart_and_come_out_oldest_first() -> None:
    c = EventCorrelator()
    c.add(ref("a", "1"), type_="Normal", reason="Scheduled", message="m", now=1.0)
    c.add(ref("b", "2"), type_="Normal", reason="Scheduled", message="m", now=2.0)
    c.add(ref("a", "1"), type_="Warning", reason="Failed", message="m", now=3.0)
    taken = [(e.ref["metadata"]["name"], e.reason) for e in iter(c.take, None)]
    assert taken == [("a", "Scheduled"), ("b", "Scheduled"), ("a", "Failed")]


def test_more_than_the_limit_of_similar_messages_are_combined_into_one_series() -> None:
    c = EventCorrelator(similar_limit=3)
    for i in range(10):
        c.add(ref("sd", "m1", "ModelCache"), type_="Normal", reason="ReplicaAdded", message=f"agent-{i} holds a copy",
              now=float(i))
    events = list(iter(c.take, None))
    assert [e.message for e in events[:3]] == [f"agent-{i} holds a copy" for i in range(3)]
    combined = events[3:]
    assert len(combined) == 1
    assert combined[0].message == COMBINED_PREFIX + "agent-9 holds a copy"
    assert combined[0].count == 7


def test_the_similar_window_restarts_after_it_passes() -> None:
    c = EventCorrelator(similar_limit=1, window_s=60)
    c.add(ref(), type_="Normal", reason="R", message="one", now=0.0)
    assert c.add(ref(), type_="Normal", reason="R", message="two", now=1.0) == "queued"
    assert c.pending[next(reversed(c.pending))].message.startswith(COMBINED_PREFIX)
    c.add(ref(), type_="Normal", reason="R", message="three", now=100.0)
    assert c.pending[next(reversed(c.pending))].message == "three"


def test_beyond_the_pending_limit_new_events_are_dropped_and_counted_but_repeats_still_merge() -> None:
    c = EventCorrelator(max_pending=2)
    c.add(ref("a", "1"), type_="Normal", reason="R", message="m", now=0.0)
    c.add(ref("b", "2"), type_="Normal", reason="R", message="m", now=0.0)
    assert c.add(ref("c", "3"), type_="Normal", reason="R", message="m", now=0.0) == "dropped"
    assert c.add(ref("a", "1"), type_="Normal", reason="R", message="m", now=1.0) == "merged"
    assert (c.dropped, c.aggregated) == (1, 1)
    assert [e.count for e in iter(c.take, None)] == [2, 1]


def test_long_messages_are_cut_to_what_an_event_carries() -> None:
    c = EventCorrelator()
    c.add(ref(), type_="Normal", reason="R", message="x" * 5000, now=0.0)
    ev = c.take()
    assert ev is not None and len(ev.message) == 1024


# --- EventRecorder: the writer threads around the correlator ------------------------

class FakeResponse:
    def __init__(self, fail_read: Exception | None = None) -> None:
        self.fail_read = fail_read
        self.released = False

    def read(self) -> bytes:
        if self.fail_read is not None:
            raise self.fail_read
        return b"{}"

    def release_conn(self) -> None:
        self.released = True


class FakeCore:
    """Stands in for CoreV1Api.create_namespaced_event: each call takes the next outcome
    (an exception to raise, or a FakeResponse), then succeeds once the outcomes run out."""

    def __init__(self, *outcomes: Exception | FakeResponse, gate: threading.Event | None = None) -> None:
        self.outcomes = list(outcomes)
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[dict[str, Any]] = []
        self.responses: list[FakeResponse] = []
        self.lock = threading.Lock()

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **_: Any) -> FakeResponse:
        with self.lock:
            self.calls.append(body)
            outcome = self.outcomes.pop(0) if self.outcomes else FakeResponse()
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if isinstance(outcome, Exception):
            raise outcome
        self.responses.append(outcome)
        return outcome


def counter(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def make_recorder() -> Iterator[Callable[..., tuple[EventRecorder, FakeCore]]]:
    made: list[EventRecorder] = []

    def make(core: FakeCore, **kwargs: Any) -> tuple[EventRecorder, FakeCore]:
        kwargs.setdefault("retry_s", 0.0)
        rec = EventRecorder(client.ApiClient(), **kwargs)
        rec.core = core  # type: ignore[assignment]
        made.append(rec)
        return rec, core

    yield make
    for rec in made:
        rec.shutdown(timeout_s=5)


def connection_refused() -> Exception:
    return urllib3.exceptions.MaxRetryError(None, "/api/v1/namespaces/ns/events", "connection refused")  # type: ignore[arg-type]


def test_connection_errors_that_are_not_oserrors_drop_events_but_never_stop_the_writer_threads(make_recorder) -> None:
    rec, core = make_recorder(FakeCore(*[connection_refused() for _ in range(6)]), threads=2)
    dropped = counter("stoker_events_dropped_total")
    for i in range(3):
        rec.record(ref(f"job-{i}", f"u{i}"), reason="Scheduled", message="bound")
        assert rec.flush(5), "flush waits on no queue a dead thread left behind"
    assert all(t.is_alive() for t in rec._threads)
    assert counter("stoker_events_dropped_total") - dropped == 3
    # The API server is back: the same threads write again.
    rec.record(ref("job-9", "u9"), reason="Scheduled", message="bound")
    assert rec.flush(5)
    assert [c["involvedObject"]["name"] for c in core.calls[-1:]] == ["job-9"]
    assert len(core.calls) == 7, "each failed event was tried twice, the last one once"


def test_a_connection_reset_is_retried_once_and_the_event_is_written(make_recorder) -> None:
    reset = urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    rec, core = make_recorder(FakeCore(reset), threads=1)
    written = counter("stoker_events_written_total")
    rec.record(ref(), reason="Requeued", message="agent lost")
    assert rec.flush(5)
    assert [c["reason"] for c in core.calls] == ["Requeued", "Requeued"]
    assert counter("stoker_events_written_total") - written == 1


def test_server_errors_are_retried_once_and_refusals_not_at_all(make_recorder) -> None:
    rec, core = make_recorder(FakeCore(ApiException(status=503), ApiException(status=503), ApiException(status=403)),
                              threads=1)
    dropped = counter("stoker_events_dropped_total")
    rec.record(ref("a", "1"), reason="Scheduled", message="m")
    assert rec.flush(5)
    rec.record(ref("b", "2"), reason="Scheduled", message="m")
    assert rec.flush(5)
    assert [c["involvedObject"]["name"] for c in core.calls] == ["a", "a", "b"]
    assert counter("stoker_events_dropped_total") - dropped == 2


def test_a_response_that_breaks_while_being_read_still_releases_its_connection(make_recorder) -> None:
    broken = FakeResponse(fail_read=urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"))
    rec, core = make_recorder(FakeCore(broken), threads=1)
    rec.record(ref(), reason="Scheduled", message="m")
    assert rec.flush(5)
    assert broken.released
    assert len(core.calls) == 2 and all(r.released for r in core.responses)


def test_repeats_recorded_while_a_write_is_in_flight_become_one_event_with_a_count_and_their_time_span(
        make_recorder) -> None:
    gate = threading.Event()
    clock = iter([100.0, 101.0, 102.0, 103.0, 104.5])
    rec, core = make_recorder(FakeCore(gate=gate), threads=1, wall=lambda: next(clock), component="stoker-operator")
    rec.record(ref("first", "u0"), reason="Scheduled", message="bound to agent-a")
    assert core.entered.wait(5)
    for _ in range(4):
        rec.record(ref(), reason="Requeued", message="agent lost", warning=True)
    gate.set()
    assert rec.flush(5)
    assert len(core.calls) == 2
    ev = core.calls[1]
    assert (ev["reason"], ev["type"], ev["count"], ev["message"]) == ("Requeued", "Warning", 4, "agent lost")
    assert (ev["firstTimestamp"], ev["lastTimestamp"]) == ("1970-01-01T00:01:41.000000Z", "1970-01-01T00:01:44.500000Z")
    assert ev["involvedObject"] == {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "name": "job-a",
                                    "namespace": "ns", "uid": "u1", "resourceVersion": None}
    assert ev["source"] == {"component": "stoker-operator"}
    assert ev["metadata"]["namespace"] == "ns" and ev["metadata"]["name"].startswith("job-a.")


def test_flush_gives_up_at_its_deadline_while_a_write_hangs_and_succeeds_once_it_returns(make_recorder) -> None:
    gate = threading.Event()
    rec, core = make_recorder(FakeCore(gate=gate), threads=1)
    rec.record(ref(), reason="Scheduled", message="m")
    assert core.entered.wait(5)
    assert rec.flush(0.05) is False
    gate.set()
    assert rec.flush(5) is True


def test_a_busy_probe_that_raises_does_not_stop_the_writers(make_recorder) -> None:
    def broken_probe() -> bool:
        raise RuntimeError("pool gone")

    rec, core = make_recorder(FakeCore(), threads=1, busy=broken_probe)
    rec.record(ref(), reason="Scheduled", message="m")
    assert rec.flush(5)
    assert len(core.calls) == 1 and rec._threads[0].is_alive()


def test_while_writes_keep_failing_one_warning_stands_for_many_dropped_events(make_recorder, caplog) -> None:
    rec, core = make_recorder(FakeCore(*[ApiException(status=403, reason="Forbidden") for _ in range(5)]), threads=1,
                              warn_every_s=3600)
    with caplog.at_level(logging.WARNING, logger="stoker.operator.events"):
        for i in range(5):
            rec.record(ref(f"job-{i}", f"u{i}"), reason="Scheduled", message="m")
            assert rec.flush(5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "403 Forbidden" in warnings[0]


def test_shutdown_writes_what_is_queued_and_ends_the_threads(make_recorder) -> None:
    rec, core = make_recorder(FakeCore(), threads=2)
    for i in range(5):
        rec.record(ref(f"job-{i}", f"u{i}"), reason="Scheduled", message="m")
    rec.shutdown(timeout_s=5)
    assert sorted(c["involvedObject"]["name"] for c in core.calls) == [f"job-{i}" for i in range(5)]
    assert not any(t.is_alive() for t in rec._threads)
