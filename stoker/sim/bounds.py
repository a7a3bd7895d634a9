"""Lower bounds on the bytes any policy must download for a trace.

- Compulsory: every artifact requested at least once (and not baked into the
  image) is downloaded at least once.
- Pooled cache: one cache as large as the whole fleet's disk, serving the trace's
  requests in submit order with optimal replacement. Whole-file optimal replacement
  with files of different sizes is NP-hard, so this computes the optimum of its
  byte-level relaxation instead: farthest-next-use eviction where a file may be
  evicted partially. That is Belady's algorithm on the sequence of bytes, which is
  optimal for it, and every whole-file policy is a feasible byte-level one, so the
  figure is a true lower bound on the whole-file optimum (it is usually within a few
  percent of it).

Both ignore interruptions (which destroy cached copies) and in-flight reordering; a
scheduler that reorders jobs could in principle go below the pooled figure.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Bounds",
    "compulsory_bytes",
    "compute_bounds",
    "pooled_lru_bytes",
    "pooled_optimal_bytes",
    "request_sequence",
]


@dataclass(frozen=True)
class Bounds:
    compulsory_bytes: int
    pooled_bytes: int
    pooled_capacity_bytes: int
    window_compulsory_bytes: int = 0
    """The same bounds counted only for jobs submitted in the measurement window."""
    window_pooled_bytes: int = 0
    pooled_lru_bytes: int = 0
    """Not a bound: one fleet-sized LRU cache, to separate pooling from replacement."""


def request_sequence(jobs: Iterable[Sequence[str]], *, exclude: Iterable[str] = ()) -> list[str]:
    """Artifact keys in request order, dropping `exclude` (baked-in ones)."""
    skip = set(exclude)
    return [key for artifacts in jobs for key in artifacts if key not in skip]


def compulsory_bytes(requests: Sequence[str], sizes: Mapping[str, int], *, count_from: int = 0) -> int:
    """Bytes of the artifacts first requested at index `count_from` or later."""
    seen = set(requests[:count_from])
    return sum(sizes[k] for k in set(requests[count_from:]) - seen)


def pooled_optimal_bytes(
    requests: Sequence[str], sizes: Mapping[str, int], *, capacity_bytes: int, count_from: int = 0
) -> int:
    """Bytes missed by fractional Belady over `requests` with a cache of `capacity_bytes`.

    Only misses of requests at index `count_from` or later are counted (the earlier
    ones warm the cache), which bounds a measurement window that starts there.
    """
    n = len(requests)
    next_use = [math.inf] * n
    last_seen: dict[str, int] = {}
    for i in range(n - 1, -1, -1):
        key = requests[i]
        next_use[i] = last_seen.get(key, math.inf)
        last_seen[key] = i
    cached: dict[str, float] = {}  # key -> cached bytes (fractional)
    current_next: dict[str, float] = {}
    heap: list[tuple[float, str]] = []  # (-next use, key), lazily invalidated
    total = 0.0
    missed = 0.0
    for i, key in enumerate(requests):
        size = sizes[key]
        have = cached.get(key, 0.0)
        if i >= count_from:
            missed += size - have
        total += size - have
        cached[key] = float(size)
        current_next[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
        while total > capacity_bytes + 1e-6 and heap:
            neg_next, victim = heap[0]
            if current_next.get(victim) != -neg_next or cached.get(victim, 0.0) <= 0:
                heapq.heappop(heap)
                continue
            excess = total - capacity_bytes
            take = min(excess, cached[victim])
            cached[victim] -= take
            total -= take
            if cached[victim] <= 1e-9:
                del cached[victim]
                del current_next[victim]
                heapq.heappop(heap)
    return int(math.ceil(missed - 1e-6))


def pooled_lru_bytes(requests: Sequence[str], sizes: Mapping[str, int], *, capacity_bytes: int) -> int:
    """Bytes missed by one LRU cache of `capacity_bytes` (a reference point, not a bound):
    what a perfectly pooled fleet would download with the agents' own replacement rule."""
    cache: OrderedDict[str, int] = OrderedDict()
    used = 0
    missed = 0
    for key in requests:
        if key in cache:
            cache.move_to_end(key)
            continue
        size = sizes[key]
        missed += size
        cache[key] = size
        used += size
        while used > capacity_bytes:
            _, dropped = cache.popitem(last=False)
            used -= dropped
    return missed


def compute_bounds(
    jobs: Sequence[Sequence[str]],
    sizes: Mapping[str, int],
    *,
    capacity_bytes: int,
    baked: Iterable[str] = (),
    window_from_job: int = 0,
) -> Bounds:
    """Bounds for `jobs` (artifact lists in submit order); the window starts at job index `window_from_job`."""
    baked = tuple(baked)
    requests = request_sequence(jobs, exclude=baked)
    start = len(request_sequence(jobs[:window_from_job], exclude=baked))
    return Bounds(
        compulsory_bytes=compulsory_bytes(requests, sizes),
        pooled_bytes=pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity_bytes),
        pooled_capacity_bytes=capacity_bytes,
        window_compulsory_bytes=compulsory_bytes(requests, sizes, count_from=start),
        window_pooled_bytes=pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity_bytes, count_from=start),
        pooled_lru_bytes=pooled_lru_bytes(requests, sizes, capacity_bytes=capacity_bytes),
    )
