"""The simulator drives the real decision code: imported, not copied."""

from __future__ import annotations

import stoker.agent.disk_cache
import stoker.operator.placement
import stoker.operator.planner
import stoker.operator.replicas
import stoker.userank
from stoker.sim import adapter, cli, engine, policies, replica_driver


def tiny() -> tuple:
    args = cli.parse_args(
        ["--models", "30", "--loras", "20", "--agents", "3", "--duration-s", "300", "--disk-gb", "15",
         "--vram-gb", "16", "--ram-gb", "10", "--interruptions", "0", "--no-burst"]
    )
    return cli.build(args)


def test_the_simulator_uses_the_operators_and_agents_own_functions() -> None:
    assert policies.plan_placement is stoker.operator.placement.plan_placement
    assert policies.Planner is stoker.operator.planner.Planner
    assert adapter.plan_bindings is stoker.operator.placement.plan_bindings
    assert adapter.add_use is stoker.userank.add_use
    assert adapter.FleetRank is stoker.userank.FleetRank
    assert stoker.operator.placement.add_use is stoker.agent.disk_cache.add_use is stoker.userank.add_use
    assert replica_driver.plan_replicas is stoker.operator.replicas.plan_replicas
    assert adapter.plan_eviction is stoker.agent.disk_cache.plan_eviction
    assert adapter.DiskCacheState is stoker.agent.disk_cache.DiskCacheState


def test_the_stoker_policy_binds_exactly_what_the_operators_planner_returns(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[str, ...]] = []
    real = stoker.operator.planner.Planner.plan

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(self, *args, **kwargs)
        calls.append(tuple(f"{b.job_key}->{b.agent}" for b in out.bindings))
        return out

    monkeypatch.setattr(stoker.operator.planner.Planner, "plan", spy)
    trace, fleet = tiny()
    result = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker"))
    planned = [pair for call in calls for pair in call]
    assert len(planned) == result.decisions == len(trace.jobs)
    first_bindings = {f"{j.job_id}->{j.agent}" for j in result.jobs}
    assert first_bindings <= set(planned)


def test_every_agent_eviction_goes_through_the_agents_plan_eviction(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = 0
    real = stoker.agent.disk_cache.plan_eviction

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter, "plan_eviction", spy)
    trace, fleet = tiny()
    engine.simulate(trace, fleet, lambda: policies.make_policy("least-conn"))
    assert calls > 0


def test_replica_planning_runs_and_its_holds_reach_the_agents() -> None:
    trace, fleet = tiny()
    policy = policies.make_policy("stoker+autoscale")
    sim = engine.Simulator(trace, fleet, policy)
    result = sim.run()
    assert policy.replica_calls > 0
    plan = policy._planner.last_plan
    assert plan is not None
    ordered = {o.agent: frozenset(k for k, _ in o.holds) for o in plan.orders}
    assert any(ordered.values()), "autoscale should hold the busiest models somewhere"
    assert result.bytes_prefetched > 0


def test_baselines_never_consult_the_placement_core(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a baseline called plan_bindings")

    monkeypatch.setattr(policies, "plan_bindings", boom)
    monkeypatch.setattr(policies, "plan_placement", boom)
    monkeypatch.setattr(stoker.operator.planner.Planner, "plan", boom)
    trace, fleet = tiny()
    for key in ("least-conn", "random", "holder"):
        assert engine.simulate(trace, fleet, lambda: policies.make_policy(key)).jobs_lost == 0


def test_holder_routing_sends_a_job_to_the_agent_that_has_its_model() -> None:
    trace, fleet = tiny()
    sim = engine.Simulator(trace, fleet, policies.make_policy("holder"))
    for slot in range(fleet.n_agents):
        sim._join(slot)
    model = trace.jobs[0].model
    sim.agents[2].vram[model] = 0.0
    job = engine.JobRecord(request=trace.jobs[0])
    (bound_job, agent), = sim.policy.assign(sim, [job], 0.0)
    assert bound_job is job and agent is sim.agents[2]


def test_stoker_agents_start_fetched_copies_from_the_operators_fleet_wide_rank(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    hints: dict[str, list[float | None]] = {"stoker": [], "least-conn": [], "stoker-lastused": []}
    real = stoker.agent.disk_cache.DiskCacheState.commit
    current: list[str] = []

    def spy(self, key, *, now, size_bytes=None, rank_hint_s=None):  # type: ignore[no-untyped-def]
        hints[current[0]].append(rank_hint_s)
        return real(self, key, now=now, size_bytes=size_bytes, rank_hint_s=rank_hint_s)

    monkeypatch.setattr(stoker.agent.disk_cache.DiskCacheState, "commit", spy)
    trace, fleet = tiny()
    for key in hints:
        current[:] = [key]
        engine.simulate(trace, fleet, lambda: policies.make_policy(key))
    assert hints["stoker"] and all(h is not None for h in hints["stoker"])
    assert hints["least-conn"] and all(h is None for h in hints["least-conn"])
    assert hints["stoker-lastused"] and all(h is None for h in hints["stoker-lastused"])


def test_the_fleet_rank_counts_every_job_once_as_the_operators_fleet_rank_does() -> None:
    trace, fleet = tiny()
    sim = engine.Simulator(trace, fleet, policies.make_policy("stoker"))
    policy = sim.policy
    jobs = [engine.JobRecord(request=r) for r in trace.jobs[:5]]
    policy._count_uses(jobs)
    policy._count_uses(jobs)  # seen again in the next pass: not counted twice
    expected: dict[str, float] = {}
    for r in trace.jobs[:5]:
        for key in r.artifacts:
            expected[key] = stoker.userank.add_use(expected.get(key), r.submit_s,
                                                   half_life_s=stoker.userank.DEFAULT_HALF_LIFE_S)
    assert {k: policy.rank_hint(k) for k in expected} == expected


def test_agent_views_show_one_gpu_with_queue_slots_and_the_agents_eviction_ranks() -> None:
    trace, fleet = tiny()
    sim = engine.Simulator(trace, fleet, policies.make_policy("stoker"))
    for slot in range(fleet.n_agents):
        sim._join(slot)
    agent = sim.agents[0]
    state, _, _ = agent.disk.pin("m0001", now=5.0).reserve("m0001", 10**9, now=5.0)
    agent.disk = state.commit("m0001", now=8.0).unpin("m0001", now=20.0).pin("m0001", now=25.0).unpin("m0001", now=26.0)
    view = adapter.agent_view(sim, agent, 30.0)
    assert (view.slots, view.queue_slots, view.free_slots) == (1, fleet.slots - 1, fleet.slots)
    two_uses = stoker.userank.add_use(8.0, 25.0, half_life_s=stoker.userank.DEFAULT_HALF_LIFE_S)
    assert view.disk_rank_s == {"m0001": two_uses}
    lastused = adapter.agent_view(sim, agent, 30.0, frequency_ranks=False)
    assert lastused.disk_rank_s == {"m0001": 26.0}
    old = adapter.agent_view(sim, agent, 30.0, queue_slots=False)
    assert (old.slots, old.queue_slots) == (fleet.slots, 0)


def test_peer_tier_agents_discount_duplicates_as_real_agents_do_by_default() -> None:
    from stoker.agent.settings import AgentSettings

    shipped = AgentSettings.model_fields["peer_duplicate_discount_s"].default
    assert policies.make_policy("stoker+peers").duplicate_discount_s == shipped > 0
    assert policies.make_policy("stoker").duplicate_discount_s == 0
