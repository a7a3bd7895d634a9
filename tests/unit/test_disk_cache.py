"""Disk cache accounting: LRU and frequency-ranked eviction plans, budget, pins, holds, preloaded models."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stoker.agent.disk_cache import (
    EVICTION_HISTORY,
    CachedItem,
    DiskCacheState,
    InsufficientCache,
    KeyConflict,
    NotCached,
    eviction_rank,
    plan_eviction,
)
from stoker.userank import add_use

GiB = 2**30


def item(key: str, size: int, used: float, pinned: bool = False) -> CachedItem:
    return CachedItem(key=key, size_bytes=size, last_used=used, pinned=pinned)


class TestPlanEviction:
    def test_nothing_is_evicted_when_there_is_already_room(self) -> None:
        assert plan_eviction([item("a", 10, 1.0)], need_bytes=5, free_bytes=5) == ()

    def test_least_recently_used_items_go_first(self) -> None:
        items = [item("new", 10, 3.0), item("old", 10, 1.0), item("mid", 10, 2.0)]
        assert plan_eviction(items, need_bytes=15, free_bytes=0) == ("old", "mid")

    def test_eviction_stops_as_soon_as_there_is_room(self) -> None:
        items = [item("a", 10, 1.0), item("b", 10, 2.0), item("c", 10, 3.0)]
        assert plan_eviction(items, need_bytes=12, free_bytes=5) == ("a",)

    def test_pinned_items_are_skipped_even_when_oldest(self) -> None:
        items = [item("pinned", 100, 0.0, pinned=True), item("b", 10, 2.0)]
        assert plan_eviction(items, need_bytes=10, free_bytes=0) == ("b",)

    def test_ties_in_last_use_break_by_key(self) -> None:
        items = [item("b", 10, 1.0), item("a", 10, 1.0)]
        assert plan_eviction(items, need_bytes=10, free_bytes=0) == ("a",)

    def test_impossible_requests_raise_with_the_numbers_and_evict_nothing(self) -> None:
        items = [item("p", 30, 0.0, pinned=True), item("a", 10, 1.0)]
        with pytest.raises(InsufficientCache) as info:
            plan_eviction(items, need_bytes=50, free_bytes=5)
        err = info.value
        assert (err.needed_bytes, err.free_bytes, err.evictable_bytes, err.pinned_bytes) == (50, 5, 10, 30)
        assert "release held models" in str(err)

    def test_accepts_any_iterable_such_as_a_generator(self) -> None:
        assert plan_eviction((item(k, 1, float(i)) for i, k in enumerate("xyz")), need_bytes=2, free_bytes=0) == (
            "x",
            "y",
        )

    def test_negative_need_is_rejected(self) -> None:
        with pytest.raises(ValueError):
            plan_eviction([], need_bytes=-1, free_bytes=0)

    @given(
        st.lists(
            st.tuples(st.integers(0, 100), st.floats(0, 1000, allow_nan=False), st.booleans(),
                      st.one_of(st.none(), st.floats(0, 1000, allow_nan=False))),
            max_size=12,
        ),
        st.integers(0, 600),
        st.integers(-50, 200),
    )
    def test_a_plan_is_the_shortest_prefix_of_the_eviction_order_that_makes_room(
        self, raw: list[tuple[int, float, bool, float | None]], need: int, free: int
    ) -> None:
        items = [CachedItem(key=f"k{i}", size_bytes=size, last_used=used, pinned=pinned, rank_s=rank)
                 for i, (size, used, pinned, rank) in enumerate(raw)]
        by_key = {i.key: i for i in items}
        evictable = sum(i.size_bytes for i in items if not i.pinned)
        try:
            victims = plan_eviction(items, need_bytes=need, free_bytes=free)
        except InsufficientCache:
            assert free + evictable < need
            return
        assert free + sum(by_key[v].size_bytes for v in victims) >= need
        assert not any(by_key[v].pinned for v in victims)
        if victims:
            # minimal: without the last victim there would not have been room
            assert free + sum(by_key[v].size_bytes for v in victims[:-1]) < need
            survivors = [i for i in items if not i.pinned and i.key not in victims]
            last_victim = max(eviction_rank(by_key[v]) for v in victims)
            assert all(eviction_rank(s) > last_victim for s in survivors)
        else:
            assert free >= need


def cached(state: DiskCacheState, key: str, size: int, now: float) -> DiskCacheState:
    state, _, _ = state.reserve(key, size, now=now)
    return state.commit(key, now=now)


def used_by_a_job(state: DiskCacheState, key: str, now: float) -> DiskCacheState:
    return state.pin(key, now=now).unpin(key, now=now)


class TestFrequencyRank:
    def test_a_model_fetched_for_one_job_goes_before_one_in_steady_use(self) -> None:
        state = DiskCacheState(budget_bytes=30, half_life_s=600.0)
        state = used_by_a_job(cached(state, "steady", 10, 0.0), "steady", 0.0)
        state = used_by_a_job(state, "steady", 100.0)
        state = used_by_a_job(cached(state, "one-off", 10, 200.0), "one-off", 200.0)
        state = cached(state, "c", 10, 210.0)
        # plain LRU would evict "steady" (last used at 100 s)
        _, _, victims = state.reserve("d", 10, now=300.0)
        assert victims == ("one-off",)
        _, _, lru_victims = dataclasses.replace(state, half_life_s=None).reserve("d", 10, now=300.0)
        assert lru_victims == ("steady",)

    def test_more_uses_rank_later_and_equal_counts_rank_by_recency(self) -> None:
        state = DiskCacheState(budget_bytes=40, half_life_s=3600.0)
        state = cached(state, "thrice", 10, 0.0)
        for t in (0.0, 10.0, 20.0):
            state = used_by_a_job(state, "thrice", t)
        state = cached(state, "twice", 10, 0.0)
        for t in (30.0, 40.0):
            state = used_by_a_job(state, "twice", t)
        state = used_by_a_job(cached(state, "once-late", 10, 50.0), "once-late", 50.0)
        state = used_by_a_job(cached(state, "once-early", 10, 45.0), "once-early", 45.0)
        _, _, victims = state.reserve("x", 40, now=60.0)
        assert victims == ("once-early", "once-late", "twice", "thrice")

    def test_a_model_that_stopped_being_used_still_ages_out(self) -> None:
        state = DiskCacheState(budget_bytes=20, half_life_s=600.0)
        state = cached(state, "old", 10, 0.0)
        for t in (0.0, 1.0, 2.0, 3.0):  # four uses: rank about 2 half-lives after 3 s
            state = used_by_a_job(state, "old", t)
        state = used_by_a_job(cached(state, "new", 10, 5000.0), "new", 5000.0)
        _, _, victims = state.reserve("x", 10, now=5001.0)
        assert victims == ("old",)

    def test_the_rank_counts_n_uses_at_once_like_one_use_log2_n_half_lives_later(self) -> None:
        rank = None
        for _ in range(8):
            rank = add_use(rank, 1000.0, half_life_s=60.0)
        assert rank == pytest.approx(1000.0 + 3 * 60.0)
        # far apart, the older use adds almost nothing, and huge clocks do not overflow
        assert add_use(0.0, 1e9, half_life_s=60.0) == pytest.approx(1e9)
        assert add_use(1e9, 0.0, half_life_s=60.0) == pytest.approx(1e9)

    def test_a_job_waiting_on_the_download_is_the_first_use_and_the_next_job_the_second(self) -> None:
        state = DiskCacheState(budget_bytes=100, half_life_s=100.0)
        state, _, _ = state.pin("m", now=0.0).reserve("m", 10, now=0.0)
        state = state.commit("m", now=5.0)
        assert (state.entries["m"].used, state.entries["m"].previous_use, state.entries["m"].rank_s) == (True, None, 5.0)
        state = used_by_a_job(state.unpin("m", now=8.0), "m", 20.0)
        assert state.entries["m"].previous_use == 8.0 and state.entries["m"].last_used == 20.0
        assert state.entries["m"].rank_s == pytest.approx(add_use(5.0, 20.0, half_life_s=100.0))

    def test_a_prefetched_model_is_unused_until_its_first_job(self) -> None:
        state = cached(DiskCacheState(budget_bytes=100), "m", 10, 0.0)
        assert not state.entries["m"].used and state.entries["m"].rank_s is None
        state = used_by_a_job(state, "m", 30.0)
        entry = state.entries["m"]
        assert (entry.used, entry.previous_use, entry.last_used, entry.rank_s) == (True, None, 30.0, 30.0)

    def test_a_lookup_refreshes_the_last_use_without_counting_a_new_use(self) -> None:
        state = used_by_a_job(cached(DiskCacheState(budget_bytes=100), "m", 10, 0.0), "m", 0.0)
        state = state.touch("m", now=50.0)
        assert (state.entries["m"].previous_use, state.entries["m"].last_used, state.entries["m"].rank_s) == (None, 50.0, 0.0)
        # ...but never leaves it ranked below that lookup
        assert eviction_rank(state.items()[0])[0] == 50.0

    def test_an_evicted_model_that_comes_back_keeps_its_rank(self) -> None:
        state = used_by_a_job(cached(DiskCacheState(budget_bytes=10), "m", 10, 0.0), "m", 40.0)
        state, _, victims = state.reserve("other", 10, now=50.0)
        assert victims == ("m",) and state.evicted == {"m": 40.0}
        state = state.commit("other", now=50.0)
        state, _, _ = state.pin("m", now=90.0).reserve("m", 10, now=90.0)
        state = state.commit("m", now=95.0)
        assert state.entries["m"].rank_s == pytest.approx(add_use(40.0, 95.0, half_life_s=state.half_life_s))
        assert "m" not in state.evicted and "other" in state.evicted

    def test_a_fleet_wide_rank_hint_protects_a_model_new_to_this_agent(self) -> None:
        state = DiskCacheState(budget_bytes=20, half_life_s=600.0)
        state = used_by_a_job(cached(state, "local", 10, 0.0), "local", 100.0)
        state, _, _ = state.pin("moved", now=110.0).reserve("moved", 10, now=110.0)
        # used by many jobs elsewhere: ranks like eight uses at 100 s
        state = state.commit("moved", now=120.0, rank_hint_s=100.0 + 3 * 600.0).unpin("moved", now=130.0)
        _, _, victims = state.reserve("x", 10, now=140.0)
        assert victims == ("local",)
        # a hint below the agent's own rank changes nothing; plain LRU ignores hints
        low = cached(DiskCacheState(budget_bytes=20), "m", 10, 0.0).pin("m", now=0.0)
        assert cached(low, "n", 10, 5.0).entries["n"].rank_s is None
        state, _, _ = DiskCacheState(budget_bytes=20).pin("m", now=50.0).reserve("m", 10, now=50.0)
        assert state.commit("m", now=60.0, rank_hint_s=1.0).entries["m"].rank_s == 60.0
        lru, _, _ = DiskCacheState(budget_bytes=20, half_life_s=None).reserve("m", 10, now=50.0)
        assert lru.commit("m", now=60.0, rank_hint_s=1e6).items()[0].rank_s is None

    def test_the_snapshot_reports_where_eviction_puts_each_entry_and_nothing_for_baked_in_ones(self) -> None:
        state = DiskCacheState(budget_bytes=30, half_life_s=600.0).add_preloaded("baked", 5, now=0.0)
        state = used_by_a_job(cached(state, "used", 10, 0.0), "used", 100.0)
        state = cached(state, "prefetched", 10, 50.0)  # never used: ranks by its arrival, as eviction does
        views = {e.key: e.eviction_rank_s for e in state.snapshot().entries}
        assert views == {"baked": None, "used": 100.0, "prefetched": 50.0}
        assert [k for k, _ in sorted(((k, r) for k, r in views.items() if r is not None), key=lambda kv: kv[1])] == \
            list(state.reserve("x", 30, now=200.0)[2]), "eviction takes them in that order"

    def test_the_eviction_history_is_bounded_and_keeps_the_highest_ranks(self) -> None:
        full = EVICTION_HISTORY + EVICTION_HISTORY // 4
        state = DiskCacheState(budget_bytes=1, evicted={f"h{i}": float(i) for i in range(full)})
        state = cached(state, "new", 1, 1e6)
        assert len(state.evicted) == full  # trimmed only once a quarter more has piled up
        state = cached(state, "newer", 1, 2e6)  # evicts "new": one too many
        assert len(state.evicted) == EVICTION_HISTORY
        assert "h0" not in state.evicted and f"h{full - 1}" in state.evicted and state.evicted["new"] == 1e6

    def test_a_restart_without_saved_ranks_ranks_by_the_last_two_uses(self) -> None:
        state = cached(DiskCacheState(budget_bytes=100, half_life_s=60.0), "m", 10, 30.0)
        restored = state.with_history("m", previous_use=0.0, used=True)
        assert restored.entries["m"].rank_s == pytest.approx(add_use(0.0, 30.0, half_life_s=60.0))
        saved = state.with_history("m", previous_use=0.0, used=True, rank_s=500.0)
        assert saved.entries["m"].rank_s == 500.0 and saved.snapshot().entries[0].rank_s == 500.0

    def test_saved_ranks_of_evicted_models_are_restored_without_shadowing_cached_ones(self) -> None:
        state = cached(DiskCacheState(budget_bytes=100), "here", 10, 0.0)
        state = state.with_evicted_ranks({"gone": 500.0, "here": 9.0})
        assert dict(state.evicted) == {"gone": 500.0}
        state, _, _ = state.reserve("gone", 10, now=600.0)
        assert state.commit("gone", now=610.0).entries["gone"].rank_s == 500.0

    def test_a_non_positive_half_life_is_refused(self) -> None:
        with pytest.raises(ValueError, match="half_life_s"):
            DiskCacheState(budget_bytes=1, half_life_s=0.0)


class TestDiskCacheState:
    def test_reserve_then_commit_moves_bytes_from_reserved_to_used(self) -> None:
        state, reservation, victims = DiskCacheState(budget_bytes=100).reserve("m", 60, now=1.0)
        assert (state.reserved_bytes, state.used_bytes, victims) == (60, 0, ())
        assert reservation.size_bytes == 60
        state = state.commit("m", now=2.0, size_bytes=55)
        assert (state.reserved_bytes, state.used_bytes, state.free_bytes) == (0, 55, 45)

    def test_concurrent_reservations_cannot_overrun_the_budget(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=100).reserve("a", 60, now=1.0)
        with pytest.raises(InsufficientCache) as info:
            state.reserve("b", 60, now=1.0)
        assert info.value.reserved_bytes == 60 and info.value.budget_bytes == 100
        assert info.value.key == "b"

    def test_reserving_evicts_the_least_recently_used_unpinned_entries(self) -> None:
        state = DiskCacheState(budget_bytes=100)
        for i, key in enumerate(["a", "b", "c"]):
            state, _, _ = state.reserve(key, 30, now=float(i))
            state = state.commit(key, now=float(i))
        state = state.touch("a", now=10.0)
        state, _, victims = state.reserve("d", 50, now=11.0)
        assert victims == ("b", "c")
        assert set(state.entries) == {"a"}

    def test_preloaded_models_cost_no_budget_are_held_and_never_evicted(self) -> None:
        state = DiskCacheState(budget_bytes=50).add_preloaded("baked", 10 * GiB, now=0.0)
        assert state.free_bytes == 50
        state, _, victims = state.reserve("x", 50, now=1.0)
        assert victims == () and "baked" in state.entries
        view = state.snapshot().entries[0]
        assert view.preloaded and view.held and view.pinned

    def test_held_and_in_use_entries_survive_while_others_go(self) -> None:
        state = DiskCacheState(budget_bytes=90)
        for i, key in enumerate(["held", "used", "free"]):
            state, _, _ = state.reserve(key, 30, now=float(i))
            state = state.commit(key, now=float(i))
        state = state.hold("held").pin("used", now=5.0)
        with pytest.raises(InsufficientCache):
            state.reserve("big", 60, now=6.0)
        state, _, victims = state.reserve("small", 30, now=6.0)
        assert victims == ("free",)

    def test_holds_given_before_download_apply_once_committed(self) -> None:
        state = DiskCacheState(budget_bytes=10).hold("m")
        state, _, _ = state.reserve("m", 10, now=0.0)
        state = state.commit("m", now=1.0)
        with pytest.raises(InsufficientCache):
            state.reserve("other", 1, now=2.0)
        state = state.release("m")
        _, _, victims = state.reserve("other", 1, now=2.0)
        assert victims == ("m",)

    def test_abort_returns_the_reserved_bytes(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=10).reserve("m", 10, now=0.0)
        assert state.abort("m").free_bytes == 10

    def test_commit_cannot_exceed_the_reservation_without_resizing(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=100).reserve("m", 10, now=0.0)
        with pytest.raises(ValueError, match="resize_reservation"):
            state.commit("m", now=1.0, size_bytes=20)
        state, victims = state.resize_reservation("m", 20, now=1.0)
        assert victims == () and state.commit("m", now=1.0, size_bytes=20).used_bytes == 20

    def test_the_same_key_cannot_be_reserved_twice(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=100).reserve("m", 10, now=0.0)
        with pytest.raises(KeyConflict):
            state.reserve("m", 10, now=0.0)

    def test_unpinning_something_not_pinned_is_an_error(self) -> None:
        with pytest.raises(NotCached):
            DiskCacheState(budget_bytes=1).unpin("m", now=0.0)

    def test_failed_operations_leave_the_original_state_untouched(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=10).reserve("a", 10, now=0.0)
        state = state.commit("a", now=0.0).pin("a", now=0.0)
        before = state.snapshot()
        with pytest.raises(InsufficientCache):
            state.reserve("b", 5, now=1.0)
        assert state.snapshot() == before

    def test_removing_a_pinned_entry_needs_force(self) -> None:
        state, _, _ = DiskCacheState(budget_bytes=10).reserve("a", 10, now=0.0)
        state = state.commit("a", now=0.0).hold("a")
        with pytest.raises(Exception, match="held"):
            state.remove("a")
        assert "a" not in state.remove("a", force=True).entries

    def test_shrinking_the_budget_evicts_lru_entries_to_fit(self) -> None:
        state = DiskCacheState(budget_bytes=100)
        for i, key in enumerate("abc"):
            state, _, _ = state.reserve(key, 30, now=float(i))
            state = state.commit(key, now=float(i))
        state, victims = state.with_budget(50)
        assert victims == ("a", "b") and state.used_bytes == 30

    def test_snapshot_lists_entries_most_recent_first_with_figures(self) -> None:
        state = DiskCacheState(budget_bytes=100)
        for i, key in enumerate("ab"):
            state, _, _ = state.reserve(key, 10, now=float(i))
            state = state.commit(key, now=float(i))
        state, _, _ = state.reserve("c", 20, now=5.0)
        snap = state.snapshot()
        assert [e.key for e in snap.entries] == ["b", "a"]
        assert (snap.used_bytes, snap.reserved_bytes, snap.free_bytes) == (20, 20, 60)
        assert [r.key for r in snap.reservations] == ["c"]


KEYS = st.sampled_from([f"m{i}" for i in range(8)])


class DiskCacheMachine(RuleBasedStateMachine):
    """Random operation sequences against the invariants of the disk tier."""

    def __init__(self) -> None:
        super().__init__()
        self.state = DiskCacheState(budget_bytes=1000)
        self.now = 0.0
        self.baked: set[str] = set()

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    @rule(key=KEYS, size=st.integers(0, 1200))
    def reserve(self, key: str, size: int) -> None:
        before = self.state
        try:
            after, reservation, victims = before.reserve(key, size, now=self.tick())
        except KeyConflict:
            assert key in before.entries or key in before.reservations
            return
        except InsufficientCache as exc:
            evictable = sum(i.size_bytes for i in before.items() if not i.pinned)
            assert before.free_bytes + evictable < size
            assert exc.needed_bytes == size
            return
        assert reservation.size_bytes == size
        for victim in victims:
            assert not before.is_pinned(victim), "a pinned, held or preloaded entry was evicted"
            assert victim not in after.entries
        if victims:
            # eviction only when needed, and only as much as needed
            assert before.free_bytes < size
            freed = sum(before.entries[v].size_bytes for v in victims[:-1])
            assert before.free_bytes + freed < size
            # every evicted entry ranks before every surviving unpinned entry
            ranks = {i.key: eviction_rank(i) for i in before.items()}
            last_victim = max(ranks[v] for v in victims)
            for survivor in after.items():
                if not survivor.pinned:
                    assert ranks[survivor.key] > last_victim
        self.state = after

    @precondition(lambda self: bool(self.state.reservations))
    @rule(data=st.data(), shrink=st.integers(0, 50))
    def commit(self, data: st.DataObject, shrink: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.state.reservations)))
        size = max(self.state.reservations[key].size_bytes - shrink, 0)
        self.state = self.state.commit(key, now=self.tick(), size_bytes=size)

    @precondition(lambda self: bool(self.state.reservations))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.state.reservations)))
        self.state = self.state.abort(key)

    @rule(key=KEYS)
    def touch(self, key: str) -> None:
        if key in self.state.entries:
            self.state = self.state.touch(key, now=self.tick())

    @rule(key=KEYS)
    def pin(self, key: str) -> None:
        self.state = self.state.pin(key, now=self.tick())

    @rule(key=KEYS)
    def unpin(self, key: str) -> None:
        if self.state.pins.get(key, 0) > 0:
            self.state = self.state.unpin(key, now=self.tick())

    @rule(key=KEYS)
    def hold(self, key: str) -> None:
        self.state = self.state.hold(key)

    @rule(key=KEYS)
    def release(self, key: str) -> None:
        self.state = self.state.release(key)

    @rule(key=st.sampled_from(["baked0", "baked1"]), size=st.integers(0, 5000))
    def preload(self, key: str, size: int) -> None:
        if key not in self.state.entries:
            free_before = self.state.free_bytes
            self.state = self.state.add_preloaded(key, size, now=self.tick())
            assert self.state.free_bytes == free_before
            self.baked.add(key)

    @rule(budget=st.integers(0, 1500))
    def change_budget(self, budget: int) -> None:
        before = self.state
        try:
            after, victims = before.with_budget(budget)
        except InsufficientCache:
            assert before.used_bytes + before.reserved_bytes - sum(
                i.size_bytes for i in before.items() if not i.pinned
            ) > budget
            return
        assert not any(before.is_pinned(v) for v in victims)
        self.state = after

    @invariant()
    def budget_is_never_exceeded(self) -> None:
        assert self.state.used_bytes + self.state.reserved_bytes <= self.state.budget_bytes
        assert self.state.free_bytes >= 0

    @invariant()
    def preloaded_models_stay(self) -> None:
        # Whatever reservations, pins, releases and budget cuts came since, every model
        # baked in is still cached, still preloaded and reported as held.
        views = {e.key: e for e in self.state.snapshot().entries}
        for key in self.baked:
            assert key in views, f"preloaded {key!r} was evicted"
            assert views[key].preloaded and views[key].held

    @invariant()
    def a_key_is_never_both_cached_and_downloading(self) -> None:
        assert not set(self.state.entries) & set(self.state.reservations)


TestDiskCacheMachine = DiskCacheMachine.TestCase
TestDiskCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class TestDuplicates:
    """Copies other agents also hold can come back from a peer: with a discount they go first."""

    def state(self) -> DiskCacheState:
        s = DiskCacheState(budget_bytes=300)
        for i, key in enumerate(("busy", "steady", "once")):
            s, _, _ = s.reserve(key, 100, now=float(i))
            s = s.commit(key, now=float(i))
        for t in range(8):  # "busy" and "steady" are used again and again; "once" was used once
            s = s.pin("busy", now=100.0 + t).unpin("busy", now=100.5 + t)
            s = s.pin("steady", now=100.0 + t).unpin("steady", now=100.5 + t)
        return s

    def test_without_a_discount_duplicates_change_nothing(self) -> None:
        s = self.state()
        plain = s.reserve("new", 100, now=200.0)[2]
        assert plain == ("once",)
        assert s.with_duplicates(frozenset({"busy"}), discount_s=0.0).reserve("new", 100, now=200.0)[2] == plain

    def test_a_duplicate_goes_before_the_fleets_last_copy_of_a_model_used_less(self) -> None:
        s = self.state().with_duplicates(frozenset({"busy"}), discount_s=8 * 3600.0)
        assert s.reserve("new", 100, now=200.0)[2] == ("busy",)
        assert s.reserve("new", 200, now=200.0)[2] == ("busy", "once")

    def test_a_pinned_duplicate_stays(self) -> None:
        s = self.state().pin("busy", now=150.0).with_duplicates(frozenset({"busy"}), discount_s=8 * 3600.0)
        assert s.reserve("new", 100, now=200.0)[2] == ("once",)

    def test_a_negative_discount_is_refused(self) -> None:
        with pytest.raises(ValueError, match="discount_s"):
            self.state().with_duplicates(frozenset(), discount_s=-1.0)
