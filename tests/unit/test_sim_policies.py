"""The simulator drives the real decision code: imported, not copied."""

from __future__ import annotations

import stoker.agent.disk_cache
import stoker.operator.placement
import stoker.operator.replicas
from stoker.sim import adapter, cli, engine, policies, replica_driver


def tiny() -> tuple:
    args = cli.parse_args(
        ["--models", "30", "--loras", "20", "--agents", "3", "--duration-s", "300", "--disk-gb", "15",
         "--vram-gb", "16", "--ram-gb", "10", "--interruptions", "0", "--no-burst"]
    )
    return cli.build(args)


def test_the_simulator_uses_the_operators_and_agents_own_functions() -> None:
    assert policies.plan_bindings is stoker.operator.placement.plan_bindings
    assert adapter.plan_bindings is stoker.operator.placement.plan_bindings
    assert replica_driver.plan_replicas is stoker.operator.replicas.plan_replicas
    assert adapter.plan_eviction is stoker.agent.disk_cache.plan_eviction
    assert adapter.DiskCacheState is stoker.agent.disk_cache.DiskCacheState


def test_the_stoker_policy_binds_exactly_what_plan_bindings_returns(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[tuple[str, ...]] = []
    real = stoker.operator.placement.plan_bindings

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(tuple(f"{b.job_key}->{b.agent}" for b in out))
        return out

    monkeypatch.setattr(policies, "plan_bindings", spy)
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
