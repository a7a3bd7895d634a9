"""The shared use-frequency rank and the operator's fleet rank (pure)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.userank import DEFAULT_HALF_LIFE_S, PUBLISH_MIN_CHANGE_S, FleetRank, add_use, is_publish_due

H = DEFAULT_HALF_LIFE_S
times = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
unix_times = st.floats(min_value=1.7e9, max_value=1.8e9, allow_nan=False)


def fold(uses: list[float], *, half_life_s: float = H) -> float | None:
    rank = None
    for t in uses:
        rank = add_use(rank, t, half_life_s=half_life_s)
    return rank


class TestAddUse:
    def test_one_use_ranks_at_its_time_and_n_uses_at_once_log2_n_half_lives_later(self) -> None:
        assert add_use(None, 1000.0, half_life_s=60.0) == 1000.0
        assert fold([1000.0] * 8, half_life_s=60.0) == pytest.approx(1000.0 + 3 * 60.0)
        assert add_use(1000.0, 1000.0, half_life_s=60.0) == pytest.approx(1060.0)

    @given(st.lists(unix_times, min_size=1, max_size=40), st.randoms(use_true_random=False))
    def test_the_order_of_the_uses_does_not_change_the_rank(self, uses: list[float], rnd: random.Random) -> None:
        shuffled = list(uses)
        rnd.shuffle(shuffled)
        assert fold(shuffled) == pytest.approx(fold(uses), abs=1e-6)
        # merging two partial ranks is a use of one rank by the other
        half = len(uses) // 2
        left, right = fold(uses[:half]), fold(uses[half:])
        merged = right if left is None else add_use(left, right, half_life_s=H)  # type: ignore[arg-type]
        assert merged == pytest.approx(fold(uses), abs=1e-6)

    @given(times, times, times)
    def test_a_use_only_ever_raises_the_rank_and_by_at_most_one_half_life(self, rank: float, now: float, later: float) -> None:
        after = add_use(rank, now, half_life_s=H)
        assert max(rank, now) <= after <= max(rank, now) + H
        assert add_use(rank, max(now, later), half_life_s=H) >= after, "a later use ranks higher"
        assert add_use(after, later, half_life_s=H) >= after

    @given(times, times, st.floats(min_value=1e-3, max_value=1e9))
    def test_no_clock_and_no_half_life_overflows(self, rank: float, now: float, half_life_s: float) -> None:
        assert math.isfinite(add_use(rank, now, half_life_s=half_life_s))
        assert add_use(0.0, 1e15, half_life_s=1e-3) == 1e15


class TestFleetRank:
    def test_counting_jobs_folds_their_creation_times_and_remembers_the_newest(self) -> None:
        rank = FleetRank().count_all([30.0, 10.0, 20.0])
        assert rank.rank_s == pytest.approx(fold([10.0, 20.0, 30.0]))
        assert rank.counted_through_s == 30.0

    def test_a_rank_seeded_from_its_published_value_skips_the_jobs_that_value_counts(self) -> None:
        published = FleetRank().count_all([10.0, 20.0])
        seeded = FleetRank.seeded(rank_s=published.rank_s, counted_through_s=published.counted_through_s)
        assert seeded.is_counted(20.0) and not seeded.is_counted(21.0)
        again = seeded.count_all([10.0, 20.0, 25.0])  # the old jobs are listed again after a restart
        assert again.rank_s == pytest.approx(fold([10.0, 20.0, 25.0]))
        assert again.counted_through_s == 25.0

    def test_a_published_rank_without_its_time_is_ignored(self) -> None:
        assert FleetRank.seeded(rank_s=99.0, counted_through_s=None) == FleetRank()
        assert FleetRank.seeded(rank_s=math.nan, counted_through_s=5.0) == FleetRank()

    @given(st.lists(st.integers(1_767_225_600, 1_767_232_800), min_size=1, max_size=60, unique=True),
           st.integers(0, 60), st.integers(0, 60), st.randoms(use_true_random=False))
    def test_a_restart_after_any_publish_counts_every_job_exactly_once(
            self, seconds: list[int], publish_after: int, seen_early: int, rnd: random.Random) -> None:
        # The first operator sees the jobs in creation order (one per second) and publishes after
        # some of them; the next one lists every job again, in any order, some before the model.
        created = sorted(float(s) for s in seconds)
        k = min(publish_after, len(created))
        before = FleetRank().count_all(created[:k])
        published = (None if before.rank_s is None else round(before.rank_s, 3), before.counted_through_s)
        listed = list(created)
        rnd.shuffle(listed)
        early, late = listed[:seen_early], listed[seen_early:]
        after = FleetRank.seeded(rank_s=published[0], counted_through_s=published[1]).count_all(early).count_all(late)
        assert after.rank_s == pytest.approx(fold(created), abs=1e-2)
        assert after.counted_through_s == max(created)

    @given(st.lists(st.integers(0, 20), min_size=2, max_size=40), st.integers(1, 40))
    def test_jobs_created_in_the_second_of_the_published_time_are_never_counted_twice(
            self, seconds: list[int], publish_after: int) -> None:
        # Creation times have one-second resolution: a job created in the same second as the newest
        # counted one but seen after the publish is missed after a restart, not counted twice.
        created = sorted(float(s) for s in seconds)
        before = FleetRank().count_all(created[:publish_after])
        after = FleetRank.seeded(rank_s=before.rank_s, counted_through_s=before.counted_through_s).count_all(created)
        assert after.rank_s is not None and after.rank_s <= fold(created) + 1e-6  # type: ignore[operator]
        assert after.rank_s >= before.rank_s  # type: ignore[operator]


class TestPublishing:
    def test_a_rank_is_published_first_then_only_once_it_moved_a_minute(self) -> None:
        assert not is_publish_due(None, None)
        assert is_publish_due(None, 5.0)
        assert not is_publish_due(100.0, 100.0 + PUBLISH_MIN_CHANGE_S - 1)
        assert is_publish_due(100.0, 100.0 + PUBLISH_MIN_CHANGE_S)
        assert is_publish_due(100.0, 100.0 - PUBLISH_MIN_CHANGE_S), "a lower count (a lost seed) is published too"

    def test_a_steady_stream_of_jobs_is_published_about_once_a_minute_not_per_job(self) -> None:
        # A job every 2 s: once the model's count has built up (a few half-lives), each job moves
        # its rank by about 2 s, so a rewrite is due every 30 jobs or so.
        rank, published, writes = FleetRank(), None, 0
        for second in range(0, 5 * 3600, 2):
            rank = rank.count(1.7e9 + second)
            if is_publish_due(published, rank.rank_s):
                published = rank.rank_s
                writes += second >= 4 * 3600
        assert 40 <= writes <= 90, "the last hour: about one rewrite a minute for 1800 jobs"
