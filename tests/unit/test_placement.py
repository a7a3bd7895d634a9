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
    head_start_s,
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


class TestQueueSlots:
    def test_a_job_is_bound_into_a_queue_slot_of_a_busy_holder_with_the_wait_in_its_cost(self) -> None:
        hot = agent("hot", slots=1, queue_slots=1, free_slots=1, running_remaining_s=(4.0,), vram=frozenset({"sdxl"}))
        plan = plan_placement([job("j")], [hot, agent("cold")], ARTIFACTS, now=0)
        b = only(plan.bindings)
        assert (b.agent, b.cache_tier, b.wait_s, b.cost_s) == ("hot", Tier.VRAM, 4.0, 4.0)
        assert plan.waiting == ()

    def test_a_download_into_a_queue_slot_overlaps_the_running_job(self) -> None:
        s = PlacementSettings(download_weight=1.0)
        busy = agent("busy", slots=1, queue_slots=1, free_slots=1, running_remaining_s=(50.0,))
        b = only(plan_bindings([job("j")], [busy], ARTIFACTS, now=0, settings=s))
        # 32.5 s of download hide behind the 50 s wait; then 3.25 s from disk to GPU
        assert b.cost_s == pytest.approx(50.0 + 6.5 * GB / 2e9)
        assert b.wait_s == 50.0

    def test_an_idle_agent_that_must_load_from_disk_beats_a_long_queue_on_a_hot_one(self) -> None:
        hot = agent("hot", slots=1, queue_slots=2, free_slots=1, running_remaining_s=(10.0, 20.0), vram=frozenset({"sdxl"}))
        idle = agent("idle", disk=frozenset({"sdxl"}))
        b = only(plan_bindings([job("j")], [hot, idle], ARTIFACTS, now=0))
        assert (b.agent, b.cache_tier) == ("idle", Tier.DISK)

    def test_the_wait_for_a_generation_slot_counts_every_job_bound_ahead(self) -> None:
        # one GPU, two jobs bound (finishing at 10 s and 20 s): a third starts at 20 s
        hot = agent("hot", slots=1, queue_slots=2, free_slots=1, running_remaining_s=(10.0, 20.0), vram=frozenset({"sdxl"}))
        assert only(plan_bindings([job("j")], [hot], ARTIFACTS, now=0)).wait_s == 20.0
        # two GPUs: the first to free takes it
        two = dataclasses.replace(hot, slots=2, queue_slots=1)
        assert only(plan_bindings([job("j")], [two], ARTIFACTS, now=0)).wait_s == 10.0

    def test_later_jobs_in_a_pass_queue_behind_earlier_ones_in_the_queue_slots(self) -> None:
        hot = agent("hot", slots=1, queue_slots=2, free_slots=3, vram=frozenset({"sdxl"}))
        plan = plan_placement([job(f"j{i}", created_at=i, expected_run_s=10.0) for i in range(3)], [hot], ARTIFACTS, now=5)
        assert [b.wait_s for b in plan.bindings] == [0.0, 10.0, 20.0]


def stream_until_bound(target: JobView, priorities: list[int], settings: PlacementSettings) -> int | None:
    """One agent with two generation slots and "sd15" hot; every 10 s a job for "sd15" with
    the next priority arrives; bound jobs run 15 s, pinning their models meanwhile. Returns
    the pass at which `target` is bound (None: never)."""
    running: list[tuple[float, JobView]] = []
    vram: dict[str, None] = {"sd15": None}
    pending = [target]
    for n, priority in enumerate(priorities):
        now = target.created_at + 10.0 * n
        running = [(f, j) for f, j in running if f > now]
        pending.append(job(f"hot{n}", model="sd15", priority=priority, created_at=now))
        used = sum(ARTIFACTS[k].size_bytes for k in vram)
        view = agent(
            "a", slots=2, free_slots=2 - len(running), running_remaining_s=tuple(f - now for f, _ in running),
            vram=frozenset(vram), vram_free_bytes=24 * GB - used, disk=frozenset({"sd15", "sdxl", "flux"}),
            in_use=frozenset(k for _, j in running for k in j.artifact_keys),
        )
        plan = plan_placement(pending, [view], ARTIFACTS, now=now, settings=settings)
        check_plan(plan, pending, [view], settings)
        for b in plan.bindings:
            bound = next(j for j in pending if j.key == b.job_key)
            pending.remove(bound)
            if bound is target:
                return n
            for victim in b.evicts:
                vram.pop(victim, None)
            vram.update(dict.fromkeys(bound.artifact_keys))
            running.append((now + 15.0, bound))
    return None


