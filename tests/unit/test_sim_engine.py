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


# ---- the peer tier: agents fetch from each other ----------------------------------------------

from stoker.sim import workload  # noqa: E402


class ToAgent(policies.LeastConnection):
    """Job i goes to agent `route[i]`; the agents fetch from peers when `peer_fetch`."""

    name = "routed"

    def __init__(self, route: list[int], *, peer_fetch: bool) -> None:
        super().__init__()
        self.route = route
        self.peer_fetch = peer_fetch

    def assign(self, sim, pending, now):  # type: ignore[no-untyped-def]
        return [(job, sim.agents[self.route[job.job_id]]) for job in pending if sim.agents[self.route[job.job_id]].visible]


GB = 10**9


def one_model_trace(times: list[float], size: int = 8 * GB) -> workload.Trace:
    catalog = workload.Catalog((workload.Artifact("big", workload.ArtifactKind.CHECKPOINT, workload.Family.SDXL, size),))
    jobs = tuple(workload.JobRequest(job_id=i, submit_s=t, model="big") for i, t in enumerate(times))
    return workload.Trace(catalog=catalog, jobs=jobs, duration_s=max(times))


def quiet_fleet(n: int) -> engine.FleetConfig:
    return engine.FleetConfig(n_agents=n, interruptions_per_agent_hour=0.0, disk_bytes=50 * GB)


def test_concurrent_misses_fan_out_from_the_first_copy_instead_of_all_hitting_the_source() -> None:
    trace = one_model_trace([0.0, 0.0, 0.0, 0.0])
    fleet = quiet_fleet(4)
    alone = engine.simulate(trace, fleet, lambda: ToAgent([0, 1, 2, 3], peer_fetch=False))
    peers = engine.simulate(trace, fleet, lambda: ToAgent([0, 1, 2, 3], peer_fetch=True))
    assert alone.bytes_downloaded == 4 * 8 * GB and alone.bytes_from_peers == 0
    assert peers.bytes_downloaded == 8 * GB  # the source sees the file once
    assert peers.bytes_from_peers == 3 * 8 * GB and peers.peer_fetches == 3
    assert peers.bytes_by_cause == {"first": 8 * GB}
    assert peers.peer_bytes_by_cause == {"duplicate": 3 * 8 * GB}
    # nobody started before the first copy was complete: 8 GB at 400 MB/s is 20 s
    assert min(j.start_s for j in peers.jobs[1:]) >= 20.0  # type: ignore[type-var]
    assert all(j.finish_s is not None for j in peers.jobs) and peers.jobs_lost == 0


def test_a_model_another_agent_holds_comes_from_it_at_lan_speed() -> None:
    trace = one_model_trace([0.0, 100.0])
    fleet = quiet_fleet(2)
    result = engine.simulate(trace, fleet, lambda: ToAgent([0, 1], peer_fetch=True))
    assert (result.bytes_downloaded, result.bytes_from_peers) == (8 * GB, 8 * GB)
    second = result.jobs[1]
    # 8 GB from a peer at the holder's upload share (1 GB/s over 2 slots): 16 s instead of 20 s from the source
    rate = min(fleet.peer_bytes_per_s, fleet.peer_upload_bytes_per_s / fleet.peer_upload_slots)
    assert second.start_s is not None and second.start_s - 100.0 == pytest.approx(8 * GB / rate + 8 * GB / fleet.disk_to_gpu_bytes_per_s)


def test_a_holder_that_vanishes_mid_transfer_costs_only_the_missing_bytes_from_elsewhere() -> None:
    trace = one_model_trace([0.0, 100.0])
    fleet = quiet_fleet(2)
    sim = engine.Simulator(trace, fleet, ToAgent([0, 1], peer_fetch=True))
    sim._push(104.0, engine._INTERRUPT, 0)  # agent-000 serves agent-001 from t=100 s: gone 4 s in
    result = sim.run()
    rate = min(fleet.peer_bytes_per_s, fleet.peer_upload_bytes_per_s / fleet.peer_upload_slots)
    moved = int(4.0 * rate)
    assert result.peer_resumes == 1
    assert result.bytes_from_peers == moved
    # the rest came from the source (no other holder), resumed, not fetched again
    assert result.bytes_downloaded == 8 * GB + (8 * GB - moved)
    assert result.bytes_by_cause == {"first": 8 * GB, "interrupted": 8 * GB - moved}
    assert result.jobs[1].agent == "agent-001" and result.jobs[1].finish_s is not None


