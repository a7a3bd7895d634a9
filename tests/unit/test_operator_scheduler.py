"""The scheduling pass on the operator's state: placement's fast paths give the plan a full pass would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stoker.operator import placement
from stoker.operator.scheduler import Scheduler
from stoker.operator.state import State


class RecordingWriter:
    """Stands in for the thread pool of API writes: records the bindings a pass starts."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def may_act(self, key: str, resource_version: str) -> bool:
        return True

    def submit(self, key: str, resource_version: str, fn: Callable[[], None], *,
               cleanup: Callable[[], None] | None = None) -> bool:
        self.submitted.append(key)
        return True


def agent(name: str, *, slots: int = 1, queue_slots: int = 0, models: tuple[str, ...] = (), rv: str = "1") -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": rv},
            "spec": {}, "status": {"slots": slots, "queueSlots": queue_slots, "node": f"n-{name}",
                                   "disk": {"budgetBytes": 50 << 30}, "vram": {"budgetBytes": 24 << 30},
                                   "models": [{"name": m, "tier": "vram", "sizeBytes": 1 << 30} for m in models]}}


def job(name: str, model: str, second: int) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": "1",
                         "creationTimestamp": f"2026-01-01T00:00:{second:02d}Z"},
            "spec": {"model": model, "params": {"prompt": "x"}}}


def lease(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"renewTime": "2026-01-01T00:00:00Z", "leaseDurationSeconds": 15, "holderIdentity": name}}


def model(name: str) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": "1"},
            "spec": {"source": {"url": f"https://models.test/{name}.safetensors"}}}


def fleet(state: State, agents: list[dict[str, Any]]) -> None:
    """The agents, their Leases, and the ModelCaches the tests' jobs name (a job whose ModelCache
    is missing waits unbound)."""
    for a in agents:
        state.upsert_agent(a)
        state.upsert_lease(lease(a["metadata"]["name"]), now_mono=0.0)
    for name in ("sd", "xl", "bad", "m0", "m1", "m2", "m3"):
        state.upsert_model(model(name))


def test_a_job_whose_model_cache_is_missing_waits_unbound() -> None:
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("a", slots=2)])
    state.upsert_job(job("lost", "nowhere", 0))
    state.upsert_job(job("fine", "sd", 1))
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    assert sched.schedule_once(now=NOW, now_mono=1.0) == 1
    assert writer.submitted == ["ns/fine"]


NOW = 1767225600.0 + 60  # 2026-01-01T00:01:00Z


def test_a_pass_binds_the_oldest_jobs_into_the_free_slots_on_the_agents_holding_their_models() -> None:
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("hot-sd", models=("sd",)), agent("hot-xl", models=("xl",))])
    for i, (name, model) in enumerate([("j0", "sd"), ("j1", "xl"), ("j2", "sd"), ("j3", "sd")]):
        state.upsert_job(job(name, model, i))
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    assert sched.schedule_once(now=NOW, now_mono=1.0) == 2
    assert writer.submitted == ["ns/j0", "ns/j1"]
    assert state.inflight == {"ns/j0": "ns/hot-sd", "ns/j1": "ns/hot-xl"}
    # The next pass sees both agents full (bindings in flight count) and binds nothing.
    assert sched.schedule_once(now=NOW, now_mono=1.1) == 0


def test_queue_slots_let_a_pass_bind_beyond_the_generation_slots() -> None:
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("a", slots=1, queue_slots=2, models=("sd",))])
    for i in range(5):
        state.upsert_job(job(f"j{i}", "sd", i))
    assert Scheduler(state, writer, lease_grace_s=30.0).schedule_once(now=NOW, now_mono=1.0) == 3  # type: ignore[arg-type]


def test_unchanged_agents_keep_their_view_objects_between_passes() -> None:
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("a", slots=4, models=("sd",)), agent("b", slots=4)])
    state.upsert_job(job("j0", "sd", 0))
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    sched.schedule_once(now=NOW, now_mono=1.0)
    before = {k: v for k, (_, v) in sched._fleets["ns"].views.items()}
    state.upsert_job(job("j1", "xl", 1))
    sched.schedule_once(now=NOW, now_mono=1.2)
    after = {k: v for k, (_, v) in sched._fleets["ns"].views.items()}
    assert after["ns/b"] is before["ns/b"], "the agent nothing was bound to keeps its view"
    assert [k for k in after if after[k] is not before[k]] == ["ns/a"], "the agent that got j0 has a new view"


