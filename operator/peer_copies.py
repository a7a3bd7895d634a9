"""Which copies the fleet holds more than once, for agents in the peer tier (pure, no I/O).

An agent in the peer tier can fetch back any model another Ready agent of the tier holds, at
LAN speed and without the source; a copy that is the fleet's last can come back only from the
source. So when an agent must make room, a duplicate is the cheaper loss: the operator tells
each agent which of its copies are duplicates (CacheAgent spec.duplicates), and the agent's
eviction takes them first (`DiskCacheState.with_duplicates`). Only complete copies count
(a download in progress may still fail), and baked-in models are left out (never evicted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from stoker.operator.placement import AgentView

__all__ = ["plan_duplicates"]


def plan_duplicates(agents: Iterable[AgentView]) -> Mapping[str, frozenset[str]]:
    """For every agent in the peer tier: the models on its disk that some other Ready agent of
    the tier also holds on disk. Agents outside the tier, or not Ready, get an empty set."""
    tier = [a for a in agents if a.serves_peers]
    holders: dict[str, int] = {}
    for a in tier:
        if a.ready:
            for key in a.disk - a.preloaded:
                holders[key] = holders.get(key, 0) + 1
    out: dict[str, frozenset[str]] = {}
    for a in tier:
        mine = a.disk - a.preloaded
        if not a.ready:
            out[a.name] = frozenset()
            continue
        out[a.name] = frozenset(k for k in mine if holders.get(k, 0) > 1)
    return out
