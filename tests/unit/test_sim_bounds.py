"""Lower bounds on bytes downloaded: compulsory misses and the pooled optimal cache."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.sim import bounds, cli, engine, policies


def lru_bytes(requests: list[str], sizes: dict[str, int], capacity: int) -> int:
    cache: OrderedDict[str, int] = OrderedDict()
    missed = 0
    for key in requests:
        if key in cache:
            cache.move_to_end(key)
            continue
        missed += sizes[key]
        cache[key] = sizes[key]
        while sum(cache.values()) > capacity:
            cache.popitem(last=False)
    return missed


def best_whole_file_bytes(requests: list[str], sizes: dict[str, int], capacity: int) -> int:
    """Exhaustive optimum over every eviction choice (tiny inputs only)."""
    best = None

    def walk(i: int, cached: frozenset[str], missed: int) -> None:
        nonlocal best
        if best is not None and missed >= best:
            return
        if i == len(requests):
            best = missed
            return
        key = requests[i]
        if key not in cached:
            missed += sizes[key]
        held = cached | {key}
        others = sorted(held - {key})
        for r in range(len(others) + 1):
            for drop in itertools.combinations(others, r):
                kept = held - set(drop)
                if sum(sizes[k] for k in kept) <= capacity:
                    walk(i + 1, kept, missed)

    walk(0, frozenset(), 0)
    assert best is not None
    return best


def test_a_cache_big_enough_for_everything_misses_only_the_first_requests() -> None:
    sizes = {"a": 3, "b": 5, "c": 7}
    requests = ["a", "b", "a", "c", "b", "a"]
    assert bounds.compulsory_bytes(requests, sizes) == 15
    assert bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=15) == 15


def test_the_pooled_bound_evicts_the_file_needed_farthest_in_the_future() -> None:
    sizes = {"a": 1, "b": 1, "c": 1}
    # Capacity 2. At the first "c", "c" itself is needed last of the three: drop it,
    # so "a" and "b" hit; the second "c" misses and the last "a" hits. Misses: a, b,
    # c, c = 4 bytes, where LRU would miss all 7.
    requests = ["a", "b", "c", "a", "b", "c", "a"]
    assert bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=2) == 4


def test_the_window_counts_only_requests_from_its_start() -> None:
    sizes = {"a": 2, "b": 3}
    requests = ["a", "b", "a", "b"]
    assert bounds.compulsory_bytes(requests, sizes, count_from=2) == 0
    assert bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=5, count_from=2) == 0
    assert bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=3, count_from=2) >= 1


@given(
    requests=st.lists(st.sampled_from("abcde"), min_size=1, max_size=9),
    size_list=st.lists(st.integers(min_value=1, max_value=6), min_size=5, max_size=5),
    capacity=st.integers(min_value=6, max_value=14),
)
@settings(max_examples=80, deadline=None)
def test_the_pooled_bound_never_exceeds_the_whole_file_optimum_or_lru(
    requests: list[str], size_list: list[int], capacity: int
) -> None:
    sizes = dict(zip("abcde", size_list))
    bound = bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity)
    assert bounds.compulsory_bytes(requests, sizes) <= bound
    assert bound <= best_whole_file_bytes(requests, sizes, capacity)
    assert bound <= lru_bytes(requests, sizes, capacity)


@pytest.mark.parametrize("key", policies.POLICIES)
def test_no_policy_downloads_less_than_the_pooled_bound(key: str) -> None:
    args = cli.parse_args(
        ["--models", "80", "--loras", "40", "--agents", "3", "--duration-s", "900", "--disk-gb", "15",
         "--vram-gb", "16", "--ram-gb", "10", "--interruptions", "2", "--load", "0.5"]
    )
    trace, fleet = cli.build(args)
    sizes = {a.name: a.size_bytes for a in trace.catalog.artifacts}
    b = bounds.compute_bounds(
        [j.artifacts for j in trace.jobs], sizes, capacity_bytes=fleet.disk_bytes * fleet.n_agents, baked=fleet.baked
    )
    result = engine.simulate(trace, fleet, lambda: policies.make_policy(key))
    assert 0 < b.compulsory_bytes <= b.pooled_bytes <= result.bytes_downloaded


@given(
    requests=st.lists(st.sampled_from("abcde"), min_size=1, max_size=12),
    size_list=st.lists(st.integers(min_value=1, max_value=6), min_size=5, max_size=5),
    capacity=st.integers(min_value=6, max_value=14),
    losses=st.lists(st.tuples(st.integers(0, 12), st.sampled_from([0.25, 0.5, 1.0])), max_size=3),
)
@settings(max_examples=80, deadline=None)
def test_interruption_losses_only_ever_add_misses_and_a_total_loss_empties_the_cache(
    requests: list[str], size_list: list[int], capacity: int, losses: list[tuple[int, float]]
) -> None:
    sizes = dict(zip("abcde", size_list))
    plain = bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity)
    lossy = bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity, losses=losses)
    assert plain <= lossy <= sum(sizes[k] for k in requests)
    assert bounds.pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity, losses=[]) == plain


def test_a_total_loss_before_a_repeat_makes_it_miss_again() -> None:
    sizes = {"a": 4}
    assert bounds.pooled_optimal_bytes(["a", "a"], sizes, capacity_bytes=10) == 4
    assert bounds.pooled_optimal_bytes(["a", "a"], sizes, capacity_bytes=10, losses=[(1, 1.0)]) == 8
    assert bounds.pooled_optimal_bytes(["a", "a"], sizes, capacity_bytes=10, losses=[(1, 0.5)]) == 6


def test_the_pooled_frequency_cache_keeps_the_model_in_steady_use_where_lru_drops_it() -> None:
    sizes = {"steady": 5, "x": 5, "y": 5}
    requests = ["steady", "steady", "steady", "x", "y", "steady"]
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert bounds.pooled_lru_bytes(requests, sizes, capacity_bytes=10) == 20
    assert bounds.pooled_frequency_bytes(requests, times, sizes, capacity_bytes=10) == 15
    assert bounds.pooled_frequency_bytes(requests, times, sizes, capacity_bytes=10, half_life_s=None) == 20