class TestStarvation:
    def test_a_long_pending_job_kept_off_by_pinned_models_reserves_the_agent_and_runs(self) -> None:
        # "flux" fills the GPU: it needs "sd15" out of VRAM, which a running job always pins.
        s = PlacementSettings()
        n = stream_until_bound(job("big", model="flux", created_at=0), [0] * 60, s)
        assert n is not None and n <= s.max_hot_wait_age_s / 10 + 3

    def test_the_reserved_agent_takes_no_other_job_in_that_pass(self) -> None:
        busy = agent("a", slots=2, free_slots=1, running_remaining_s=(5.0,), vram=frozenset({"sd15"}), vram_free_bytes=22 * GB,
                     disk=frozenset({"sd15", "flux"}), in_use=frozenset({"sd15"}))
        plan = plan_placement([job("big", model="flux", created_at=0), job("hot", model="sd15", created_at=990)], [busy],
                              ARTIFACTS, now=1000)
        assert plan.bindings == ()
        (w,) = plan.waiting
        assert (w.job_key, w.agent, w.reserved, w.wait_s) == ("big", "a", True, 5.0)

    def test_a_young_job_kept_off_by_pins_reserves_nothing(self) -> None:
        busy = agent("a", slots=2, free_slots=1, running_remaining_s=(5.0,), vram=frozenset({"sd15"}), vram_free_bytes=22 * GB,
                     disk=frozenset({"sd15", "flux"}), in_use=frozenset({"sd15"}))
        plan = plan_placement([job("big", model="flux", created_at=990), job("hot", model="sd15", created_at=995)], [busy],
                              ARTIFACTS, now=1000)
        assert [b.job_key for b in plan.bindings] == ["hot"]
        assert [u.job_key for u in plan.unplaceable] == ["big"]

    @settings(max_examples=15, deadline=None)
    @given(
        st.integers(-1000, 1000),
        st.lists(st.integers(-1000, 1000), min_size=66, max_size=66),
        st.sampled_from(["sdxl", "flux"]),
    )
    def test_any_job_is_bound_within_the_aging_bound_whatever_the_priorities(
        self, priority: int, stream: list[int], model: str
    ) -> None:
        # A bounded head start: jobs created more than 2 * max_head_start_s later never go first.
        s = PlacementSettings(max_head_start_s=300.0, max_hot_wait_age_s=120.0)
        n = stream_until_bound(job("target", model=model, priority=priority, created_at=0), stream, s)
        assert n is not None and n <= 2 * s.max_head_start_s / 10 + 4

    def test_the_default_aging_bound_is_below_the_default_job_timeout(self) -> None:
        s = PlacementSettings()
        span = head_start_s(1000, settings=s) - head_start_s(-1000, settings=s)
        assert span < 2 * s.max_head_start_s <= 3600
        n = stream_until_bound(job("target", model="flux", priority=-1000, created_at=0), [1000] * 200, s)
        assert n is not None and 10.0 * n <= span + s.max_hot_wait_age_s

    def test_small_priorities_still_give_about_a_minute_per_step(self) -> None:
        s = PlacementSettings()
        assert head_start_s(1, settings=s) == pytest.approx(60.0, rel=0.1)
        assert head_start_s(5, settings=s) == pytest.approx(300.0, rel=0.3)
        assert head_start_s(10, settings=s) < head_start_s(100, settings=s) < head_start_s(1000, settings=s) < s.max_head_start_s


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
        # head_start_s(5) (about 5 / aging_per_s = 300 s), i.e. within ~31 passes.
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


AT_TRANSFER_TIME = PlacementSettings(peer_weight=1.0)
"""A fetch from a peer priced at its time alone: the mechanics below, apart from the default weight."""


