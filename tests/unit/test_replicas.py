"""Warm replicas: targets, spread, budgets, releases, autoscale and demand."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from stoker.operator.placement import AgentView
from stoker.operator.replicas import (
    Autoscale,
    DemandCounter,
    HoldTier,
    ModelTarget,
    ReplicaError,
    ReplicaPlan,
    ReplicaSettings,
    desired_replicas,
    plan_demand,
    plan_replicas,
)

GB = 10**9


def agent(name: str, *, zone: str = "z1", node: str | None = None, **kw: object) -> AgentView:
    defaults: dict[str, object] = dict(disk_capacity_bytes=50 * GB, disk_free_bytes=50 * GB, vram_capacity_bytes=24 * GB)
    defaults.update(kw)
    return AgentView(name=name, zone=zone, node=node or f"node-{name}", **defaults)  # type: ignore[arg-type]


def holders(plan: ReplicaPlan, key: str) -> list[str]:
    return sorted(o.agent for o in plan.orders if any(k == key for k, _ in o.holds))


def apply(plan: ReplicaPlan, agents: list[AgentView]) -> list[AgentView]:
    """The fleet after every agent carried out its orders (downloads finished, hot copies loaded)."""
    out = []
    for a in agents:
        o = plan.orders_for(a.name)
        if o is None:
            out.append(a)
            continue
        held = frozenset(k for k, _ in o.holds)
        hot = frozenset(k for k, t in o.holds if t is HoldTier.VRAM)
        out.append(dataclasses.replace(a, held=held, held_hot=hot, disk=a.disk | held, vram=a.vram | hot))
    return out


three_zones = [agent(f"a{i}", zone=f"z{i % 3}") for i in range(6)]


class TestTargets:
    def test_replica_targets_are_met_when_capacity_allows(self) -> None:
        plan = plan_replicas([ModelTarget("m", 6 * GB, replicas=3, hot_replicas=1)], three_zones, now=0)
        assert len(holders(plan, "m")) == 3
        hot = [o.agent for o in plan.orders if ("m", HoldTier.VRAM) in o.holds]
        assert len(hot) == 1
        status = plan.status_for("m")
        assert status is not None and (status.desired, status.held, status.shortfall, status.ready) == (3, 3, 3, False)

    def test_copies_are_spread_across_zones_and_nodes(self) -> None:
        agents = [agent("a", zone="z1", node="n1"), agent("b", zone="z1", node="n1"), agent("c", zone="z1", node="n2"), agent("d", zone="z2", node="n3")]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=3)], agents, now=0)
        chosen = holders(plan, "m")
        zones = {next(a.zone for a in agents if a.name == n) for n in chosen}
        nodes = {next(a.node for a in agents if a.name == n) for n in chosen}
        assert zones == {"z1", "z2"} and len(nodes) == 3

    def test_existing_copies_are_held_before_downloading_into_an_uncovered_zone(self) -> None:
        agents = [agent(f"a{i}", zone=f"z{i % 3}", disk=frozenset({"m"}) if i in (0, 3) else frozenset())
                  for i in range(6)]
        plan = plan_replicas([ModelTarget("m", 6 * GB, replicas=2)], agents, now=0)
        assert holders(plan, "m") == ["a0", "a3"]
        assert not any(o.prefetch for o in plan.orders), "no download while two nodes already have the copy"

    def test_existing_copies_on_the_same_node_do_not_replace_node_spread(self) -> None:
        agents = [agent("a", node="n1", disk=frozenset({"m"})), agent("b", node="n1", disk=frozenset({"m"})),
                  agent("c", node="n2")]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=2)], agents, now=0)
        assert holders(plan, "m") == ["a", "c"]

    def test_copies_beyond_replicas_go_where_they_are_cheapest(self) -> None:
        # Autoscale's extra copies are for throughput: a copy already on disk in a covered zone
        # beats a download into a new zone.
        agents = [agent("a", zone="z1", disk=frozenset({"m"}), held=frozenset({"m"})),
                  agent("b", zone="z1", disk=frozenset({"m"})), agent("c", zone="z2")]
        m = ModelTarget("m", 6 * GB, replicas=1, autoscale=Autoscale(max_replicas=2, target_jobs_per_minute=6),
                        demand_per_minute=12)
        plan = plan_replicas([m], agents, now=0)
        assert holders(plan, "m") == ["a", "b"]

    def test_hot_copies_are_spread_across_nodes(self) -> None:
        agents = [agent(n, zone="z1", node=node, disk=frozenset({"m"}), held=frozenset({"m"}))
                  for n, node in (("a", "n1"), ("b", "n1"), ("c", "n2"))]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=3, hot_replicas=2)], agents, now=0)
        hot = sorted(o.agent for o in plan.orders if ("m", HoldTier.VRAM) in o.holds)
        assert len(hot) == 2 and {next(a.node for a in agents if a.name == n) for n in hot} == {"n1", "n2"}

    def test_an_existing_copy_is_held_before_a_new_download(self) -> None:
        agents = [agent("a"), agent("b", disk=frozenset({"m"})), agent("c")]
        plan = plan_replicas([ModelTarget("m", 6 * GB, replicas=1)], agents, now=0)
        assert holders(plan, "m") == ["b"]
        orders = plan.orders_for("b")
        assert orders is not None and orders.hold == ("m",) and orders.prefetch == ()

    def test_a_baked_in_copy_counts_and_costs_no_budget(self) -> None:
        tiny = agent("a", disk_capacity_bytes=1 * GB, preloaded=frozenset({"m"}), disk=frozenset({"m"}))
        plan = plan_replicas([ModelTarget("m", 6 * GB, replicas=1)], [tiny, agent("b")], now=0)
        assert holders(plan, "m") == ["a"]

    def test_a_plan_applied_and_replanned_changes_nothing(self) -> None:
        models = [ModelTarget("m", 6 * GB, replicas=3, hot_replicas=1), ModelTarget("n", 2 * GB, replicas=2)]
        fleet = apply(plan_replicas(models, three_zones, now=0), three_zones)
        again = plan_replicas(models, fleet, now=1)
        assert not any(o.changed for o in again.orders)
        assert all(m.ready for m in again.models)

    def test_not_ready_agents_are_not_counted_and_get_no_orders(self) -> None:
        agents = [agent("lost", ready=False, held=frozenset({"m"}), disk=frozenset({"m"})), agent("a"), agent("b")]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=1)], agents, now=0)
        assert plan.orders_for("lost") is None
        assert holders(plan, "m") == ["a"]
        status = plan.status_for("m")
        assert status is not None and status.on_disk == 0 and not status.available

    def test_cordoned_agents_get_no_new_copies(self) -> None:
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=1)], [agent("a", cordoned=True), agent("b")], now=0)
        assert holders(plan, "m") == ["b"]

    def test_a_model_with_a_failed_source_gets_no_new_copies(self) -> None:
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=2, failed=True)], three_zones, now=0)
        assert holders(plan, "m") == []

    def test_new_downloads_per_agent_are_limited_per_round(self) -> None:
        models = [ModelTarget(f"m{i}", 1 * GB, replicas=1) for i in range(5)]
        plan = plan_replicas(models, [agent("a")], now=0, settings=ReplicaSettings(max_new_holds_per_agent=2))
        orders = plan.orders_for("a")
        assert orders is not None and len(orders.prefetch) == 2
        assert len(plan.unplaced) == 3


class TestReleases:
    def test_copies_above_target_are_released_idle_ones_first(self) -> None:
        m = "m"
        agents = [
            agent("busy", held=frozenset({m}), disk=frozenset({m}), in_use=frozenset({m})),
            agent("loaded", held=frozenset({m}), disk=frozenset({m}), vram=frozenset({m})),
            agent("idle1", held=frozenset({m}), disk=frozenset({m})),
            agent("idle2", held=frozenset({m}), disk=frozenset({m})),
        ]
        plan = plan_replicas([ModelTarget(m, 2 * GB, replicas=2)], agents, now=0)
        assert holders(plan, m) == ["busy", "loaded"]
        assert sorted(o.agent for o in plan.orders if o.release == (m,)) == ["idle1", "idle2"]

    def test_releases_keep_copies_spread_across_zones(self) -> None:
        agents = [agent(f"a{i}", zone="z1" if i < 3 else "z2", held=frozenset({"m"}), disk=frozenset({"m"})) for i in range(4)]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=2)], agents, now=0)
        zones = {next(a.zone for a in agents if a.name == n) for n in holders(plan, "m")}
        assert zones == {"z1", "z2"}

    def test_holds_of_models_that_no_longer_exist_are_released(self) -> None:
        plan = plan_replicas([], [agent("a", held=frozenset({"gone"}), disk=frozenset({"gone"}))], now=0)
        orders = plan.orders_for("a")
        assert orders is not None and orders.release == ("gone",) and orders.holds == ()

    def test_extra_hot_copies_are_unloaded_but_stay_held_on_disk(self) -> None:
        agents = [agent(f"a{i}", held=frozenset({"m"}), held_hot=frozenset({"m"}), disk=frozenset({"m"}), vram=frozenset({"m"})) for i in range(2)]
        plan = plan_replicas([ModelTarget("m", 2 * GB, replicas=2, hot_replicas=1)], agents, now=0)
        assert sum(len(o.unload_hot) for o in plan.orders) == 1
        assert holders(plan, "m") == ["a0", "a1"]


class TestBudgets:
    def test_an_agent_is_never_ordered_beyond_its_hold_budget(self) -> None:
        models = [ModelTarget(f"m{i}", 15 * GB, replicas=1) for i in range(4)]
        s = ReplicaSettings(hold_budget_fraction=0.8, max_new_holds_per_agent=10)
        plan = plan_replicas(models, [agent("a")], now=0, settings=s)
        orders = plan.orders_for("a")
        assert orders is not None and len(orders.holds) == 2  # 2 x 15 GB <= 40 GB < 3 x 15 GB
        assert [k for k, _ in plan.unplaced] == ["m2", "m3"]
        assert "hold budget" in plan.unplaced[0][1]

    def test_holds_above_an_agents_budget_are_released_and_placed_where_there_is_room(self) -> None:
        # 12 GB held on a 10 GB disk (8 GB hold budget): one copy moves to the agent with room.
        full = agent("full", disk_capacity_bytes=10 * GB, disk_free_bytes=0, disk=frozenset({"m1", "m2"}),
                     held=frozenset({"m1", "m2"}))
        roomy = agent("roomy", disk_capacity_bytes=100 * GB)
        models = [ModelTarget("m1", 6 * GB, replicas=1), ModelTarget("m2", 6 * GB, replicas=1)]
        plan = plan_replicas(models, [full, roomy], now=0)
        kept, moved = plan.orders_for("full"), plan.orders_for("roomy")
        assert kept is not None and moved is not None
        assert len(kept.holds) == 1 and len(kept.release) == 1
        assert moved.prefetch == kept.release
        assert all(m.held == 1 for m in plan.models)

    def test_a_budget_trim_releases_the_model_that_has_other_copies_first(self) -> None:
        full = agent("full", disk_capacity_bytes=10 * GB, disk=frozenset({"a", "b"}), held=frozenset({"a", "b"}))
        other = agent("other", disk_capacity_bytes=100 * GB, disk=frozenset({"b"}), held=frozenset({"b"}))
        models = [ModelTarget("a", 6 * GB, replicas=1), ModelTarget("b", 6 * GB, replicas=2)]
        plan = plan_replicas(models, [full, other], now=0)
        assert plan.orders_for("full").release == ("b",)  # type: ignore[union-attr]
        assert holders(plan, "a") == ["full"]

    def test_hot_copies_above_the_vram_budget_are_unloaded(self) -> None:
        a = agent("a", vram_capacity_bytes=10 * GB, disk=frozenset({"x", "y"}), held=frozenset({"x", "y"}),
                  held_hot=frozenset({"x", "y"}))
        plan = plan_replicas([ModelTarget("x", 5 * GB, replicas=1, hot_replicas=1),
                              ModelTarget("y", 5 * GB, replicas=1, hot_replicas=1)], [a], now=0)
        orders = plan.orders_for("a")
        assert orders is not None and len(orders.unload_hot) == 1 and len(orders.holds) == 2

    def test_hot_copies_respect_the_vram_budget(self) -> None:
        plan = plan_replicas([ModelTarget("big", 20 * GB, replicas=1, hot_replicas=1)], [agent("a")], now=0)
        assert plan.orders_for("a") is not None
        assert plan.orders_for("a").load_hot == ()  # type: ignore[union-attr]
        assert plan.status_for("big").hot_shortfall == 1  # type: ignore[union-attr]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[ModelTarget], list[AgentView]]:
    keys = [f"m{i}" for i in range(draw(st.integers(1, 8)))]
    models = [
        ModelTarget(
            k, draw(st.integers(1, 25)) * GB, replicas=draw(st.integers(0, 4)), hot_replicas=draw(st.integers(0, 2)),
            autoscale=draw(st.sampled_from([None, Autoscale(max_replicas=5, target_jobs_per_minute=6)])),
            demand_per_minute=draw(st.floats(0, 60)),
        )
        for k in keys
    ]
    agents = []
    for i in range(draw(st.integers(0, 8))):
        disk = draw(st.frozensets(st.sampled_from(keys)))
        preloaded = draw(st.frozensets(st.sampled_from(sorted(disk)))) if disk else frozenset()
        held = draw(st.frozensets(st.sampled_from(keys)))
        agents.append(agent(
            f"a{i}", zone=f"z{i % 3}", ready=draw(st.booleans()) or i == 0,
            disk_capacity_bytes=draw(st.integers(10, 100)) * GB, vram_capacity_bytes=draw(st.sampled_from([8, 24, 80])) * GB,
            disk=disk, preloaded=preloaded, held=held, held_hot=draw(st.frozensets(st.sampled_from(sorted(held))))
            if held else frozenset(),
        ))
    return models, agents


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plans_never_exceed_budgets_and_never_order_not_ready_agents(scenario: tuple[list[ModelTarget], list[AgentView]]) -> None:
    models, agents = scenario
    s = ReplicaSettings()
    size = {m.key: m.size_bytes for m in models}
    plan = plan_replicas(models, agents, now=0, settings=s)
    by_name = {a.name: a for a in agents}
    for o in plan.orders:
        a = by_name[o.agent]
        assert a.ready
        # Never beyond budget, existing holds included (baked-in copies are free).
        held_bytes = sum(size[k] for k, _ in o.holds if k not in a.preloaded)
        assert held_bytes <= a.disk_capacity_bytes * s.hold_budget_fraction  # type: ignore[operator]
        hot_bytes = sum(size[k] for k, t in o.holds if t is HoldTier.VRAM)
        assert hot_bytes <= a.vram_capacity_bytes * s.hot_budget_fraction  # type: ignore[operator]
    unplaced = {k for k, _ in plan.unplaced}
    for m in plan.models:
        # Never above target (baked-in copies excepted: they cannot be released) ...
        assert m.held <= max(m.desired, sum(1 for a in agents if a.ready and m.key in a.preloaded))
        # ... and at target unless the plan says which copies no agent could take.
        if m.key not in unplaced:
            assert m.held >= m.desired
            hot = sum(1 for o in plan.orders if (m.key, HoldTier.VRAM) in o.holds)
            assert hot == m.desired_hot


class TestAutoscale:
    def test_the_target_rises_with_demand_up_to_max_replicas(self) -> None:
        m = ModelTarget("m", GB, replicas=1, autoscale=Autoscale(max_replicas=4, target_jobs_per_minute=6))
        assert desired_replicas(m, current=1) == 1
        assert desired_replicas(dataclasses.replace(m, demand_per_minute=13), current=1) == 3
        assert desired_replicas(dataclasses.replace(m, demand_per_minute=600), current=1) == 4

    def test_the_target_decays_with_hysteresis(self) -> None:
        m = ModelTarget("m", GB, replicas=1, autoscale=Autoscale(max_replicas=4, target_jobs_per_minute=6))
        s = ReplicaSettings(scale_down_hysteresis=0.25)
        # 3 copies serve 18/min; demand 11 would fit 2 copies, but only drops to 2 below 2 * 6 * 0.75 = 9.
        assert desired_replicas(dataclasses.replace(m, demand_per_minute=11), current=3, settings=s) == 3
        assert desired_replicas(dataclasses.replace(m, demand_per_minute=8.9), current=3, settings=s) == 2
        assert desired_replicas(dataclasses.replace(m, demand_per_minute=0), current=3, settings=s) == 1

    def test_a_burst_raises_the_target_and_it_decays_after(self) -> None:
        half_life = 60.0
        counter = DemandCounter()
        for i in range(300):  # 60 jobs per minute for 5 minutes
            counter = counter.observe(now=i, half_life_s=half_life)
        model = ModelTarget("m", GB, replicas=1, autoscale=Autoscale(max_replicas=8, target_jobs_per_minute=10))
        during = dataclasses.replace(model, demand_per_minute=counter.rate_per_minute(now=300, half_life_s=half_life))
        assert during.demand_per_minute == pytest.approx(60, rel=0.1)
        peak = desired_replicas(during, current=1)
        assert peak == 6
        later = dataclasses.replace(model, demand_per_minute=counter.rate_per_minute(now=300 + 10 * half_life, half_life_s=half_life))
        assert desired_replicas(later, current=peak) == 1

    def test_plan_demand_estimates_a_steady_rate(self) -> None:
        events = [i * 2.0 for i in range(2000)]  # one job every 2 s = 30 per minute
        assert plan_demand(events, now=4000, half_life_s=300) == pytest.approx(30, rel=0.05)
        assert plan_demand([], now=0, half_life_s=300) == 0
        with pytest.raises(ReplicaError):
            plan_demand(events, now=0, half_life_s=0)

    def test_demand_counter_matches_plan_demand(self) -> None:
        times = [0.0, 5.0, 5.0, 30.0, 200.0]
        counter = DemandCounter()
        for t in times:
            counter = counter.observe(now=t, half_life_s=100)
        assert counter.rate_per_minute(now=400, half_life_s=100) == pytest.approx(plan_demand(times, now=400, half_life_s=100))

    def test_autoscale_adds_copies_in_the_plan(self) -> None:
        m = ModelTarget("m", 2 * GB, replicas=1, autoscale=Autoscale(max_replicas=5, target_jobs_per_minute=6), demand_per_minute=20)
        assert len(holders(plan_replicas([m], three_zones, now=0), "m")) == 4


def test_invalid_targets_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ReplicaError, match="replicas"):
        ModelTarget("m", GB, replicas=-1)
    with pytest.raises(ReplicaError, match="same model"):
        plan_replicas([ModelTarget("m", GB), ModelTarget("m", GB)], [], now=0)
