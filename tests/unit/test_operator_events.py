"""Event aggregation: repeats merge into one Event with a count, similar ones combine, none vanish silently."""

from __future__ import annotations

from typing import Any

from stoker.operator.events import COMBINED_PREFIX, EventCorrelator


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
