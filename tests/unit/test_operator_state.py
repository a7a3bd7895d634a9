"""The operator's watch-fed state and its conversions to and from the pure cores."""

from __future__ import annotations

from typing import Any

import pytest

from stoker import userank
from stoker.operator import jobstate, placement
from stoker.operator.state import (State, agent_from_body, agent_view, format_time, job_from_body, job_state,
                                   status_patch)


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
    assert state.bound["ns/a"] == {"ns/j"} and state.bound_jobs == 1


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
    assert state.jobs == {} and "ns/a" not in state.bound and state.bound_jobs == 0


def unknown_model_job(i: int) -> dict[str, Any]:
    body = job_body(f"j{i}", rv=str(i + 1))
    body["spec"]["model"] = f"made-up-{i}"
    body["spec"]["loras"] = [{"name": f"made-up-lora-{i}"}]
    return body


def test_deleted_jobs_for_models_that_do_not_exist_leave_nothing_behind() -> None:
    """Anyone who may create jobs could name a new model each time; the operator must not keep a
    record per name after the jobs are gone."""
    state = State()
    for i in range(500):
        state.upsert_job(unknown_model_job(i))
    assert len(state.demand) == 1000 and len(state.pending) == 500
    for i in range(500):
        state.delete_job(unknown_model_job(i))
    assert (state.jobs, state.pending, state.pending_views) == ({}, set(), {})
    assert (state.demand, state.last_used, state._early_uses, state._jobs_per_model) == ({}, {}, {}, {})
    assert (state.bound, state._seen_uids) == ({}, set())
    assert state.queues == {"ns": []} and not state.pending_demand["ns"]  # one (empty) entry per namespace


def test_what_is_counted_for_a_model_that_exists_outlives_its_jobs() -> None:
    state = State()
    state.upsert_model({"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                        "metadata": {"name": "sd", "namespace": "ns", "uid": "m", "resourceVersion": "1",
                                     "generation": 1},
                        "spec": {"source": {"url": "https://models.example.com/sd.safetensors"}}})
    state.upsert_job(job_body())
    state.delete_job(job_body())
    assert "ns/sd" in state.demand and "ns/sd" in state.last_used  # demand is about the model, not the job
    assert "ns/lora-a" not in state.demand  # the job's LoRA has no ModelCache: forgotten with the job


def lease(name: str, renew: str, rv: str, *, holder: str | None = "holder") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"renewTime": renew, "leaseDurationSeconds": 15, "holderIdentity": holder}}


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


def pending_job(name: str, *, created: str, priority: int = 0, rv: str = "1", model: str = "sd") -> dict[str, Any]:
    body = job_body(name, rv=rv)
    body["metadata"]["creationTimestamp"] = created
    body["spec"]["priority"] = priority
    body["spec"]["model"] = model
    return body


def test_queue_slots_add_bindable_slots_beyond_the_generation_slots() -> None:
    body = agent_body()
    body["status"]["queueSlots"] = 2
    view = agent_view(agent_from_body(body), ready=True, bound=4, in_use=[])
    assert (view.slots, view.queue_slots, view.free_slots) == (3, 2, 1)