class TestPeerTier:
    """Agents in the peer tier fetch from a holder at their peer bandwidth; only source bytes are weighted."""

    def peers(self, **kw: object) -> list[AgentView]:
        busy_holder = agent("holder", serves_peers=True, disk=frozenset({"sdxl"}), vram=frozenset({"sdxl"}),
                            free_slots=0, running_remaining_s=(120.0,))
        return [busy_holder, agent("free", serves_peers=True, **kw)]

    def test_a_free_agent_fetches_from_a_busy_holder_at_lan_speed_without_the_source_weight(self) -> None:
        b = only(plan_bindings([job("j")], self.peers(peer_bps=1e9), ARTIFACTS, now=0,
                               settings=PlacementSettings(peer_weight=1.0)))
        assert (b.agent, b.cache_tier) == ("free", Tier.MISS)
        assert b.load_s == pytest.approx(6.5 * GB / 1e9 + 6.5 * GB / 2e9)
        assert b.cost_s == pytest.approx(b.load_s)  # no download weight on bytes from a peer
        assert b.reason.startswith("checkpoint from a peer")

    def test_the_source_weight_does_not_apply_to_a_peer_fetch_but_the_peer_weight_does(self) -> None:
        heavy = PlacementSettings(download_weight=50, peer_weight=1.0)
        assert only(plan_bindings([job("j")], self.peers(peer_bps=1e9), ARTIFACTS, now=0, settings=heavy)).cost_s == \
            pytest.approx(6.5 * GB / 1e9 + 6.5 * GB / 2e9)
        weighted = PlacementSettings(peer_weight=3)
        b = only(plan_bindings([job("j")], self.peers(peer_bps=1e9), ARTIFACTS, now=0, settings=weighted))
        assert b.cost_s == pytest.approx(3 * 6.5 * GB / 1e9 + 6.5 * GB / 2e9)

    def test_an_agent_outside_the_peer_tier_pays_the_source_and_waits_for_the_holder_instead(self) -> None:
        agents = self.peers()
        agents[1] = dataclasses.replace(agents[1], serves_peers=False)
        plan = plan_placement([job("j")], agents, ARTIFACTS, now=0)
        assert plan.bindings == () and plan.waiting[0].agent == "holder"  # 120 s beats 10 x 32 s of source download
        # a holder outside the peer tier serves nobody: the same choice
        agents = self.peers()
        agents[0] = dataclasses.replace(agents[0], serves_peers=False)
        assert plan_placement([job("j")], agents, ARTIFACTS, now=0, settings=AT_TRANSFER_TIME).waiting[0].agent == "holder"

    def test_a_copy_being_fetched_is_served_once_complete(self) -> None:
        # "fetching" has 1.5 of 6.5 GB at 500 MB/s: 10 s to go, then 6.5 s from it at 1 GB/s.
        agents = [agent("fetching", serves_peers=True, downloading={"sdxl": int(1.5 * GB)}, download_bps=500e6,
                        free_slots=0, running_remaining_s=(600.0,)),
                  agent("free", serves_peers=True, peer_bps=1e9)]
        b = only(plan_bindings([job("j")], agents, ARTIFACTS, now=0, settings=AT_TRANSFER_TIME))
        assert b.agent == "free"
        assert b.load_s == pytest.approx(10.0 + 6.5 + 3.25)

    def test_a_second_job_in_the_same_pass_fans_out_from_the_copy_the_first_one_fetches(self) -> None:
        agents = [agent("a", serves_peers=True, peer_bps=1e9), agent("b", serves_peers=True, peer_bps=1e9)]
        first, second = plan_bindings([job("j1", created_at=0), job("j2", created_at=1)], agents, ARTIFACTS, now=10,
                                      settings=AT_TRANSFER_TIME)
        assert {first.agent, second.agent} == {"a", "b"}
        source_s = 6.5 * GB / 200e6
        assert first.load_s == pytest.approx(source_s + 6.5 * GB / 2e9)
        # waits for the first copy, then fetches it from that agent: never from the source
        assert second.load_s == pytest.approx(source_s + 6.5 * GB / 1e9 + 6.5 * GB / 2e9)
        assert second.reason.startswith("checkpoint from a peer")

    def test_a_high_last_copy_weight_makes_room_where_the_victim_is_a_duplicate(self) -> None:
        # "dup" must evict sd15, which "holder" also has; "last" must evict sd15-alt, held nowhere else.
        # "last" downloads a little faster, which wins as long as losing a last copy costs no more than a duplicate.
        full = dict(serves_peers=True, disk_capacity_bytes=7 * GB, disk_free_bytes=5 * GB)
        agents = [agent("last", disk=frozenset({"sd15-alt"}), download_bps=220e6, **full),
                  agent("dup", disk=frozenset({"sd15"}), download_bps=200e6, **full),
                  agent("holder", serves_peers=True, disk=frozenset({"sd15"}), free_slots=0, running_remaining_s=(9.0,))]
        assert only(plan_bindings([job("j", "sdxl")], agents, ARTIFACTS, now=0, settings=AT_TRANSFER_TIME)).agent == "last"
        weighted = PlacementSettings(evict_last_copy_weight=50)
        b = only(plan_bindings([job("j", "sdxl")], agents, ARTIFACTS, now=0, settings=weighted))
        assert (b.agent, b.evicts) == ("dup", ("sd15",))

    def test_without_peers_in_the_fleet_peer_settings_change_nothing(self) -> None:
        agents = [agent("a", disk=frozenset({"sdxl"}), free_slots=0, running_remaining_s=(30.0,)), agent("b")]
        base = plan_placement([job("j"), job("k", "sd15")], agents, ARTIFACTS, now=0)
        other = PlacementSettings(peer_weight=7, default_peer_bps=3e9, evict_last_copy_weight=9)
        assert plan_placement([job("j"), job("k", "sd15")], agents, ARTIFACTS, now=0, settings=other) == base


