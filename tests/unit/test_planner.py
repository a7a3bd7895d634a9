"""The planner with memory: the decisions of `plan_placement`, pass by pass, at a fraction of the work; promises."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from stoker.operator import placement
from stoker.operator.placement import AgentView, ArtifactInfo, JobView, PlacementPlan, PlacementSettings, Waiting
from stoker.operator.planner import Planner, PromiseSettings
from stoker.sim import cli, engine, policies

GB = 10**9


def same(memory: PlacementPlan, fresh: PlacementPlan) -> bool:
    """Decision for decision, every number and reason included."""
    return (memory.bindings, memory.waiting, memory.unplaceable, memory.jobs_examined) == (
        fresh.bindings, fresh.waiting, fresh.unplaceable, fresh.jobs_examined)


class CheckingPolicy(policies.StokerPolicy):
    """The simulator's Stoker policy with the operator's planner, checked on every pass against
    `plan_placement` run on the very same arguments (with a FleetIndex kept between its calls too)."""

    def __init__(self) -> None:
        super().__init__(name="stoker", promises=None)
        self.index = placement.FleetIndex()
        self.passes = 0
        self.differences: list[tuple[float, PlacementPlan, PlacementPlan]] = []
        planner_plan = self.placement.plan

        def plan(jobs, views, artifacts, *, now, **queue):  # type: ignore[no-untyped-def]
            memory = planner_plan(jobs, views, artifacts, now=now, **queue)
            fresh = placement.plan_placement(jobs, views, artifacts, now=now, settings=self.settings, index=self.index,
                                             **queue)
            self.passes += 1
            if not same(memory, fresh):
                self.differences.append((now, memory, fresh))
            return memory

        self.placement.plan = plan  # type: ignore[method-assign]


@pytest.mark.parametrize("seed", ["1", "3"])
def test_the_planner_decides_as_plan_placement_pass_by_pass_on_a_seeded_simulated_fleet(seed: str) -> None:
    args = cli.parse_args(["--duration-s", "600", "--seed", seed])
    trace, fleet = cli.build(args)  # 20 agents, Zipf traffic over 1,000 models and 2,000 LoRAs, interruptions
    policy = CheckingPolicy()
    result = engine.Simulator(trace, fleet, policy).run()
    assert policy.passes > 1000 and result.decisions > 500
    assert not policy.differences, f"{len(policy.differences)} of {policy.passes} passes differ; first: {policy.differences[0]}"
    stats = policy.placement.stats
    # The memory does the work: most jobs of most passes are not placed again.
    assert stats.reused > 4 * stats.placed, stats


ARTS = {f"m{i}": ArtifactInfo(f"m{i}", (2 + i % 3) * GB) for i in range(8)} | {
    f"l{i}": ArtifactInfo(f"l{i}", 200 * 10**6) for i in range(4)}


def random_agent(rng: random.Random, name: str) -> AgentView:
    models = [k for k in ARTS if k.startswith("m")]
    disk = frozenset(rng.sample(models, 3) + rng.sample(sorted(k for k in ARTS if k.startswith("l")), 1))
    vram = frozenset(rng.sample(sorted(disk), 1))
    slots = rng.choice([1, 1, 2])
    queue = rng.choice([0, 1])
    free = rng.randint(0, slots + queue)
    bound = slots + queue - free
    return AgentView(
        name=name, node=name, zone=f"z{rng.randint(0, 1)}", ready=rng.random() > 0.05, slots=slots,
        queue_slots=queue, free_slots=free, running_remaining_s=tuple(rng.uniform(1, 30) for _ in range(bound)),
        vram_capacity_bytes=8 * GB, vram_free_bytes=rng.randint(0, 6) * GB,
        disk_capacity_bytes=16 * GB, disk_free_bytes=rng.randint(0, 4) * GB,
        vram=vram, disk=disk, disk_rank_s={k: rng.uniform(0, 7200) for k in sorted(disk)},
        held=frozenset(rng.sample(sorted(disk), rng.randint(0, 1))),
        # a bound job may still have to download its model: the agent has promised that disk space
        in_use=frozenset(rng.sample(sorted(disk), 1) + rng.sample(models, rng.randint(0, 1))) if bound else frozenset(),
        download_bps=rng.choice([200e6, 2e9]),
    )


def random_job(rng: random.Random, key: str, now: float) -> JobView:
    return JobView(key=key, model=f"m{rng.randint(0, 7)}", loras=(f"l{rng.randint(0, 3)}",) if rng.random() < 0.4 else (),
                   priority=rng.choice([0, 0, 1]), created_at=now - rng.uniform(0, 400),
                   failed_agents=frozenset({f"a{rng.randint(0, 9)}"}) if rng.random() < 0.1 else frozenset(),
                   expected_run_s=rng.choice([None, 3.0, 10.0]))


@pytest.mark.parametrize(("holders", "cold", "agents", "seeds"), [(2, 2, 10, 400), (1, 1, 14, 200)])
def test_the_planner_decides_as_plan_placement_while_random_agents_jobs_demand_and_time_change(
        holders: int, cold: int, agents: int, seeds: int) -> None:
    # Small caps, so that candidates are left out, cold loads are ranked and aged jobs reserve agents.
    settings = PlacementSettings(holder_candidates=holders, cold_candidates=cold, max_hot_wait_age_s=200.0)
    reused = placed = 0
    # Enough seeds to meet the rare turns: a new holder that pushes the one waited for past the cap,
    # a holder of a LoRA that now holds the checkpoint, a free holder that takes the place of one
    # that turned busy, more busy holders than are looked for (which ones depends on the fleet's order).
    for seed in range(seeds):
        rng = random.Random(seed)
        planner, index = Planner(settings, promises=None), placement.FleetIndex()
        fleet = [random_agent(rng, f"a{i}") for i in range(agents)]
        now = 1000.0
        jobs = [random_job(rng, f"j{i}", now) for i in range(25)]
        serial = 25
        for step in range(60):
            for _ in range(rng.choice([0, 0, 1, 1, 2])):  # some agents change (a new view object each)
                i = rng.randrange(len(fleet))
                fleet[i] = random_agent(rng, fleet[i].name) if rng.random() < 0.5 else dataclasses.replace(
                    fleet[i], free_slots=rng.randint(0, fleet[i].slots + fleet[i].queue_slots))
            if rng.random() < 0.3:
                jobs.append(random_job(rng, f"j{serial}", now))
                serial += 1
            now += rng.choice([0.5, 0.5, 2.0, 2.0, 30.0, 70.0])
            memory = planner.plan(jobs, fleet, ARTS, now=now)
            fresh = placement.plan_placement(jobs, fleet, ARTS, now=now, settings=settings, index=index)
            assert same(memory, fresh), (seed, step)
            bound = {b.job_key for b in memory.bindings}
            jobs = [j for j in jobs if j.key not in bound]
        reused, placed = reused + planner.stats.reused, placed + planner.stats.placed
    # Churn on every pass here (and cold loads rank the whole fleet): little is reused, but some is.
    assert reused > 0, (reused, placed)


def changed_report(rng: random.Random, view: AgentView) -> AgentView:
    """The agent's next report: mostly its slots, sometimes its ranks or residents' order too."""
    changes: dict[str, Any] = {"free_slots": rng.randint(0, view.slots + view.queue_slots)}
    if rng.random() < 0.3:
        changes["disk_rank_s"] = {k: r + rng.choice([0.0, 60.0]) for k, r in view.disk_rank_s.items()}
    if rng.random() < 0.1:
        changes["download_bps"] = rng.choice([200e6, 2e9])
    if rng.random() < 0.1:
        changes["disk_to_gpu_bps"] = rng.choice([None, 5e8, 4e9])
    if rng.random() < 0.1:
        unheld = sorted(view.vram - view.held_hot)  # one more kept loaded as a hot replica, or none
        changes["held_hot"] = frozenset(rng.sample(unheld, 1)) if unheld else frozenset()
    if rng.random() < 0.1:
        changes["ram"] = view.vram - view.ram
    if rng.random() < 0.1:
        changes["held"] = frozenset(rng.sample(sorted(view.disk - view.held), 1)) if not view.held else frozenset()
    if rng.random() < 0.1:  # a model evicted from disk (loaded or not), or one more downloaded
        key = rng.choice(sorted(set(ARTS) - view.held - view.in_use))
        changes["disk"] = view.disk ^ {key}
        if view.disk_rank_s:
            changes["disk_rank_s"] = {k: view.disk_rank_s.get(k, 7200.0) for k in sorted(changes["disk"])}
    return dataclasses.replace(view, **changes)


@pytest.mark.parametrize(("holders", "cold", "agents"), [(2, 2, 10), (1, 1, 14)])
def test_views_that_remember_earlier_passes_give_the_plans_of_fresh_views(holders: int, cold: int, agents: int) -> None:
    # Views keep what placement worked out (victims, cold ranks, committed disk) for the next pass,
    # and a kept index hands victims on to an agent's next view; demand, the clock and other agents
    # move under them. A copy of each view remembers nothing; listed in the index's order, it is
    # placed with the same holders looked at first.
    settings = PlacementSettings(holder_candidates=holders, cold_candidates=cold, max_hot_wait_age_s=200.0)
    for seed in range(100):
        rng = random.Random(seed)
        # Some agents rank their disk (LRU, frequency), the others leave it to placement.
        fleet = [random_agent(rng, f"a{i}") for i in range(agents)]
        fleet = [dataclasses.replace(v, disk_rank_s={}) if rng.random() < 0.4 else v for v in fleet]
        index = placement.FleetIndex()
        now = 1000.0
        jobs = [random_job(rng, f"j{i}", now) for i in range(25)]
        for step in range(60):
            i = rng.randrange(len(fleet))
            if rng.random() < 0.5:
                fleet[i] = changed_report(rng, fleet[i])
            if rng.random() < 0.3:
                jobs.append(random_job(rng, f"j{seed}-{step}", now))
            now += rng.choice([0.5, 2.0, 30.0, 70.0])
            kept = placement.plan_placement(jobs, fleet, ARTS, now=now, settings=settings, index=index)
            bare = placement.plan_placement(jobs, [dataclasses.replace(v) for v in index.views.values()], ARTS,
                                            now=now, settings=settings)
            assert same(kept, bare), (seed, step)
            bound = {b.job_key for b in kept.bindings}
            jobs = [j for j in jobs if j.key not in bound]


def busy_holder_and_cold_agent(*, remaining_s: float = 5.0) -> list[AgentView]:
    hot = AgentView(name="hot", slots=1, free_slots=0, running_remaining_s=(remaining_s,), vram_capacity_bytes=24 * GB,
                    vram_free_bytes=0, vram=frozenset({"m0"}), disk=frozenset({"m0"}), disk_capacity_bytes=50 * GB,
                    download_bps=2e9)
    cold = AgentView(name="cold", slots=1, free_slots=1, vram_capacity_bytes=24 * GB, vram_free_bytes=24 * GB,
                     disk_capacity_bytes=50 * GB, disk_free_bytes=50 * GB, download_bps=2e9)
    return [hot, cold]


def test_a_waiting_job_is_placed_again_only_when_what_it_read_changes() -> None:
    fleet = busy_holder_and_cold_agent()
    planner = Planner(promises=None)
    job = JobView("j", "m0", created_at=0.0)
    first = planner.plan([job], fleet, ARTS, now=1.0)
    assert [w.agent for w in first.waiting] == ["hot"] and planner.stats.placed == 1
    for t in (1.5, 2.0, 2.5):
        assert planner.plan([job], fleet, ARTS, now=t) == first
    assert planner.stats.placed == 1 and planner.stats.reused == 3
    # The agent it waits for reports a longer queue: weighed again; still cheapest, with the new wait.
    fleet[0] = dataclasses.replace(fleet[0], running_remaining_s=(9.0,))
    again = planner.plan([job], fleet, ARTS, now=3.0)
    assert again == placement.plan_placement([job], fleet, ARTS, now=3.0)
    assert again.waiting[0].wait_s == 9.0


def test_a_broken_promise_sends_the_job_where_it_can_start_long_before_the_hot_wait_limit() -> None:
    # Two holders keep saying 5 s (jobs stuck there): waiting looks cheaper than a download elsewhere.
    hot, cold = busy_holder_and_cold_agent()
    fleet = [hot, dataclasses.replace(hot, name="hot-2"), cold]
    job = JobView("j", "m0", created_at=0.0)
    planner = Planner(promises=PromiseSettings(margin_s=10.0, margin_share=0.5))
    plan = planner.plan([job], fleet, ARTS, now=0.0)
    assert plan.waiting[0].agent == "hot"
    promise = planner.promise("j")
    assert promise is not None and (promise.agent, promise.start_s) == ("hot", 5.0)
    t = 0.0
    while not plan.bindings:
        t += 1.0
        plan = planner.plan([job], fleet, ARTS, now=t)
        # Without promises the job would wait until max_hot_wait_age_s.
        assert placement.plan_placement([job], fleet, ARTS, now=t).waiting
        assert not plan.waiting or plan.waiting[0].agent == "hot", "it does not hop to the next stuck holder"
    # Broken 12.5 s after the promised start; a few seconds of overrun outweigh the download.
    assert plan.bindings[0].agent == "cold"
    assert 5.0 + 12.5 < t < 30.0 < PlacementSettings().max_hot_wait_age_s
    assert planner.stats.broken_promises > 0 and planner.promise("j") is None


def test_a_replayed_wait_leaves_the_agent_with_the_disk_its_bound_jobs_promised() -> None:
    # The busy agent owes 3 GB to a bound job whose model is not on its disk yet: 1 GB free on
    # its report, none in fact. The second job, new in the second pass, weighs it after the
    # first job's wait was replayed, and must see the same disk as `plan_placement` does.
    busy = AgentView(name="busy", slots=1, free_slots=0, running_remaining_s=(5.0,), vram_capacity_bytes=24 * GB,
                     vram_free_bytes=20 * GB, vram=frozenset({"m0"}), disk=frozenset({"m0", "m2"}),
                     disk_capacity_bytes=10 * GB, disk_free_bytes=1 * GB, in_use=frozenset({"m0", "m1"}))
    too_small = AgentView(name="small", slots=1, free_slots=1, vram_capacity_bytes=1 * GB)  # fits no job
    fleet = [busy, too_small]
    first, second = JobView("a", "m0", created_at=0.0), JobView("b", "m0", loras=("l0",), created_at=1.0)
    planner = Planner(promises=None)
    for jobs, now in (([first], 2.0), ([first, second], 2.5)):
        memory = planner.plan(jobs, fleet, ARTS, now=now)
        assert same(memory, placement.plan_placement(jobs, fleet, ARTS, now=now)), now
    assert planner.stats.reused == 1  # the first job's wait, replayed
    waits = {w.job_key: w for w in memory.waiting}
    assert set(waits) == {"a", "b"} and waits["b"].cost_s > waits["a"].cost_s


def test_an_agent_read_for_a_lora_that_now_holds_the_checkpoint_is_weighed_for_it() -> None:
    # The job waits 20 s for `hot`; `lora` was looked at only as a busy holder of its LoRA. When
    # `lora` loads the checkpoint too (5 s to a free slot), waiting there is cheaper.
    hot, cold = busy_holder_and_cold_agent(remaining_s=20.0)
    hot = dataclasses.replace(hot, vram=frozenset({"m0", "l0"}), disk=frozenset({"m0", "l0"}))
    lora = dataclasses.replace(hot, name="lora", running_remaining_s=(5.0,), vram=frozenset({"l0"}),
                               disk=frozenset({"l0"}))
    fleet = [hot, lora, dataclasses.replace(cold, download_bps=20e6)]  # a slow link: cold loads cost minutes
    job = JobView("j", "m0", loras=("l0",), created_at=0.0)
    planner = Planner(promises=None)
    assert planner.plan([job], fleet, ARTS, now=0.0).waiting[0].agent == "hot"
    fleet[1] = dataclasses.replace(lora, vram=frozenset({"m0", "l0"}), disk=frozenset({"m0", "l0"}))
    again = planner.plan([job], fleet, ARTS, now=1.0)
    assert same(again, placement.plan_placement([job], fleet, ARTS, now=1.0))
    assert again.waiting[0].agent == "lora"