def test_the_fast_pass_plans_what_a_plain_full_pass_plans() -> None:
    state, writer = State(), RecordingWriter()
    agents = [agent(f"a{i}", slots=2, models=(f"m{i % 3}",)) for i in range(6)]
    fleet(state, agents)
    jobs = [job(f"j{i:02d}", f"m{i % 4}", i) for i in range(20)]
    for j in jobs:
        state.upsert_job(j)
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    sched.schedule_once(now=NOW, now_mono=1.0)
    from stoker.operator.state import agent_view, job_view
    views = [agent_view(state.agents[f"ns/a{i}"], ready=True, bound=0, in_use=()) for i in range(6)]
    sizes = [placement.ArtifactInfo(f"m{i}", 4 << 30) for i in range(4)]
    plain = placement.plan_placement([job_view(state.jobs[f"ns/{j['metadata']['name']}"]) for j in jobs], views, sizes,
                                     now=NOW, settings=placement.PlacementSettings())
    assert sorted(writer.submitted) == sorted(b.job_key for b in plain.bindings)


def test_jobs_whose_model_source_failed_are_left_for_the_reconciler() -> None:
    from stoker.operator.sourcehealth import SourceVerdict
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("a", slots=2)])
    state.upsert_job(job("broken", "bad", 0))
    state.upsert_job(job("fine", "sd", 1))
    state.source_failed = {"ns/bad": SourceVerdict("HTTPServerError", "down", 3, 3)}
    Scheduler(state, writer, lease_grace_s=30.0).schedule_once(now=NOW, now_mono=1.0)  # type: ignore[arg-type]
    assert writer.submitted == ["ns/fine"]


def test_a_checkpoint_of_unknown_size_is_not_planned_beyond_the_largest_vram_budget() -> None:
    state, writer = State(), RecordingWriter()
    small = agent("small")
    small["status"]["vram"] = {"budgetBytes": 1 << 30}  # a guess of 4 GiB would fit nowhere
    fleet(state, [small])
    state.upsert_job(job("cold", "sd", 0))
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    assert sched.schedule_once(now=NOW, now_mono=1.0) == 1 and writer.submitted == ["ns/cold"]


def test_a_pass_reads_only_the_agents_that_changed_and_still_sees_every_readiness_turn() -> None:
    state, writer = State(), RecordingWriter()
    fleet(state, [agent("a"), agent("b")])
    state.upsert_job(job("j0", "nomodel", 0))  # stays pending (no ModelCache): every pass reads the fleet
    sched = Scheduler(state, writer, lease_grace_s=30.0)  # type: ignore[arg-type]
    reads: list[str] = []
    readiness = state.readiness

    def counted(key: str, **kw: Any) -> Any:
        reads.append(key)
        return readiness(key, **kw)

    state.readiness = counted  # type: ignore[method-assign]

    def passes(now_mono: float) -> dict[str, bool]:
        reads.clear()
        sched.schedule_once(now=NOW, now_mono=now_mono)
        seen = {k: v.ready for k, (_, v) in sched._fleets["ns"].views.items()}
        read_by_pass = list(reads)
        # What reading every agent afresh would give:
        assert seen == {k: state.agent_ready(k, now_mono=now_mono, grace_s=30.0) for k in state.agents}
        reads[:] = read_by_pass
        return seen

    assert passes(1.0) == {"ns/a": True, "ns/b": True} and sorted(reads) == ["ns/a", "ns/b"]
    assert passes(1.5) == {"ns/a": True, "ns/b": True} and reads == [], "nothing changed: no agent read"
    renewed = lease("a")
    renewed["spec"]["renewTime"] = "2026-01-01T00:00:02Z"
    state.upsert_lease(renewed, now_mono=2.0)
    assert passes(2.5) == {"ns/a": True, "ns/b": True} and reads == ["ns/a"]
    assert passes(25.0) == {"ns/a": True, "ns/b": True} and len(reads) == 2, "every agent, every 10 s"
    # b's renewal is 30 s old: it lapses without any event naming it.
    assert passes(31.0) == {"ns/a": True, "ns/b": False} and reads == ["ns/b"]
    # No Lease event for longer than the grace: a stuck watch, not a dead fleet.
    assert passes(51.0) == {"ns/a": True, "ns/b": True}
    renewed["spec"]["renewTime"] = "2026-01-01T00:00:52Z"
    state.upsert_lease(renewed, now_mono=52.0)
    assert passes(52.5) == {"ns/a": True, "ns/b": False}, "the watch speaks again: b's silence counts"
    state.upsert_agent(agent("c"))
    state.upsert_lease(lease("c"), now_mono=53.0)
    state.delete_agent(agent("b"))
    assert passes(53.5) == {"ns/a": True, "ns/c": True}
    assert [v.name for v in sched._agent_views("ns", sched._fleets["ns"], 53.6)] == ["a", "c"]
