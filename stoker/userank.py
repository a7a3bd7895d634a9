"""Use-frequency ranks, one definition for the agents, placement and the operator (pure, no I/O).

A rank is a time in seconds, on the Unix clock wherever Stoker reports one:
`h * log2(sum of 2 ** (t / h))` over the times `t` of the uses counted, `h` being the
half-life (`DEFAULT_HALF_LIFE_S`, 2 h). One use ranks at its own time; `n` uses at about
the same time rank `h * log2(n)` later (a second use moves it by `h`); every use loses half
its weight every `h`. Decay is relative, so comparing two ranks compares decayed use counts
at any moment, and the decayed count at `now` is `2 ** ((rank - now) / h)`.

Who keeps which rank:
- an agent ranks each entry of its disk tier by the jobs that used it there and evicts the
  lowest first (`stoker.agent.disk_cache`), and reports it (CacheAgent `models[].rank`);
- placement reads those ranks to value what a load would evict (`AgentView.disk_rank_s`);
- the operator keeps a `FleetRank` per model over every GenerationJob created for it,
  anywhere in the fleet, and publishes it (ModelCache `useRank`); an agent that downloads
  the model starts its copy from it, so a model in steady use elsewhere is not evicted as a
  one-off after it moved here (an interruption, a new agent).

Each job is counted once, also across operator restarts. The published rank comes with
`counted_through_s` (ModelCache `useRankCountedThrough`): the creation time of the newest job
it counts. A restarted operator starts from the published pair and counts only jobs created
after that time (`FleetRank.seeded`); within one process the caller counts each job (by uid)
once. A job created no later than that time which the previous operator had not seen yet
when it published (creation times have one-second resolution, watch events lag) is not
counted after the restart: the rank can miss a few uses, never count one twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_HALF_LIFE_S",
    "PUBLISH_MIN_CHANGE_S",
    "FleetRank",
    "add_use",
    "is_publish_due",
]

DEFAULT_HALF_LIFE_S = 7200.0
"""Half-life of a use: the agents' disk ranks, placement's victim values and the fleet rank share it."""

PUBLISH_MIN_CHANGE_S = 60.0
"""A published fleet rank is rewritten once the counted one moved at least this far from it:
60 s on a 2 h half-life is under 0.6 % of the decayed use count, and a model in steady use
(whose rank moves about one second per second) is rewritten about once a minute, not per job."""


def add_use(rank_s: float | None, now: float, *, half_life_s: float) -> float:
    """The rank after one more use at `now` (module docstring); `None` is no use yet.

    Symmetric in its two times, so it also merges two ranks. Computed from the larger
    one, so that no power of two overflows whatever the clock's epoch."""
    if rank_s is None:
        return now
    high, low = (rank_s, now) if rank_s >= now else (now, rank_s)
    return high + half_life_s * math.log2(1.0 + 2.0 ** ((low - high) / half_life_s))


@dataclass(frozen=True, slots=True)
class FleetRank:
    """One model's use rank over the whole fleet, as the operator counts and publishes it."""

    rank_s: float | None = None
    """The rank of the jobs counted (module docstring); None before the first."""
    counted_through_s: float | None = None
    """Creation time of the newest job counted (published beside the rank)."""
    seeded_through_s: float | None = None
    """`counted_through_s` of the published value this one started from: jobs created at or
    before it are in that value already and are not counted again."""
    half_life_s: float = DEFAULT_HALF_LIFE_S

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"FleetRank.half_life_s must be > 0, got {self.half_life_s!r}")

    @classmethod
    def seeded(cls, *, rank_s: float | None, counted_through_s: float | None,
               half_life_s: float = DEFAULT_HALF_LIFE_S) -> FleetRank:
        """Start from a published pair (a restarted or newly elected operator). A rank
        published without its time is ignored: nothing would say which jobs it counts."""
        if rank_s is None or counted_through_s is None or not (math.isfinite(rank_s) and math.isfinite(counted_through_s)):
            return cls(half_life_s=half_life_s)
        return cls(rank_s=rank_s, counted_through_s=counted_through_s, seeded_through_s=counted_through_s,
                   half_life_s=half_life_s)

    def is_counted(self, created_s: float) -> bool:
        """True when a job created at `created_s` is already in the seed this rank started from."""
        return self.seeded_through_s is not None and created_s <= self.seeded_through_s

    def count(self, created_s: float) -> FleetRank:
        """One more job, created at `created_s` (the caller counts each job once)."""
        if self.is_counted(created_s):
            return self
        through = created_s if self.counted_through_s is None else max(self.counted_through_s, created_s)
        return dataclasses.replace(self, rank_s=add_use(self.rank_s, created_s, half_life_s=self.half_life_s),
                                   counted_through_s=through)

    def count_all(self, created_s: Iterable[float]) -> FleetRank:
        out = self
        for t in created_s:
            out = out.count(t)
        return out


def is_publish_due(published_rank_s: float | None, rank_s: float | None, *,
                   min_change_s: float = PUBLISH_MIN_CHANGE_S) -> bool:
    """Whether the counted `rank_s` should replace the published one now (see `PUBLISH_MIN_CHANGE_S`)."""
    if rank_s is None:
        return False
    return published_rank_s is None or abs(rank_s - published_rank_s) >= min_change_s
