"""The fleet simulator: conservation, interruptions, determinism, budgets."""

from __future__ import annotations

import dataclasses

import pytest

from stoker.sim import cli, engine, policies


def scenario(*extra: str) -> tuple:
    args = cli.parse_args(
        ["--models", "60", "--loras", "40", "--agents", "4", "--duration-s", "900", "--disk-gb", "20",
         "--vram-gb", "16", "--ram-gb", "12", "--no-burst", *extra]
    )
    return cli.build(args)


@pytest.fixture(scope="module")
def stormy() -> tuple:
    # Six interruptions per agent-hour: several pods vanish mid-job during the run.
    return scenario("--interruptions", "6")


@pytest.mark.parametrize("key", policies.POLICIES)
def test_no_job_is_lost_when_agents_are_interrupted(stormy: tuple, key: str) -> None:
    trace, fleet = stormy
    result = engine.simulate(trace, fleet, lambda: policies.make_policy(key))
    assert result.requeues > 0, "the scenario must interrupt agents that hold jobs"
    assert result.jobs_lost == 0
    assert result.agents_seen > fleet.n_agents


@pytest.mark.parametrize("key", ["least-conn", "stoker"])
def test_every_submitted_job_finishes_once_the_fleet_drains(stormy: tuple, key: str) -> None:
    trace, fleet = stormy
    result = engine.simulate(trace, fleet, lambda: policies.make_policy(key))
    assert len(result.jobs) == len(trace.jobs)
    assert all(j.finish_s is not None and j.start_s is not None for j in result.jobs)
    assert all(j.request.submit_s <= j.bind_s <= j.start_s < j.finish_s for j in result.jobs)  # type: ignore[operator]
    assert all(j.tier in engine.Tier.ALL for j in result.jobs)


def test_jobs_still_queued_when_time_runs_out_are_counted_as_queued_not_lost(stormy: tuple) -> None:
    trace, fleet = stormy
    sim = engine.Simulator(trace, fleet, policies.make_policy("least-conn"), drain_s=0.0)
    result = sim.run()
    unfinished = [j for j in result.jobs if j.finish_s is None]
    assert unfinished, "with no drain time some jobs must still be queued"
    assert result.jobs_lost == 0


def test_the_same_seed_gives_the_same_result(stormy: tuple) -> None:
    trace, fleet = stormy
    a = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker+autoscale"))
    b = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker+autoscale"))
    assert a.bytes_downloaded == b.bytes_downloaded
    assert a.requeues == b.requeues
    assert [(j.agent, j.start_s, j.tier) for j in a.jobs] == [(j.agent, j.start_s, j.tier) for j in b.jobs]


def test_interruptions_hit_every_policy_at_the_same_times() -> None:
    fleet = engine.FleetConfig(n_agents=5, interruptions_per_agent_hour=2.0, seed=9)
    first = engine.interruption_schedule(fleet, until_s=7200.0)
    assert first == engine.interruption_schedule(fleet, until_s=7200.0)
    total = sum(len(v) for v in first.values())
    assert 5 <= total <= 40  # about 2 per agent-hour over 10 agent-hours
    for times in first.values():
        assert all(b - a >= fleet.replace_delay_s for a, b in zip(times, times[1:]))


def test_no_interruptions_means_no_requeues() -> None:
    trace, fleet = scenario("--interruptions", "0")
    result = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker"))
    assert result.requeues == 0
    assert result.agents_seen == fleet.n_agents
    assert result.jobs_lost == 0


def test_disk_budget_holds_on_every_agent_at_the_end(stormy: tuple) -> None:
    trace, fleet = stormy
    sim = engine.Simulator(trace, fleet, policies.make_policy("stoker+replicas"))
    sim.run()
    for agent in sim.agents:
        assert agent.disk.used_bytes + agent.disk.reserved_bytes <= fleet.disk_bytes  # type: ignore[attr-defined]
        assert agent.vram_used <= fleet.vram_weights_bytes
        assert agent.ram_used <= fleet.ram_bytes


def test_a_replacement_pod_starts_with_only_the_baked_in_models(stormy: tuple) -> None:
    trace, fleet = stormy
    sim = engine.Simulator(trace, fleet, policies.make_policy("least-conn"))
    sim._join(0)
    sim._join(0)  # a second incarnation of slot 0: a replacement pod
    agent = sim.agents[0]
    assert set(agent.disk.entries) == set(fleet.baked)  # type: ignore[attr-defined]
    assert agent.vram == {} and agent.ram == {}
    assert agent.name.startswith("agent-000-r")


def test_a_replacement_may_not_arrive_before_the_old_pod_is_noticed_gone() -> None:
    with pytest.raises(engine.SimError, match="replace_delay_s"):
        engine.FleetConfig(detect_s=60.0, replace_delay_s=30.0)


def test_gpu_busy_time_never_exceeds_agent_lifetime(stormy: tuple) -> None:
    trace, fleet = stormy
    result = engine.simulate(trace, fleet, lambda: policies.make_policy("holder"))
    assert 0 < result.busy_infer_s + result.busy_load_s <= result.gpu_seconds * 1.01


def test_a_policy_binding_a_job_to_a_vanished_agent_is_a_simulator_error(stormy: tuple) -> None:
    trace, fleet = stormy

    class Bad(policies.LeastConnection):
        def assign(self, sim, pending, now):  # type: ignore[no-untyped-def]
            for agent in sim.agents:
                agent.visible = False
            return [(pending[0], sim.agents[0])]

    with pytest.raises(engine.SimError, match="not Ready"):
        engine.simulate(dataclasses.replace(trace, jobs=trace.jobs[:1]), fleet, Bad)
