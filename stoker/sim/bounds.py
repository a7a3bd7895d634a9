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

Two references (not bounds) help read a fleet's figure against them:

- the same pooled optimum when every interruption destroys its agent's share (1/n)
  of every cached file, which is what losing a pod costs a perfectly pooled fleet;
- one pooled cache evicting by the agents' own rule (the real `DiskCacheState`,
  frequency ranks): what the fleet's rule would do with perfect pooling.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from stoker.agent.disk_cache import DiskCacheState
from stoker.userank import DEFAULT_HALF_LIFE_S

__all__ = [
    "Bounds",
    "compulsory_bytes",
    "compute_bounds",
    "pooled_frequency_bytes",
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
    pooled_lossy_bytes: int = 0
    """Not a bound: the pooled optimum when each interruption destroys 1/n of every cached file."""
    pooled_frequency_bytes: int = 0
    """Not a bound: one fleet-sized cache evicting by the agents' frequency rule."""


def request_sequence(jobs: Iterable[Sequence[str]], *, exclude: Iterable[str] = ()) -> list[str]:
    """Artifact keys in request order, dropping `exclude` (baked-in ones)."""
    skip = set(exclude)
    return [key for artifacts in jobs for key in artifacts if key not in skip]


def compulsory_bytes(requests: Sequence[str], sizes: Mapping[str, int], *, count_from: int = 0) -> int:
    """Bytes of the artifacts first requested at index `count_from` or later."""
    seen = set(requests[:count_from])
    return sum(sizes[k] for k in set(requests[count_from:]) - seen)


def pooled_optimal_bytes(
    requests: Sequence[str], sizes: Mapping[str, int], *, capacity_bytes: int, count_from: int = 0,
    losses: Sequence[tuple[int, float]] = (),
) -> int:
    """Bytes missed by fractional Belady over `requests` with a cache of `capacity_bytes`.

    Only misses of requests at index `count_from` or later are counted (the earlier
    ones warm the cache), which bounds a measurement window that starts there.
    `losses` are (request index, fraction): before that request the cache loses that
    fraction of every file it holds (an interruption); with losses the figure is a
    reference, no longer a bound.
    """
    pending_losses = sorted(losses)
    next_loss = 0
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
        while next_loss < len(pending_losses) and pending_losses[next_loss][0] <= i:
            keep = 1.0 - pending_losses[next_loss][1]
            next_loss += 1
            for k in cached:
                cached[k] *= keep
            total *= keep
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


def pooled_frequency_bytes(
    requests: Sequence[str], times: Sequence[float], sizes: Mapping[str, int], *, capacity_bytes: int,
    half_life_s: float | None = DEFAULT_HALF_LIFE_S,
) -> int:
    """Bytes missed by one `DiskCacheState` of `capacity_bytes` serving `requests` at `times`
    (a reference point, not a bound): the agents' own eviction rule, perfectly pooled."""
    state = DiskCacheState(budget_bytes=capacity_bytes, half_life_s=half_life_s)
    missed = 0
    for key, now in zip(requests, times):
        state = state.pin(key, now=now)
        if not state.has(key):
            size = sizes[key]
            missed += size
            if size > capacity_bytes:
                state = state.unpin(key, now=now)
                continue
            state, _, _ = state.reserve(key, size, now=now)
            state = state.commit(key, now=now)
        state = state.unpin(key, now=now)
    return missed


def compute_bounds(
    jobs: Sequence[Sequence[str]],
    sizes: Mapping[str, int],
    *,
    capacity_bytes: int,
    baked: Iterable[str] = (),
    window_from_job: int = 0,
    times: Sequence[float] | None = None,
    interruptions: Sequence[float] = (),
    agents: int = 1,
) -> Bounds:
    """Bounds for `jobs` (artifact lists in submit order); the window starts at job index `window_from_job`.

    With the jobs' submit `times`, also the references: the pooled optimum losing 1/`agents`
    of its content at each of the `interruptions` (times), and the pooled frequency cache."""
    baked = tuple(baked)
    requests = request_sequence(jobs, exclude=baked)
    start = len(request_sequence(jobs[:window_from_job], exclude=baked))
    lossy = frequency = 0
    if times is not None:
        skip = set(baked)
        request_times = [t for artifacts, t in zip(jobs, times) for key in artifacts if key not in skip]
        losses = [(bisect.bisect_left(request_times, t), 1.0 / max(1, agents)) for t in interruptions]
        lossy = pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity_bytes, losses=losses)
        frequency = pooled_frequency_bytes(requests, request_times, sizes, capacity_bytes=capacity_bytes)
    return Bounds(
        compulsory_bytes=compulsory_bytes(requests, sizes),
        pooled_bytes=pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity_bytes),
        pooled_capacity_bytes=capacity_bytes,
        window_compulsory_bytes=compulsory_bytes(requests, sizes, count_from=start),
        window_pooled_bytes=pooled_optimal_bytes(requests, sizes, capacity_bytes=capacity_bytes, count_from=start),
        pooled_lru_bytes=pooled_lru_bytes(requests, sizes, capacity_bytes=capacity_bytes),
        pooled_lossy_bytes=lossy,
        pooled_frequency_bytes=frequency,
    )