def test_the_pending_queue_stays_sorted_by_the_placement_order_as_jobs_come_and_go() -> None:
    state = State()
    state.upsert_job(pending_job("late", created="2026-01-01T00:10:00Z"))
    state.upsert_job(pending_job("early", created="2026-01-01T00:00:00Z"))
    state.upsert_job(pending_job("urgent", created="2026-01-01T00:05:00Z", priority=100))
    assert [k for _, k in state.queues["ns"]] == ["ns/urgent", "ns/early", "ns/late"]
    assert state.queues["ns"] == sorted((placement.job_order_key(v, settings=state.placement_settings), k)
                                        for k, v in state.pending_views.items())
    # Bound: it leaves the queue; a new version of a pending job keeps one entry.
    state.upsert_job(job_body("early", rv="2", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    state.upsert_job(pending_job("late", created="2026-01-01T00:10:00Z", rv="3"))
    assert [k for _, k in state.queues["ns"]] == ["ns/urgent", "ns/late"]
    assert set(state.pending_views) == {"ns/urgent", "ns/late"}


def test_pending_demand_counts_the_artifacts_of_pending_jobs_incrementally() -> None:
    state = State()
    state.upsert_job(pending_job("a", created="2026-01-01T00:00:00Z"))
    state.upsert_job(pending_job("b", created="2026-01-01T00:00:01Z", model="xl"))
    assert state.pending_demand["ns"] == {"sd": 1, "xl": 1, "lora-a": 2}
    state.delete_job(pending_job("a", created="2026-01-01T00:00:00Z"))
    assert state.pending_demand["ns"] == {"xl": 1, "lora-a": 1}


def test_an_agents_jobs_version_moves_with_its_bound_jobs_and_bindings_in_flight() -> None:
    state = State()
    v0 = state.agent_jobs_version["ns/a"]
    state.set_inflight("ns/j", "ns/a")
    assert state.agent_load("ns/a")[0] == 1
    v1 = state.agent_jobs_version["ns/a"]
    state.upsert_job(job_body(rv="2", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    v2 = state.agent_jobs_version["ns/a"]
    assert v0 < v1 < v2
    assert state.inflight == {} and state.agent_load("ns/a") == (1, frozenset({"sd", "lora-a"}))


def test_retryable_source_failures_in_job_histories_on_three_agents_make_the_source_failed() -> None:
    state = State()
    for i, agent in enumerate(("a", "b", "c")):
        state.upsert_job(job_body(f"j{i}", status={"phase": "Failed", "attempt": 1, "history": [
            {"attempt": 1, "agent": agent, "outcome": "Failed", "reason": "HTTPServerError",
             "message": "ns/sd: server answered 503", "finishedAt": "2026-01-01T00:01:00Z"}]}))
    now = job_from_body(job_body()).created_at + 120
    verdicts = state.update_source_health(now=now, now_mono=0.0, grace_s=3.0)
    assert set(verdicts) == {"ns/sd"} and verdicts["ns/sd"].reason == "HTTPServerError"
    assert state.source_failed == verdicts


def test_a_source_failure_names_the_lora_when_the_message_does() -> None:
    state = State()
    state.upsert_job(job_body("j", status={"phase": "Running", "attempt": 1, "agent": "a", "attemptFailure": {
        "attempt": 1, "agent": "a", "reason": "Timeout", "message": "ns/lora-a: read timed out"}}))
    from stoker.operator.state import job_fetch_failures
    (f,) = job_fetch_failures(state.jobs["ns/j"], now=0.0)
    assert (f.model, f.agent, f.retryable) == ("ns/lora-a", "a", True)


# --- fleet-wide use ranks ------------------------------------------------------------


def model_body(name: str = "sd", *, rv: str = "1", uid: str = "mc-sd", status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": rv},
            "spec": {"source": {"url": "https://models.test/sd.safetensors"}}, "status": status or {}}


def created(second: int) -> str:
    return f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}Z"


def uses(*seconds: int) -> float | None:
    base = job_from_body(pending_job("x", created=created(0))).created_at
    rank = None
    for s in seconds:
        rank = userank.add_use(rank, base + s, half_life_s=userank.DEFAULT_HALF_LIFE_S)
    return rank


def test_every_job_counts_once_in_its_models_fleet_rank_whether_seen_before_or_after_the_model() -> None:
    state = State()
    state.upsert_job(pending_job("early", created=created(1)))  # before its ModelCache: kept for it
    assert state.use_rank("ns/sd") is None
    state.upsert_model(model_body())
    state.upsert_job(pending_job("late", created=created(5)))
    state.upsert_job(pending_job("late", created=created(5), rv="7"))  # a newer version of the same job
    state.upsert_model(model_body(rv="2", status={"useRank": 1e12, "useRankCountedThrough": created(9)}))
    rank = state.use_rank("ns/sd")
    assert rank is not None and rank.rank_s == pytest.approx(uses(1, 5))
    assert rank.counted_through_s == job_from_body(pending_job("late", created=created(5))).created_at
    assert state.use_rank("ns/lora-a") is None, "a LoRA without a ModelCache yet waits for it"
    state.upsert_model(model_body("lora-a", uid="mc-lora"))
    assert state.use_rank("ns/lora-a").rank_s == pytest.approx(uses(1, 5))  # type: ignore[union-attr]


def test_a_restarted_operator_starts_from_the_published_rank_and_never_counts_a_job_twice() -> None:
    first = State()
    first.upsert_model(model_body())
    for i, second in enumerate((1, 2, 3)):
        first.upsert_job(pending_job(f"j{i}", created=created(second)))
    published = first.use_rank("ns/sd")
    assert published is not None and published.rank_s is not None and published.counted_through_s is not None
    status = {"useRank": round(published.rank_s, 3), "useRankCountedThrough": format_time(published.counted_through_s)}
    # The next operator lists the same jobs again (some before the model), and one created meanwhile.
    second = State()
    second.upsert_job(pending_job("j0", created=created(1)))
    second.upsert_job(pending_job("j3", created=created(4)))
    second.upsert_model(model_body(rv="5", status=status))
    second.upsert_job(pending_job("j1", created=created(2)))
    second.upsert_job(pending_job("j2", created=created(3)))
    assert second.use_rank("ns/sd").rank_s == pytest.approx(uses(1, 2, 3, 4), abs=1e-2)  # type: ignore[union-attr]


def test_a_model_created_again_under_its_name_starts_from_its_own_status() -> None:
    state = State()
    state.upsert_model(model_body())
    state.upsert_job(pending_job("j", created=created(1)))
    state.delete_model(model_body())
    state.upsert_model(model_body(uid="mc-sd-2", rv="9"))
    assert state.use_rank("ns/sd") == userank.FleetRank()


def test_agent_view_reads_each_models_disk_rank_but_none_for_a_baked_in_model() -> None:
    body = agent_body()
    body["status"]["models"][0]["rank"] = 1.8e9
    body["status"]["models"][1]["rank"] = 1.7e9
    body["status"]["models"][2]["rank"] = 1.9e9  # preloaded: never evicted, so no victim to value
    view = agent_view(agent_from_body(body), ready=True, bound=0, in_use=[])
    assert view.disk_rank_s == {"hot": 1.8e9, "warm": 1.7e9}
    assert agent_view(agent_from_body(agent_body()), ready=True, bound=0, in_use=[]).disk_rank_s == {}


def test_agent_view_puts_an_agent_with_a_peer_endpoint_in_the_peer_tier_with_its_measured_rate() -> None:
    body = agent_body()
    assert not agent_view(agent_from_body(body), ready=True, bound=0, in_use=[]).serves_peers
    body["status"]["peer"] = {"url": "http://10.0.0.4:8471", "maxUploads": 2}
    body["status"]["bandwidth"]["peerBps"] = 9e8
    view = agent_view(agent_from_body(body), ready=True, bound=0, in_use=[])
    assert view.serves_peers and view.peer_bps == 9e8


# --- source health follows the current ModelCache ----------------------------------

MC_CREATED = "2026-01-01T01:00:00Z"


def failing_model(uid: str, *, generation: int = 1, rv: str = "1", created_at: str = MC_CREATED,
                  managed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": "sd", "namespace": "ns", "uid": uid, "resourceVersion": rv, "generation": generation,
                         "creationTimestamp": created_at, "managedFields": managed or []},
            "spec": {"source": {"url": "https://models.test/sd.safetensors"}}}


def reporting_agent(failures: list[dict[str, Any]], *, rv: str = "5") -> dict[str, Any]:
    body = agent_body("a", rv=rv)
    body["status"]["models"] = []
    body["status"]["modelFailures"] = failures
    return body


def ready_state() -> State:
    state = State()
    state.upsert_lease(lease("a", "t1", "1"), now_mono=0.0)
    return state


def checksum_failure(at: str, **identity: Any) -> dict[str, Any]:
    return {"name": "sd", "reason": "ChecksumMismatch", "message": "ns/sd: sha256 differs", "retryable": False,
            "at": at, **identity}


def health(state: State, at: str) -> set[str]:
    from stoker.operator.state import parse_time
    return set(state.update_source_health(now=parse_time(at) or 0.0, now_mono=1.0, grace_s=15.0))


def test_a_modelcache_created_again_under_the_same_name_is_not_failed_by_the_old_ones_failures() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc-old"))
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:05:00Z", uid="mc-old", generation=1)]))
    assert health(state, "2026-01-01T01:06:00Z") == {"ns/sd"}
    state.delete_model(failing_model("mc-old"))
    state.upsert_model(failing_model("mc-new", rv="9", created_at="2026-01-01T01:10:00Z"))
    assert health(state, "2026-01-01T01:11:00Z") == set(), "the agent still reports it, for the old uid"
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:12:00Z", uid="mc-new", generation=1)], rv="6"))
    assert health(state, "2026-01-01T01:12:30Z") == {"ns/sd"}


def test_a_changed_spec_clears_failures_reported_for_the_previous_generation() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc", generation=1))
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:05:00Z", uid="mc", generation=1)]))
    assert health(state, "2026-01-01T01:06:00Z") == {"ns/sd"}
    state.upsert_model(failing_model("mc", generation=2, rv="2"))
    assert health(state, "2026-01-01T01:06:00Z") == set()


def test_failures_that_name_no_modelcache_count_only_after_it_was_created() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc", created_at="2026-01-01T01:10:00Z"))
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:09:59Z")]))
    state.upsert_job(job_body("old-job", status={"phase": "Failed", "attempt": 1, "history": [
        {"attempt": 1, "agent": "a", "outcome": "Failed", "reason": "HTTPNotFound", "message": "ns/sd: 404",
         "finishedAt": "2026-01-01T01:10:00.500000Z"}]}))
    assert health(state, "2026-01-01T01:11:00Z") == set(), "both happened before (or in the second of) its creation"
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:10:30Z")], rv="6"))
    assert health(state, "2026-01-01T01:11:00Z") == {"ns/sd"}


def test_a_standing_permanent_failure_stops_failing_the_source_after_an_hour_without_a_retry() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc"))
    state.upsert_agent(reporting_agent([checksum_failure("2026-01-01T01:05:00Z", uid="mc", generation=1)]))
    assert health(state, "2026-01-01T02:04:00Z") == {"ns/sd"}
    assert health(state, "2026-01-01T02:06:00Z") == set()


def test_the_spec_took_effect_at_creation_or_at_the_latest_write_of_spec_in_managed_fields() -> None:
    from stoker.operator.state import parse_time, spec_changed_at
    created_at = parse_time(MC_CREATED) or 0.0
    assert spec_changed_at(failing_model("mc")["metadata"], generation=1) == created_at + 1
    managed = [
        {"manager": "kubectl", "operation": "Update", "time": "2026-01-01T01:30:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:source": {"f:secretRef": {}}}}},
        {"manager": "stoker-operator", "operation": "Update", "subresource": "status", "time": "2026-01-01T01:40:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}},
        {"manager": "kopf", "operation": "Update", "time": "2026-01-01T01:50:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {}}}},
    ]
    meta = failing_model("mc", generation=2, managed=managed)["metadata"]
    assert spec_changed_at(meta, generation=2) == created_at + 30 * 60 + 1
    assert spec_changed_at({"name": "no-times"}, generation=2) is None


# --- local faults of an agent blame no source -------------------------------------


@pytest.mark.parametrize("reason", ["DiskFull", "DiskError", "OutOfMemory", "IOError", "InsufficientCache",
                                    "Cancelled", "SourceChanged", "SecretNotFound"])
def test_a_failure_the_source_did_not_answer_for_never_fails_the_model(reason: str) -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc"))
    state.upsert_agent(reporting_agent([{"name": "sd", "reason": reason, "message": "no space left on device",
                                         "retryable": False, "at": "2026-01-01T01:05:00Z", "uid": "mc",
                                         "generation": 1}]))
    assert health(state, "2026-01-01T01:06:00Z") == set()


def test_retryable_local_faults_in_job_histories_on_every_agent_never_fail_the_model() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc"))
    history = [{"attempt": i + 1, "agent": f"a{i}", "outcome": "Failed", "reason": "DiskFull",
                "message": "ns/sd: cannot write: No space left on device", "finishedAt": "2026-01-01T01:05:00Z"}
               for i in range(6)]
    state.upsert_job(job_body(status={"phase": "Pending", "attempt": 7, "history": history}))
    assert health(state, "2026-01-01T01:06:00Z") == set()


def test_an_agent_with_a_full_or_failing_disk_takes_no_download_and_a_shutting_down_one_nothing() -> None:
    body = agent_body()
    body["status"]["localFaults"] = [{"reason": "DiskFull", "message": "no space"}]
    body["status"]["degraded"] = True
    assert not agent_view(agent_from_body(body), ready=True, bound=0, in_use=[]).can_download
    body["status"]["localFaults"] = [{"reason": "OutOfMemory", "message": "no memory"}]
    assert agent_view(agent_from_body(body), ready=True, bound=0, in_use=[]).can_download
    body["status"]["accepting"] = False
    assert agent_view(agent_from_body(body), ready=True, bound=0, in_use=[]).cordoned


def test_a_size_announced_beyond_every_agents_budget_fails_the_model_at_once() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc"))
    body = reporting_agent([{"name": "sd", "reason": "ExceedsDiskBudget", "message": "20 GiB", "retryable": True,
                             "at": "2026-01-01T01:05:00Z", "uid": "mc", "generation": 1, "sizeBytes": 20 << 30}])
    body["status"]["disk"]["budgetBytes"] = 10 << 30
    state.upsert_agent(body)
    verdicts = state.update_source_health(now=0.0, now_mono=1.0, grace_s=15.0)
    assert verdicts["ns/sd"].reason == "TooLarge" and verdicts["ns/sd"].permanent


def test_a_spec_size_hint_beyond_every_budget_fails_the_model_before_any_download() -> None:
    state = ready_state()
    model = failing_model("mc")
    model["spec"]["source"]["sizeBytes"] = 2 << 30
    state.upsert_model(model)
    state.upsert_agent(reporting_agent([]))  # budget 100 bytes
    assert set(state.update_source_health(now=0.0, now_mono=1.0, grace_s=15.0)) == {"ns/sd"}


def test_a_copy_fetched_for_an_earlier_modelcache_of_the_same_name_is_nobodys_copy() -> None:
    state = ready_state()
    state.upsert_model(failing_model("mc-new"))
    body = agent_body()
    body["status"]["models"] = [{"name": "sd", "tier": "disk", "sizeBytes": 10, "uid": "mc-old"},
                                {"name": "baked", "tier": "disk", "sizeBytes": 10, "preloaded": True}]
    state.upsert_agent(body)
    view = agent_view(agent_from_body(body), ready=True, bound=0, in_use=[], model_uids=state.model_uids())
    assert "sd" not in view.disk and "baked" in view.disk
    body["status"]["models"][0]["uid"] = "mc-new"
    view = agent_view(agent_from_body(body), ready=True, bound=0, in_use=[], model_uids=state.model_uids())
    assert "sd" in view.disk


def test_the_uids_version_moves_only_when_a_modelcache_comes_goes_or_is_created_again() -> None:
    state = State()
    state.upsert_model(failing_model("mc-1"))
    v = state.uids_version
    state.upsert_model(failing_model("mc-1", rv="2"))
    assert state.uids_version == v
    state.delete_model(failing_model("mc-1", rv="2"))
    state.upsert_model(failing_model("mc-2", rv="3"))
    assert state.uids_version == v + 2 and state.model_uids() == {"ns/sd": "mc-2"}


def test_an_agent_that_released_its_lease_is_not_ready_at_once() -> None:
    state = State()
    state.upsert_lease(lease("a", "t1", "1"), now_mono=100.0)
    assert state.agent_ready("ns/a", now_mono=100.5, grace_s=10.0)
    state.upsert_lease(lease("a", "t1", "2", holder=None), now_mono=101.0)  # SIGTERM: released
    assert not state.agent_ready("ns/a", now_mono=101.0, grace_s=10.0)
    state.upsert_lease(lease("a", "t2", "3"), now_mono=110.0)  # restarted and renewing again
    assert state.agent_ready("ns/a", now_mono=110.0, grace_s=10.0)


def test_a_job_bound_to_an_agent_whose_cacheagent_is_gone_is_requeued_at_once() -> None:
    from stoker.operator.failure import Reconciler

    state = ready_state()
    job = job_from_body(job_body(labels={"stoker.dev/agent": "gone"}, annotations={"stoker.dev/attempt": "1"},
                                 status={"phase": "Running", "attempt": 1, "agent": "gone"}))
    reconciler = Reconciler(state, writer=None, lease_grace_s=10.0)  # type: ignore[arg-type]
    tr = reconciler._decide(job, job_state(job), {"ns/a": True}, {}, now=1e9 - 1)
    assert tr is not None and tr.event == "Requeued" and tr.after.attempt == 2
    assert tr.after.history[-1].agent_fault and "not counted" in tr.message


def test_a_labelled_job_its_agent_has_not_accepted_is_scheduled_from_the_binding_alone() -> None:
    job = job_from_body(job_body(labels={"stoker.dev/agent": "a"}, annotations={
        "stoker.dev/attempt": "1", "stoker.dev/scheduled-at": "2026-01-01T00:00:03.500000Z"}))
    assert not job.pending and job.phase is jobstate.JobPhase.PENDING
    st = job_state(job)
    assert (st.phase, st.agent, st.attempt) == (jobstate.JobPhase.SCHEDULED, "a", 1)
    assert st.bound_at == st.created_at + 3.5


def test_losing_the_agent_of_a_job_it_never_accepted_requeues_it_with_the_attempt_counted() -> None:
    from stoker.operator.failure import Reconciler

    state = State()
    job = job_from_body(job_body(labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    rec = Reconciler(state, writer=None, lease_grace_s=3.0)  # type: ignore[arg-type]
    now = job.created_at + 10
    tr = rec._decide(job, job_state(job), {"ns/a": False}, {}, now)
    assert tr is not None and tr.event == "Requeued"
    patch = status_patch(tr.before, tr.after)
    assert (patch["phase"], patch["attempt"]) == ("Pending", 2)
    assert [(h["attempt"], h["agent"], h["reason"]) for h in patch["history"]] == [(1, "a", "AgentLost")]
    assert rec._decide(job, job_state(job), {"ns/a": True}, {}, now) is None, "a Ready agent keeps its binding"


def test_an_unbind_cut_short_holds_the_job_until_its_status_records_the_attempt() -> None:
    from stoker.operator.failure import Reconciler

    # The label is gone, the status never got its history record: the job is not pending.
    cut = job_from_body(job_body(annotations={"stoker.dev/unbound": "a/1"}))
    assert cut.unbinding and not cut.pending
    st = job_state(cut)
    assert (st.phase, st.agent, st.attempt) == (jobstate.JobPhase.SCHEDULED, "a", 1)
    tr = Reconciler(State(), writer=None, lease_grace_s=3.0)._decide(  # type: ignore[arg-type]
        cut, st, {"ns/a": True}, {}, cut.created_at + 1)
    assert tr is not None and tr.event == "Requeued" and tr.after.attempt == 2
    # Once the status has the record, the marker is history and the job is pending again.
    done = job_from_body(job_body(annotations={"stoker.dev/unbound": "a/1"}, status={
        "phase": "Pending", "attempt": 2, "history": [{"attempt": 1, "agent": "a", "outcome": "Requeued",
                                                      "reason": "AgentLost"}]}))
    assert not done.unbinding and done.pending


def test_the_agent_records_a_scheduled_time_never_later_than_its_own_writes() -> None:
    from stoker.api.protocol import scheduled_at

    bound = {"metadata": {"annotations": {"stoker.dev/scheduled-at": "2026-01-01T00:00:05.000000Z"}}}
    assert scheduled_at(bound, "2026-01-01T00:00:06.000000Z") == "2026-01-01T00:00:05.000000Z"
    # The operator's clock ahead of the agent's: the agent's own time, so scheduledAt <= startedAt.
    assert scheduled_at(bound, "2026-01-01T00:00:04.000000Z") == "2026-01-01T00:00:04.000000Z"
    assert scheduled_at({"metadata": {}}, "2026-01-01T00:00:04Z") == "2026-01-01T00:00:04Z"


class _RecordingWriter:
    """Takes every write the reconciler starts without running it."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def may_act(self, key: str, resource_version: str) -> bool:
        return True

    def submit(self, key: str, resource_version: str, fn: Any, **_: Any) -> bool:
        if not key.startswith("ca:"):  # the agents' Ready conditions are not what is tested here
            self.submitted.append(key)
        return True


def test_the_reconciler_looks_again_at_a_quiet_job_only_when_it_its_agent_or_the_clock_calls_for_it() -> None:
    from stoker.operator.failure import Reconciler

    state = ready_state()
    state.upsert_agent(agent_body())
    state.upsert_job(job_body("bound", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"},
                              status={"phase": "Running", "attempt": 1, "agent": "a"}))
    timed = job_body("timed", status={"phase": "Pending", "attempt": 1})
    timed["spec"]["timeoutSeconds"] = 60
    state.upsert_job(timed)
    writer = _RecordingWriter()
    rec = Reconciler(state, writer, lease_grace_s=10.0)  # type: ignore[arg-type]
    looked: list[str] = []
    decide = rec._job
    rec._job = lambda job, *a: (looked.append(job.name), decide(job, *a))[1]  # type: ignore[method-assign]
    start = job_from_body(timed).created_at

    rec.reconcile_once(now=start + 1, now_mono=1.0)
    assert sorted(looked) == ["bound", "timed"] and writer.submitted == []
    looked.clear()
    rec.reconcile_once(now=start + 2, now_mono=2.0)
    assert looked == [], "nothing changed: no job is looked at again"

    state.upsert_job(timed | {"metadata": {**timed["metadata"], "resourceVersion": "11"}})
    rec.reconcile_once(now=start + 3, now_mono=3.0)
    assert looked == ["timed"] and writer.submitted == [], "a new version of the job is looked at"
    looked.clear()

    rec.reconcile_once(now=start + 61, now_mono=4.0)
    assert looked == ["timed"] and writer.submitted == ["ns/timed"], "its deadline passed: it fails"
    looked.clear()

    state.upsert_lease(lease("b", "t1", "2"), now_mono=29.0)  # the watch is alive; a's Lease went unrenewed
    rec.reconcile_once(now=start + 62, now_mono=30.0)
    assert "bound" in looked and "ns/bound" in writer.submitted, "its agent was lost: it is requeued"


def test_a_reconcile_pass_reads_only_the_jobs_whose_inputs_may_have_moved() -> None:
    from stoker.operator.failure import Reconciler

    state = ready_state()
    state.upsert_agent(agent_body())
    for i in range(300):
        state.upsert_job(job_body(f"p{i}", status={"phase": "Pending", "attempt": 1}))
    bound = [job_body(f"b{i}", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"},
                      status={"phase": "Running", "attempt": 1, "agent": "a"}) for i in range(3)]
    for body in bound:
        state.upsert_job(body)
    writer = _RecordingWriter()
    rec = Reconciler(state, writer, lease_grace_s=10.0)  # type: ignore[arg-type]
    read: list[int] = []
    take = rec._jobs_to_look_at
    rec._jobs_to_look_at = lambda *a, **k: (jobs := take(*a, **k), read.append(len(jobs)))[0]  # type: ignore[method-assign]
    start = job_from_body(bound[0]).created_at

    rec.reconcile_once(now=start + 1, now_mono=1.0)
    rec.reconcile_once(now=start + 2, now_mono=2.0)
    state.upsert_job(job_body("p7", rv="11", status={"phase": "Pending", "attempt": 1}))
    rec.reconcile_once(now=start + 3, now_mono=3.0)
    assert read == [303, 0, 1], "the first pass reads every job; then only what changed"
    state.upsert_lease(lease("b", "t1", "2"), now_mono=8.0)  # the watch is alive; a's Lease went unrenewed
    rec.reconcile_once(now=start + 4, now_mono=10.5)
    assert read[-1] == 3 and sorted(writer.submitted) == ["ns/b0", "ns/b1", "ns/b2"], "its agent's jobs requeue"
    rec.reconcile_once(now=start + 5, now_mono=11.5)
    assert read[-1] == 303, "every 10 s all of them, whatever changed"


def test_the_sizes_version_moves_only_when_what_sizes_are_worked_out_from_changes() -> None:
    state = State()
    state.upsert_agent(agent_body(rv="5"))
    state.upsert_model(model_body(rv="1"))
    before = state.sizes_version
    moved = agent_body(rv="6")
    moved["status"]["disk"]["usedBytes"] = 50  # a download went on, a job came and went: no size changed
    moved["status"]["downloads"] = [{"name": "next", "bytesDone": 9}]
    state.upsert_agent(moved)
    assert state.sizes_version == before and state.fleet_version > 0
    grown = agent_body(rv="7")
    grown["status"]["models"][0]["sizeBytes"] = 11
    state.upsert_agent(grown)
    assert state.sizes_version == before + 1
    state.upsert_model(model_body(rv="2", status={"replicas": 3, "desiredReplicas": 3}))  # its status: no size in it
    assert state.models["ns/sd"].resource.status.replicas == 3
    assert state.sizes_version == before + 1
    state.upsert_model(model_body(rv="3", uid="mc-sd-2"))  # created again: another ModelCache's copies count
    state.delete_agent(grown)
    assert state.sizes_version == before + 3


def test_the_operator_registers_event_watchers_only_so_kopf_needs_no_diff_base() -> None:
    import kopf

    from stoker.operator import main

    registry = kopf.OperatorRegistry()
    main.register_watches(registry, State(), fleet="blue")
    # The diff base it gives kopf keeps nothing: a change handler registered later would see no changes.
    assert len(registry._watching.get_all_handlers()) == 4
    assert not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()
    storage = main._no_diff_base()
    assert storage.build(body={"spec": {"model": "sd"}}) == {} and storage.fetch(body={}) is None


def test_a_job_seen_again_at_the_version_stored_is_not_taken_in_twice() -> None:
    state = State()
    state.upsert_job(job_body(rv="11", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    stored = state.jobs["ns/j"]
    state.take_touched_jobs()
    # The watch echoes the binding the operator already took in from the patch's response.
    state.upsert_job(job_body(rv="11", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"}))
    assert state.jobs["ns/j"] is stored and state.take_touched_jobs() == set()
    state.upsert_job(job_body(rv="12", labels={"stoker.dev/agent": "a"}, annotations={"stoker.dev/attempt": "1"},
                              status={"phase": "Running"}))
    assert state.jobs["ns/j"].resource_version == "12" and state.take_touched_jobs() == {"ns/j"}


def test_the_api_clients_credentials_are_applied_again_at_most_every_few_seconds(tmp_path: Any,
                                                                                  monkeypatch: Any) -> None:
    from stoker.operator import main

    monkeypatch.setattr(main, "_AUTH_REFRESH_S", 3600.0)  # the mechanism, not the period: no clock in the test

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: secret-token}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    cfg = main.make_api_client(str(kubeconfig), pool_size=4).configuration
    assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer secret-token"  # a request: the hook applies it
    cfg.host = "https://127.0.0.2:6443"  # what applying it again would undo
    for _ in range(3):
        assert cfg.get_api_key_with_prefix("BearerToken") == "Bearer secret-token"
    assert cfg.host == "https://127.0.0.2:6443", "applied once, not before every request"