def test_a_waiting_fetch_turns_to_the_source_when_the_copy_it_waited_for_vanishes() -> None:
    # Both agents miss at once: agent-001 waits for agent-000's copy, which vanishes 10 s in.
    trace = one_model_trace([0.0, 0.0])
    fleet = quiet_fleet(2)
    sim = engine.Simulator(trace, fleet, ToAgent([0, 1], peer_fetch=True))
    sim._push(10.0, engine._INTERRUPT, 0)
    result = sim.run()
    # agent-000's 8 GB (counted when it started) and agent-001's own 8 GB once the copy it waited for was gone;
    # the replacement pod that takes job 0 back then fetches it from agent-001, not the source
    assert result.bytes_downloaded == 16 * GB
    assert result.peer_log[:2] == [(0.0, 8 * GB), (10.0, -8 * GB)]  # the wait, planned and taken back
    assert result.bytes_from_peers == 8 * GB and result.jobs[0].agent == "agent-000-r1"
    assert result.jobs_lost == 0 and all(j.finish_s is not None for j in result.jobs)


def test_the_push_baselines_never_fetch_from_peers(stormy: tuple) -> None:
    trace, fleet = stormy
    result = engine.simulate(trace, fleet, lambda: policies.make_policy("least-conn"))
    assert result.bytes_from_peers == 0 and result.peer_fetches == 0


def test_with_peers_the_source_sees_no_more_bytes_and_no_job_is_lost(stormy: tuple) -> None:
    trace, fleet = stormy
    alone = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker"))
    peers = engine.simulate(trace, fleet, lambda: policies.make_policy("stoker+peers"))
    assert peers.bytes_from_peers > 0
    assert peers.bytes_by_cause.get("duplicate", 0) <= alone.bytes_by_cause.get("duplicate", 0)
    assert peers.jobs_lost == 0 and peers.requeues > 0
    # every byte counted once: what the fleet fetched equals the peer and source bytes
    assert sum(peers.peer_bytes_by_cause.values()) == peers.bytes_from_peers
    assert sum(peers.bytes_by_cause.values()) == peers.bytes_downloaded


def test_with_a_duplicate_discount_agents_evict_what_a_peer_can_give_back_first() -> None:
    # Two agents with room for two 20 GB models each (the routed policy's agents evict by plain LRU).
    # Both hold "shared", which agent-000 used after "own", its only copy in the fleet. A third model
    # arrives on agent-000: by use alone "own" would go (and cost the source again later); with the
    # discount "shared" goes, as agent-001 keeps it.
    catalog = workload.Catalog(tuple(
        workload.Artifact(name, workload.ArtifactKind.CHECKPOINT, workload.Family.SDXL, 20 * GB)
        for name in ("shared", "own", "third")))
    times = [0.0, 0.0, 100.0, 200.0, 260.0, 320.0, 380.0, 1000.0]
    models = ["shared", "shared", "own", "shared", "shared", "shared", "shared", "third"]
    route = [0, 1, 0, 0, 0, 0, 0, 0]
    jobs = tuple(workload.JobRequest(job_id=i, submit_s=t, model=m) for i, (t, m) in enumerate(zip(times, models)))
    trace = workload.Trace(catalog=catalog, jobs=jobs, duration_s=1000.0)
    fleet = engine.FleetConfig(n_agents=2, interruptions_per_agent_hour=0.0, disk_bytes=45 * GB)

    def run(discount_s: float) -> engine.Simulator:
        policy = ToAgent(route, peer_fetch=True)
        policy.duplicate_discount_s = discount_s  # type: ignore[attr-defined]
        sim = engine.Simulator(trace, fleet, policy)
        sim.run()
        return sim

    plain, discounted = run(0.0), run(8 * 3600.0)
    assert set(plain.agents[0].disk.entries) == {"shared", "third"}  # the fleet's only "own" is gone
    assert set(discounted.agents[0].disk.entries) == {"own", "third"}
    assert set(discounted.agents[1].disk.entries) == {"shared"}


def test_a_fetch_replanned_after_its_holder_vanished_never_takes_the_copy_that_waits_on_it() -> None:
    # agent-000 holds the model; agent-001 fetches it from agent-000 at t=100 s and agent-002 waits for
    # agent-001's copy (agent-000's upload slot is busy). agent-000 vanishes mid-transfer: agent-001
    # must not turn to agent-002, whose copy would come from agent-001 itself (a cycle that never ends).
    trace = one_model_trace([0.0, 100.0, 100.5])
    fleet = dataclasses.replace(quiet_fleet(3), peer_upload_slots=1)
    sim = engine.Simulator(trace, fleet, ToAgent([0, 1, 2], peer_fetch=True))
    sim._push(104.0, engine._INTERRUPT, 0)
    result = sim.run()
    assert result.peer_resumes >= 1 and result.jobs_lost == 0
    assert all(j.finish_s is not None for j in result.jobs)
    # the missing bytes came once from the source, not round a cycle of agents
    assert result.bytes_downloaded < 2 * 8 * GB
