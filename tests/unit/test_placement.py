"""Placement: cost model, filters, queue order with aging, batch passes, and invariants."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings, strategies as st

from stoker.operator.placement import (
    AgentView,
    ArtifactInfo,
    Binding,
    FleetIndex,
    JobView,
    PlacementError,
    PlacementPlan,
    PlacementSettings,
    Tier,
    Unplaceable,
    Waiting,
    effective_priority,
    job_order_key,
    plan_bindings,
    plan_placement,
)

GB = 10**9
ARTIFACTS = {
    "sd15": ArtifactInfo("sd15", 2 * GB),
    "sd15-alt": ArtifactInfo("sd15-alt", 2 * GB),
    "sdxl": ArtifactInfo("sdxl", int(6.5 * GB)),
    "flux": ArtifactInfo("flux", 24 * GB),
    "lora-a": ArtifactInfo("lora-a", 200 * 10**6),
    "vae": ArtifactInfo("vae", 300 * 10**6),
}


def agent(name: str, **kw: object) -> AgentView:
    defaults: dict[str, object] = dict(
        node=f"node-{name}", zone="z1",
        vram_capacity_bytes=24 * GB, vram_free_bytes=24 * GB,
        disk_capacity_bytes=50 * GB, disk_free_bytes=50 * GB,
    )
    defaults.update(kw)
    return AgentView(name=name, **defaults)  # type: ignore[arg-type]


def job(key: str, model: str = "sdxl", **kw: object) -> JobView:
    return JobView(key=key, model=model, **kw)  # type: ignore[arg-type]


def only(plan: tuple[Binding, ...]) -> Binding:
    assert len(plan) == 1, plan
    return plan[0]


class TestCostModel:
    def test_a_job_whose_model_is_hot_on_an_idle_agent_goes_there(self) -> None:
        agents = [agent("a"), agent("b", vram=frozenset({"sdxl"}), disk=frozenset({"sdxl"})), agent("c", disk=frozenset({"sdxl"}))]
        b = only(plan_bindings([job("j")], agents, ARTIFACTS, now=0))
        assert (b.agent, b.cache_tier, b.cost_s) == ("b", Tier.VRAM, 0.0)

    def test_the_tiers_rank_ram_then_disk_then_download(self) -> None:
        agents = [agent("dl"), agent("disk", disk=frozenset({"sdxl"})), agent("ram", ram=frozenset({"sdxl"}), disk=frozenset({"sdxl"}))]
        assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "ram"
        assert only(plan_bindings([job("j")], agents[:2], ARTIFACTS, now=0)).cache_tier is Tier.DISK
        miss = only(plan_bindings([job("j")], agents[:1], ARTIFACTS, now=0))
        assert miss.cache_tier is Tier.MISS
        assert miss.load_s == pytest.approx(6.5 * GB / 200e6 + 6.5 * GB / 2e9)

    def test_measured_bandwidth_beats_the_default(self) -> None:
        agents = [agent("slow", download_bps=50e6), agent("fast", download_bps=1e9)]
        assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "fast"

    def test_every_artifact_of_the_job_counts_not_only_the_checkpoint(self) -> None:
        # Both have the checkpoint hot; only "b" also has the LoRA and VAE loaded.
        agents = [
            agent("a", vram=frozenset({"sdxl"}), disk=frozenset({"sdxl"})),
            agent("b", vram=frozenset({"sdxl", "lora-a", "vae"}), disk=frozenset({"sdxl", "lora-a", "vae"})),
        ]
        b = only(plan_bindings([job("j", loras=("lora-a",), vae="vae")], agents, ARTIFACTS, now=0))
        assert (b.agent, b.cost_s) == ("b", 0.0)

    def test_a_partly_downloaded_model_costs_only_its_remaining_bytes(self) -> None:
        agents = [agent("a"), agent("b", downloading={"sdxl": 6 * GB})]
        assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "b"

    def test_evicting_a_hot_replica_target_costs_more_than_evicting_a_cold_model(self) -> None:
        full = dict(vram_free_bytes=5 * GB, disk=frozenset({"sd15"}))
        agents = [
            agent("a", vram=frozenset({"sd15"}), held_hot=frozenset({"sd15"}), **full),
            agent("b", vram=frozenset({"sd15"}), **full),
        ]
        b = only(plan_bindings([job("j")], agents, ARTIFACTS, now=0))
        assert (b.agent, b.evicts) == ("b", ("sd15",))
        assert b.evict_s > 0

    def test_evicting_a_model_other_pending_jobs_want_costs_more(self) -> None:
        full = dict(vram_free_bytes=5 * GB, slots=2, free_slots=2)
        agents = [
            agent("a", vram=frozenset({"sd15"}), disk=frozenset({"sd15"}), **full),
            agent("b", vram=frozenset({"sd15-alt"}), disk=frozenset({"sd15-alt"}), **full),
        ]
        jobs = [job("j", created_at=0), *(job(f"w{i}", model="sd15-alt", created_at=10) for i in range(3))]
        plan = plan_placement(jobs, agents, ARTIFACTS, now=20)
        assert next(b for b in plan.bindings if b.job_key == "j").agent == "a"

    def test_held_and_in_use_copies_are_never_evicted_from_disk(self) -> None:
        held = agent("a", disk=frozenset({"sd15", "flux"}), held=frozenset({"sd15", "flux"}), disk_free_bytes=1 * GB)
        in_use = agent("b", disk=frozenset({"flux"}), in_use=frozenset({"flux"}), disk_free_bytes=1 * GB, slots=2, free_slots=1)
        plan = plan_placement([job("j")], [held, in_use], ARTIFACTS, now=0)
        assert plan.bindings == ()
        assert [u.job_key for u in plan.unplaceable] == ["j"]


class TestFilters:
    def test_never_binds_to_a_not_ready_or_cordoned_agent(self) -> None:
        hot = dict(vram=frozenset({"sdxl"}), disk=frozenset({"sdxl"}))
        agents = [agent("lost", ready=False, **hot), agent("cordoned", cordoned=True, **hot), agent("cold")]
        assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "cold"

    def test_an_agent_that_failed_the_job_is_not_chosen_again(self) -> None:
        agents = [agent("bad", vram=frozenset({"sdxl"})), agent("good")]
        assert only(plan_bindings([job("j", failed_agents=frozenset({"bad"}))], agents, ARTIFACTS, now=0)).agent == "good"

    def test_a_job_too_large_for_every_agent_is_unplaceable_with_a_reason(self) -> None:
        plan = plan_placement([job("j", model="flux", loras=("lora-a",))], [agent("a"), agent("b")], ARTIFACTS, now=0)
        assert plan.bindings == ()
        assert plan.unplaceable[0].job_key == "j"
        assert "24.2 GB" in plan.unplaceable[0].reason

    def test_an_unknown_artifact_size_falls_back_to_the_settings_default(self) -> None:
        small = agent("small", vram_capacity_bytes=3 * GB, vram_free_bytes=3 * GB)
        plan = plan_placement([job("j", model="mystery")], [small], ARTIFACTS, now=0, settings=PlacementSettings(unknown_size_bytes=4 * GB))
        assert plan.bindings == () and plan.unplaceable

    def test_never_more_jobs_than_free_slots(self) -> None:
        agents = [agent("a", slots=3, free_slots=2, running_remaining_s=(5.0,)), agent("b", slots=1, free_slots=0)]
        plan = plan_placement([job(f"j{i}", created_at=i) for i in range(10)], agents, ARTIFACTS, now=20)
        assert [b.agent for b in plan.bindings] == ["a", "a"]


class TestWaitingForAHotAgent:
    def test_a_job_waits_for_a_busy_hot_agent_when_that_is_cheaper_than_loading_elsewhere(self) -> None:
        agents = [agent("hot", free_slots=0, vram=frozenset({"sdxl"}), running_remaining_s=(2.0,)), agent("cold")]
        plan = plan_placement([job("j", created_at=0)], agents, ARTIFACTS, now=1)
        assert plan.bindings == ()
        assert plan.waiting == (Waiting("j", "hot", 2.0, 2.0, plan.waiting[0].reason),)

    def test_a_job_loads_elsewhere_when_the_hot_agent_is_busy_for_longer(self) -> None:
        agents = [agent("hot", free_slots=0, vram=frozenset({"sdxl"}), running_remaining_s=(600.0,)), agent("cold")]
        assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "cold"

    def test_queued_waiters_make_the_hot_agent_less_attractive_to_later_jobs(self) -> None:
        agents = [agent("hot", free_slots=0, vram=frozenset({"sdxl"}), running_remaining_s=(2.0,)), agent("cold", slots=4, free_slots=4)]
        jobs = [job(f"j{i}", created_at=i, expected_run_s=40.0) for i in range(3)]
        plan = plan_placement(jobs, agents, ARTIFACTS, now=5, settings=PlacementSettings(download_weight=1.0))
        assert [w.job_key for w in plan.waiting] == ["j0"]
        assert [b.agent for b in plan.bindings] == ["cold", "cold"]

    def test_a_heavier_download_weight_queues_behind_the_holder_instead_of_fetching(self) -> None:
        # sdxl: ~33 s to download at the default bandwidth; the holder frees in 50 s.
        agents = [agent("hot", free_slots=0, vram=frozenset({"sdxl"}), running_remaining_s=(50.0,)), agent("cold")]
        by_time = plan_placement([job("j")], agents, ARTIFACTS, now=0, settings=PlacementSettings(download_weight=1.0))
        assert [b.agent for b in by_time.bindings] == ["cold"]
        by_bytes = plan_placement([job("j")], agents, ARTIFACTS, now=0, settings=PlacementSettings(download_weight=3.0))
        assert by_bytes.bindings == () and [w.agent for w in by_bytes.waiting] == ["hot"]

    def test_a_download_weight_below_one_is_refused(self) -> None:
        with pytest.raises(PlacementError, match="download_weight must be >= 1"):
            PlacementSettings(download_weight=0.5)

    def test_a_job_pending_too_long_no_longer_waits(self) -> None:
        agents = [agent("hot", free_slots=0, vram=frozenset({"sdxl"}), running_remaining_s=(2.0,)), agent("cold")]
        s = PlacementSettings(max_hot_wait_age_s=60)
        assert only(plan_bindings([job("j", created_at=0)], agents, ARTIFACTS, now=61, settings=s)).agent == "cold"


class TestQueueOrder:
    def test_higher_priority_goes_first(self) -> None:
        jobs = [job("low", priority=0, created_at=0), job("high", priority=5, created_at=1)]
        assert only(plan_bindings(jobs, [agent("a")], ARTIFACTS, now=2)).job_key == "high"

    def test_waiting_raises_effective_priority(self) -> None:
        s = PlacementSettings(aging_per_s=0.1)
        old, new = job("old", priority=0, created_at=0), job("new", priority=5, created_at=100)
        assert effective_priority(old, now=100, settings=s) == pytest.approx(10)
        assert only(plan_bindings([new, old], [agent("a")], ARTIFACTS, now=100, settings=s)).job_key == "old"

    @given(st.lists(st.tuples(st.integers(-5, 5), st.floats(0, 1000)), min_size=2, max_size=20), st.floats(1000, 10**6))
    def test_the_order_key_sorts_like_effective_priority_at_any_time(self, specs: list[tuple[int, float]], now: float) -> None:
        s = PlacementSettings()
        jobs = [job(f"j{i}", priority=p, created_at=c) for i, (p, c) in enumerate(specs)]
        by_key = sorted(jobs, key=lambda j: job_order_key(j, settings=s))
        prios = [effective_priority(j, now=now, settings=s) for j in by_key]
        assert all(a >= b - 1e-6 for a, b in zip(prios, prios[1:]))

    def test_a_cold_job_is_bound_within_a_bounded_number_of_passes_under_a_stream_of_hot_jobs(self) -> None:
        # One agent with "sd15" hot frees a slot every 10 s; every pass a new priority-5 job
        # for the hot model arrives. The priority-0 cold job overtakes once it has aged
        # 5 / aging_per_s = 300 s, i.e. within ~31 passes.
        s = PlacementSettings()
        bound_at = None
        pending = [job("cold", model="sdxl", priority=0, created_at=0)]
        for n in range(200):
            now = 10.0 * n
            pending.append(job(f"hot{n}", model="sd15", priority=5, created_at=now))
            fleet = [agent("a", vram=frozenset({"sd15"}), disk=frozenset({"sd15"}))]
            b = only(plan_bindings(pending, fleet, ARTIFACTS, now=now, settings=s))
            pending = [j for j in pending if j.key != b.job_key]
            if b.job_key == "cold":
                bound_at = n
                break
        assert bound_at is not None and bound_at <= 5 / s.aging_per_s / 10 + 2


class TestBatchPass:
    def test_later_jobs_see_models_loaded_by_earlier_bindings(self) -> None:
        agents = [agent("a", slots=2, free_slots=2), agent("b")]
        plan = plan_placement([job("j1", created_at=0), job("j2", created_at=1)], agents, ARTIFACTS, now=2)
        first, second = plan.bindings
        assert first.cache_tier is Tier.MISS
        assert (second.agent, second.cache_tier) == (first.agent, Tier.VRAM)

    def test_a_pass_stops_when_no_free_slot_is_left(self) -> None:
        plan = plan_placement([job(f"j{i}", created_at=i) for i in range(100)], [agent("a")], ARTIFACTS, now=200)
        assert len(plan.bindings) == 1 and plan.jobs_examined == 1

    def test_a_presorted_queue_is_read_lazily(self) -> None:
        s = PlacementSettings()
        jobs = sorted((job(f"j{i}", created_at=i) for i in range(10)), key=lambda j: job_order_key(j, settings=s))
        consumed = []

        def stream():  # type: ignore[no-untyped-def]
            for j in jobs:
                consumed.append(j.key)
                yield j

        plan = plan_placement(stream(), [agent("a")], ARTIFACTS, now=20, jobs_sorted=True)
        assert [b.job_key for b in plan.bindings] == ["j0"] and consumed == ["j0"]

    def test_duplicate_jobs_or_agents_are_refused(self) -> None:
        with pytest.raises(PlacementError, match="appears twice"):
            plan_placement([job("j"), job("j")], [agent("a", slots=2, free_slots=2)], ARTIFACTS, now=0)
        with pytest.raises(PlacementError, match="appears twice"):
            plan_placement([job("j")], [agent("a"), agent("a")], ARTIFACTS, now=0)


# --- properties over random fleets -------------------------------------------------

MODELS = ["sd15", "sdxl", "flux", "lora-a", "vae"]
keysets = st.frozensets(st.sampled_from(MODELS), max_size=3)


@st.composite
def fleets(draw: st.DrawFn) -> list[AgentView]:
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        slots = draw(st.integers(1, 3))
        free = draw(st.integers(0, slots))
        vram_cap = draw(st.sampled_from([8, 24, 80])) * GB
        disk = draw(keysets)
        out.append(
            AgentView(
                name=f"a{i}", node=f"n{i % 3}", zone=f"z{i % 2}",
                ready=draw(st.booleans()), cordoned=draw(st.booleans()),
                slots=slots, free_slots=free,
                running_remaining_s=tuple(draw(st.floats(0, 100)) for _ in range(slots - free)),
                vram_capacity_bytes=vram_cap, vram_free_bytes=draw(st.integers(0, vram_cap)),
                disk_capacity_bytes=50 * GB, disk_free_bytes=draw(st.integers(0, 50 * GB)),
                vram=draw(keysets), ram=draw(keysets), disk=disk,
                held=draw(st.frozensets(st.sampled_from(sorted(disk)))) if disk else frozenset(),
                held_hot=draw(keysets), in_use=draw(keysets),
            )
        )
    return out


@st.composite
def queues(draw: st.DrawFn) -> list[JobView]:
    n = draw(st.integers(0, 15))
    return [
        JobView(
            key=f"j{i}", model=draw(st.sampled_from(["sd15", "sdxl", "flux"])),
            loras=tuple(draw(st.lists(st.just("lora-a"), max_size=1))),
            vae=draw(st.sampled_from([None, "vae"])),
            priority=draw(st.integers(0, 3)), created_at=draw(st.floats(0, 500)),
            failed_agents=draw(st.frozensets(st.sampled_from([f"a{k}" for k in range(8)]), max_size=3)),
        )
        for i in range(n)
    ]


def check_plan(plan: PlacementPlan, jobs: list[JobView], agents: list[AgentView]) -> None:
    by_name = {a.name: a for a in agents}
    by_job = {j.key: j for j in jobs}
    decided = [b.job_key for b in plan.bindings] + [w.job_key for w in plan.waiting] + [u.job_key for u in plan.unplaceable]
    assert len(decided) == len(set(decided)) == plan.jobs_examined  # each job decided at most once
    per_agent: dict[str, int] = {}
    for b in plan.bindings:
        a = by_name[b.agent]
        assert a.ready and not a.cordoned
        assert b.agent not in by_job[b.job_key].failed_agents
        assert b.cost_s >= 0
        per_agent[b.agent] = per_agent.get(b.agent, 0) + 1
    for name, n in per_agent.items():
        assert n <= by_name[name].free_slots
    for w in plan.waiting:
        a = by_name[w.agent]
        assert a.ready and not a.cordoned and w.wait_s > 0
        assert w.agent not in by_job[w.job_key].failed_agents


@settings(max_examples=80, deadline=None)
@given(fleets(), queues(), st.floats(500, 2000))
def test_plans_respect_readiness_slots_failures_and_bind_each_job_at_most_once(agents: list[AgentView], jobs: list[JobView], now: float) -> None:
    check_plan(plan_placement(jobs, agents, ARTIFACTS, now=now), jobs, agents)


@settings(max_examples=40, deadline=None)
@given(fleets(), queues(), st.randoms(use_true_random=False))
def test_plans_do_not_depend_on_the_order_of_inputs(agents: list[AgentView], jobs: list[JobView], rnd) -> None:  # type: ignore[no-untyped-def]
    base = plan_placement(jobs, agents, ARTIFACTS, now=1000)
    shuffled_jobs, shuffled_agents = list(jobs), list(agents)
    rnd.shuffle(shuffled_jobs)
    rnd.shuffle(shuffled_agents)
    assert plan_placement(shuffled_jobs, shuffled_agents, ARTIFACTS, now=1000) == base


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(fleets(), queues()), min_size=1, max_size=4))
def test_a_kept_fleet_index_gives_the_same_plans_as_none(passes: list[tuple[list[AgentView], list[JobView]]]) -> None:
    index = FleetIndex()
    for agents, jobs in passes:
        # Keep some views identical between passes, as a simulator would.
        assert plan_placement(jobs, agents, ARTIFACTS, now=1000, index=index) == plan_placement(jobs, agents, ARTIFACTS, now=1000)


def test_a_fleet_index_follows_replaced_views() -> None:
    index = FleetIndex()
    agents = [agent("a"), agent("b")]
    assert only(plan_bindings([job("j")], agents, ARTIFACTS, now=0)).agent == "a"
    plan_placement([job("j")], agents, ARTIFACTS, now=0, index=index)
    agents[1] = dataclasses.replace(agents[1], vram=frozenset({"sdxl"}))
    assert plan_placement([job("j")], agents, ARTIFACTS, now=0, index=index).bindings[0].agent == "b"
    agents[1] = dataclasses.replace(agents[1], ready=False)
    assert plan_placement([job("j")], agents, ARTIFACTS, now=0, index=index).bindings[0].agent == "a"


def test_unplaceable_and_waiting_are_reported_as_such() -> None:
    plan = plan_placement([job("j", failed_agents=frozenset({"a"}))], [agent("a")], ARTIFACTS, now=0)
    assert isinstance(plan.unplaceable[0], Unplaceable) and plan.bindings == () and plan.waiting == ()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_invariants_hold_on_larger_fleets_where_candidate_caps_and_the_pass_index_kick_in(seed: int) -> None:
    rnd = random.Random(seed)
    keys = [f"m{i}" for i in range(30)]
    agents = [
        agent(
            f"a{i:02d}", ready=rnd.random() > 0.1, cordoned=rnd.random() < 0.1, slots=2, free_slots=rnd.randint(0, 2),
            running_remaining_s=(rnd.uniform(0, 30),), vram=frozenset(rnd.sample(keys, 2)), disk=frozenset(rnd.sample(keys, 8)),
            vram_free_bytes=rnd.randint(0, 24) * GB, disk_free_bytes=rnd.randint(0, 50) * GB,
        )
        for i in range(40)
    ]
    jobs = [
        job(f"j{i}", model=rnd.choice(keys[:20]), created_at=rnd.uniform(0, 100), priority=rnd.randint(0, 2),
            failed_agents=frozenset(rnd.sample([a.name for a in agents], 3)))
        for i in range(60)
    ]
    s = PlacementSettings(holder_candidates=2, cold_candidates=1)
    plan = plan_placement(jobs, agents, ARTIFACTS, now=200, settings=s)
    check_plan(plan, jobs, agents)
    assert plan == plan_placement(list(reversed(jobs)), agents, ARTIFACTS, now=200, settings=s)