# --- properties over random fleets -------------------------------------------------

MODELS = ["sd15", "sdxl", "flux", "lora-a", "vae"]
keysets = st.frozensets(st.sampled_from(MODELS), max_size=3)


@st.composite
def fleets(draw: st.DrawFn) -> list[AgentView]:
    n = draw(st.integers(1, 8))
    out = []
    for i in range(n):
        slots = draw(st.integers(1, 3))
        queue = draw(st.integers(0, 2))
        free = draw(st.integers(0, slots + queue))
        vram_cap = draw(st.sampled_from([8, 24, 80])) * GB
        disk = draw(keysets)
        out.append(
            AgentView(
                name=f"a{i}", node=f"n{i % 3}", zone=f"z{i % 2}",
                ready=draw(st.booleans()), cordoned=draw(st.booleans()),
                slots=slots, queue_slots=queue, free_slots=free,
                running_remaining_s=tuple(draw(st.floats(0, 100)) for _ in range(slots + queue - free)),
                vram_capacity_bytes=vram_cap, vram_free_bytes=draw(st.integers(0, vram_cap)),
                disk_capacity_bytes=50 * GB, disk_free_bytes=draw(st.integers(0, 50 * GB)),
                vram=draw(keysets), ram=draw(keysets), disk=disk,
                disk_rank_s={k: draw(st.floats(0, 1000)) for k in sorted(disk) if draw(st.booleans())},
                held=draw(st.frozensets(st.sampled_from(sorted(disk)))) if disk else frozenset(),
                held_hot=draw(keysets), in_use=draw(keysets),
                serves_peers=draw(st.booleans()), peer_bps=draw(st.sampled_from([None, 2e8, 1e9])),
                downloading={k: draw(st.integers(0, GB)) for k in draw(keysets) if k not in disk},
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


def check_plan(plan: PlacementPlan, jobs: list[JobView], agents: list[AgentView],
               settings: PlacementSettings = PlacementSettings()) -> None:
    by_name = {a.name: a for a in agents}
    by_job = {j.key: j for j in jobs}
    decided = [b.job_key for b in plan.bindings] + [w.job_key for w in plan.waiting] + [u.job_key for u in plan.unplaceable]
    assert len(decided) == len(set(decided)) == plan.jobs_examined  # each job decided at most once
    per_agent: dict[str, int] = {}
    eligible = {a.name for a in agents if a.ready and not a.cordoned}

    def excluded(job: JobView, name: str) -> bool:
        # An agent that failed the job is skipped until every eligible agent has failed it.
        return name in job.failed_agents and not eligible <= job.failed_agents

    for b in plan.bindings:
        a = by_name[b.agent]
        assert a.ready and not a.cordoned
        assert not excluded(by_job[b.job_key], b.agent)
        assert b.cost_s >= 0
        per_agent[b.agent] = per_agent.get(b.agent, 0) + 1
    for name, n in per_agent.items():
        assert n <= by_name[name].free_slots
    for w in plan.waiting:
        a = by_name[w.agent]
        assert a.ready and not a.cordoned and w.wait_s > 0
        assert not excluded(by_job[w.job_key], w.agent)
        if w.reserved:
            # jobs are examined in queue order: none after the reserving one may take the agent
            after = job_order_key(by_job[w.job_key], settings=settings)
            assert not [b for b in plan.bindings if b.agent == w.agent and job_order_key(by_job[b.job_key], settings=settings) > after], \
                "a reserved agent took a later job in the same pass"
        else:
            assert a.free_slots == 0 or any(b.agent == w.agent for b in plan.bindings) or any(
                x.reserved and x.agent == w.agent for x in plan.waiting
            ), "a job waits for an agent that still had a free slot"


@settings(max_examples=80, deadline=None)
@given(fleets(), queues(), st.floats(500, 2000))
def test_plans_respect_readiness_slots_failures_and_bind_each_job_at_most_once(agents: list[AgentView], jobs: list[JobView], now: float) -> None:
    check_plan(plan_placement(jobs, agents, ARTIFACTS, now=now), jobs, agents)


@settings(max_examples=80, deadline=None)
@given(fleets(), queues(), st.sampled_from(["sd15", "sdxl"]), st.booleans(), st.booleans())
def test_a_job_whose_model_is_hot_on_an_idle_agent_goes_to_an_agent_where_it_starts_at_once(
    agents: list[AgentView], others: list[JobView], model: str, lora: bool, queue: bool
) -> None:
    target = JobView(key="target", model=model, loras=("lora-a",) if lora else (), priority=5, created_at=0.0)
    hot = frozenset(target.artifact_keys)
    idle = agent("idle", slots=1, queue_slots=2 if queue else 0, free_slots=3 if queue else 1, vram=hot,
                 vram_free_bytes=0, disk=hot, disk_free_bytes=0)
    fleet = [*agents, idle]
    others = [dataclasses.replace(j, created_at=j.created_at + 1.0, priority=min(j.priority, 3)) for j in others]
    plan = plan_placement([target, *others], fleet, ARTIFACTS, now=600.0)
    check_plan(plan, [target, *others], fleet)
    b = next(b for b in plan.bindings if b.job_key == "target")
    chosen = next(a for a in fleet if a.name == b.agent)
    assert (b.cost_s, b.wait_s, b.cache_tier) == (0.0, 0.0, Tier.VRAM)
    assert hot <= chosen.vram


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
    agents = [agent("a"), agent("b", vram_capacity_bytes=GB)]  # b is too small for sdxl
    plan = plan_placement([job("j", failed_agents=frozenset({"a"}))], agents, ARTIFACTS, now=0)
    assert isinstance(plan.unplaceable[0], Unplaceable) and plan.bindings == () and plan.waiting == ()


class TestFaultsAndFeasibility:
    def test_once_every_agent_failed_a_job_it_may_go_back_to_one_of_them(self) -> None:
        agents = [agent("a"), agent("b"), agent("c", ready=False)]
        failed = job("j", failed_agents=frozenset({"a", "b"}), attempt=3)
        assert only(plan_bindings([failed], agents, ARTIFACTS, now=0)).agent in {"a", "b"}

    def test_an_agent_that_failed_a_job_is_skipped_while_another_has_not_tried(self) -> None:
        agents = [agent("a", vram=frozenset({"sdxl"}), disk=frozenset({"sdxl"})), agent("b", free_slots=0), agent("c")]
        plan = plan_placement([job("j", failed_agents=frozenset({"a"}))], agents, ARTIFACTS, now=0)
        assert [b.agent for b in plan.bindings] == ["c"]

    def test_downloads_promised_to_bound_jobs_and_held_copies_are_not_offered_to_another_job(self) -> None:
        # a's disk looks empty, but its bound job will download sdxl (in use) and it holds flux still to come.
        busy = agent("a", disk_capacity_bytes=30 * GB, disk_free_bytes=30 * GB, in_use=frozenset({"sdxl"}),
                     held=frozenset({"flux"}), slots=2, free_slots=1)
        other = agent("b", disk_capacity_bytes=30 * GB, disk_free_bytes=30 * GB, download_bps=50e6)
        b = only(plan_bindings([job("j", model="sd15")], [busy, other], ARTIFACTS, now=0))
        assert b.agent == "b", "6.5 GB for the bound job and 24 GB for the hold leave a no room"

    def test_a_job_never_goes_where_pins_leave_no_room_even_on_the_only_free_agent(self) -> None:
        pinned = agent("a", disk_capacity_bytes=8 * GB, disk_free_bytes=1 * GB, disk=frozenset({"sd15", "sd15-alt"}),
                       in_use=frozenset({"sd15"}), held=frozenset({"sd15-alt"}), slots=2, free_slots=1)
        plan = plan_placement([job("j", model="sdxl")], [pinned], ARTIFACTS, now=0)
        assert plan.bindings == () and len(plan.unplaceable) == 1

    def test_a_model_larger_than_every_disk_budget_is_unplaceable_with_that_reason(self) -> None:
        agents = [agent("a", disk_capacity_bytes=10 * GB, disk_free_bytes=10 * GB),
                  agent("b", disk_capacity_bytes=20 * GB, disk_free_bytes=20 * GB)]
        plan = plan_placement([job("j", model="flux")], agents, ARTIFACTS, now=0)
        (u,) = plan.unplaceable
        assert "flux" in u.reason and "larger than every Ready agent's disk budget" in u.reason

    def test_an_agent_whose_disk_is_failing_takes_only_jobs_for_what_it_already_holds(self) -> None:
        broken = agent("a", can_download=False, disk=frozenset({"sd15"}), download_bps=1e9)
        healthy = agent("b", download_bps=1e6)
        assert only(plan_bindings([job("j", model="sdxl")], [broken, healthy], ARTIFACTS, now=0)).agent == "b"
        assert only(plan_bindings([job("k", model="sd15")], [broken, healthy], ARTIFACTS, now=0)).agent == "a"


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


@settings(max_examples=40, deadline=None)
@given(fleets(), queues(), st.floats(500, 2000))
def test_with_nobody_in_the_peer_tier_the_peer_knobs_change_no_plan(agents: list[AgentView], jobs: list[JobView],
                                                                    now: float) -> None:
    agents = [dataclasses.replace(a, serves_peers=False) for a in agents]
    other = PlacementSettings(peer_weight=5, default_peer_bps=5e9, evict_last_copy_weight=4)
    assert plan_placement(jobs, agents, ARTIFACTS, now=now) == plan_placement(jobs, agents, ARTIFACTS, now=now,
                                                                               settings=other)



def test_the_operator_refuses_placement_weights_below_one_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from stoker.operator.main import main

    for flag in ("--download-weight", "--peer-weight"):
        with pytest.raises(SystemExit) as exc:
            main([flag, "0.5"])
        assert exc.value.code == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_the_operator_refuses_a_pass_interval_out_of_bounds_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from stoker.operator.main import main

    for value in ("-1", "6"):
        with pytest.raises(SystemExit) as exc:
            main(["--pass-interval-s", value])
        assert exc.value.code == 2
        assert "--pass-interval-s must be between 0 and 5 seconds" in capsys.readouterr().err


def test_a_pass_interval_from_the_environment_that_is_not_a_number_is_refused_naming_the_flag(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from stoker.operator.main import main

    monkeypatch.setenv("STOKER_PASS_INTERVAL_S", "fast")
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "--pass-interval-s: invalid float value: 'fast'" in capsys.readouterr().err
