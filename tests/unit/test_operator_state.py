"""The operator's watch-fed state and its conversions to and from the pure cores."""

from __future__ import annotations

from typing import Any

from stoker.operator import jobstate
from stoker.operator.state import State, agent_from_body, agent_view, job_from_body, job_state, status_patch


def job_body(name: str = "j", *, rv: str = "10", labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": rv,
                         "creationTimestamp": "2026-01-01T00:00:00Z", "labels": labels or {},
                         "annotations": annotations or {}},
            "spec": {"model": "sd", "loras": [{"name": "lora-a"}], "params": {"prompt": "x"}, "maxAttempts": 2},
            "status": status or {}}


def agent_body(name: str = "a", *, rv: str = "5") -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
            "metadata": {"name": name, "namespace": "ns", "uid": "u", "resourceVersion": rv},
            "spec": {"holds": [{"model": "held", "tier": "vram"}], "cordon": False},
            "status": {"slots": 3, "node": "n1", "zone": "z1",
                       "disk": {"budgetBytes": 100, "usedBytes": 40, "reservedBytes": 10},
                       "models": [{"name": "hot", "tier": "vram", "sizeBytes": 10},
                                  {"name": "warm", "tier": "ram", "sizeBytes": 10},
                                  {"name": "cold", "tier": "disk", "sizeBytes": 10, "preloaded": True}],
                       "downloads": [{"name": "next", "bytesDone": 7}],
                       "bandwidth": {"downloadBps": 0, "diskToGpuBps": 3e9}}}


def test_a_bound_running_job_is_seen_with_its_label_agent_and_annotation_attempt() -> None:
    job = job_from_body(job_body(labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "2"},
                                 status={"phase": "Running", "attempt": 1}))
    st = job_state(job)
    assert st.phase is jobstate.JobPhase.RUNNING
    assert st.agent == "a"
    assert st.attempt == 2
    assert st.max_attempts == 2
    assert st.deadline == st.created_at + 3600
    assert job.artifacts == ("sd", "lora-a")
    assert not job.pending


def test_a_requeue_patch_moves_to_pending_with_the_next_attempt_and_clears_the_old_attempts_report() -> None:
    job = job_from_body(job_body(labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"},
                                 status={"phase": "Running", "attempt": 1, "agent": "a",
                                         "attemptFailure": {"attempt": 1, "agent": "a", "reason": "Boom"}}))
    before = job_state(job)
    after = jobstate.agent_lost(before, now=before.created_at + 5, agent="a")
    patch = status_patch(before, after)
    assert patch["phase"] == "Pending"
    assert patch["attempt"] == 2
    assert patch["agent"] is None
    assert patch["attemptFailure"] is None
    assert [(h["agent"], h["outcome"], h["reason"]) for h in patch["history"]] == [("a", "Requeued", "AgentLost")]


def test_an_unchanged_state_needs_no_patch() -> None:
    st = job_state(job_from_body(job_body()))
    assert status_patch(st, st) == {}


def test_agent_view_counts_free_slots_from_bound_jobs_and_maps_tiers() -> None:
    view = agent_view(agent_from_body(agent_body()), ready=True, bound=2, in_use=["hot"])
    assert view.free_slots == 1
    assert view.vram == {"hot"}
    assert view.ram == {"warm"}
    assert view.disk == {"hot", "warm", "cold"}
    assert view.preloaded == {"cold"}
    assert view.held == {"held"} and view.held_hot == {"held"}
    assert view.downloading == {"next": 7}
    assert view.disk_capacity_bytes == 100 and view.disk_free_bytes == 50
    assert view.vram_capacity_bytes is None, "an unreported budget does not limit placement"
    assert view.download_bps is None and view.disk_to_gpu_bps == 3e9
    assert view.in_use == {"hot"}


def test_state_ignores_events_older_than_what_it_has() -> None:
    state = State()
    state.upsert_job(job_body(rv="20", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    state.upsert_job(job_body(rv="15"))
    assert state.jobs["ns/j"].bound_agent == "a"
    assert "ns/j" not in state.pending
    assert state.bound["ns/a"] == {"ns/j"}


def test_a_binding_stops_being_in_flight_once_the_watch_shows_the_label() -> None:
    state = State()
    state.upsert_job(job_body(rv="1"))
    assert state.pending == {"ns/j"}
    state.inflight["ns/j"] = "ns/a"
    state.upsert_job(job_body(rv="2", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    assert state.inflight == {}
    assert state.pending == set()


def test_deleting_a_job_forgets_it_everywhere() -> None:
    state = State()
    state.upsert_job(job_body(rv="2", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    state.delete_job(job_body(rv="3"))
    assert state.jobs == {} and state.bound["ns/a"] == set()


def lease(name: str, renew: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"renewTime": renew, "leaseDurationSeconds": 15}}


def test_an_agent_is_ready_while_its_lease_renewals_keep_arriving() -> None:
    state = State()
    assert not state.agent_ready("ns/a", now_mono=0.0, grace_s=3.0), "no Lease: not Ready"
    state.upsert_lease(lease("a", "t1", "1"), now_mono=100.0)
    assert state.agent_ready("ns/a", now_mono=102.0, grace_s=3.0)
    state.upsert_lease(lease("other", "t1", "2"), now_mono=104.0)
    assert not state.agent_ready("ns/a", now_mono=104.5, grace_s=3.0)
    state.upsert_lease(lease("a", "t2", "3"), now_mono=105.0)
    assert state.agent_ready("ns/a", now_mono=107.0, grace_s=3.0)
    # The same renewTime seen again (a relist) is not a renewal.
    state.upsert_lease(lease("a", "t2", "4"), now_mono=107.5)
    state.upsert_lease(lease("other", "t2", "5"), now_mono=109.0)
    assert not state.agent_ready("ns/a", now_mono=109.0, grace_s=3.0)


def test_a_silent_lease_watch_does_not_declare_every_agent_dead() -> None:
    state = State()
    state.upsert_lease(lease("a", "t1", "1"), now_mono=100.0)
    assert state.agent_ready("ns/a", now_mono=200.0, grace_s=3.0)
