"""Faults of the agent itself (its disk, its memory), kept apart from faults of model sources.

A full cache volume, a failing disk or exhausted memory say nothing about the model being
fetched: the job moves to another agent (a retryable failure that uses none of its
attempts), the model's source is not blamed, and the agent reports itself degraded in its
CacheAgent status (`degraded`, `localFaults`) until it sees the resource work again: a
download written to the end, a probe write that succeeds, a load that fits. A fault not seen
again for `ttl_s` is dropped too, so one bad moment does not degrade an agent for good.

`classify` maps an exception to a local-fault reason (or None when it is not one); it is
pure. `AgentHealth` is the small mutable record the disk tier, the job loop and the status
report share; all of its methods run on the agent's event loop (or hold no shared state).
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections.abc import Callable

__all__ = ["AgentHealth", "DISK_ERROR", "DISK_FULL", "FaultView", "LOCAL_FAULT_REASONS", "OUT_OF_MEMORY", "classify"]

DISK_FULL = "DiskFull"
DISK_ERROR = "DiskError"
OUT_OF_MEMORY = "OutOfMemory"
LOCAL_FAULT_REASONS = frozenset({DISK_FULL, DISK_ERROR, OUT_OF_MEMORY})
"""Attempt-failure reasons that are faults of the agent, not of the job or the model's source."""

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_MEMORY = frozenset({errno.ENOMEM})


def classify(exc: BaseException | None = None, *, os_errno: int | None = None) -> str | None:
    """The local-fault reason of an exception (or a bare errno), else None. Pure."""
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY
    code = os_errno if os_errno is not None else (exc.errno if isinstance(exc, OSError) else None)
    if code is None:
        return DISK_ERROR if isinstance(exc, OSError) else None
    if code in _FULL:
        return DISK_FULL
    if code in _MEMORY:
        return OUT_OF_MEMORY
    return DISK_ERROR


def advice(reason: str) -> str:
    """What an operator of the fleet does about a local fault."""
    return {
        DISK_FULL: "free space on the agent's cache volume or lower its disk budget (agent.cache.budget) below "
                   "the volume's size",
        DISK_ERROR: "check the agent's cache volume (the node's disk); the pod may need to move",
        OUT_OF_MEMORY: "give the agent pod more memory or lower its RAM/VRAM budgets",
    }.get(reason, "check the agent's node")


@dataclasses.dataclass(frozen=True)
class FaultView:
    reason: str
    message: str
    since: float
    last_seen: float


class AgentHealth:
    """The local faults an agent has seen lately (thread-safe: loads run in worker threads)."""

    def __init__(self, *, ttl_s: float = 300.0, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self.on_change = on_change
        self._faults: dict[str, FaultView] = {}
        self._lock = threading.Lock()

    def fault(self, reason: str, message: str) -> None:
        """Note a local fault (a new one, or the same again)."""
        now = self._clock()
        with self._lock:
            old = self._faults.get(reason)
            self._faults[reason] = FaultView(reason, message[:1000], old.since if old else now, now)
        if old is None and self.on_change is not None:
            self.on_change()

    def clear(self, *reasons: str) -> None:
        """The resource works again (a write, a load that fitted)."""
        with self._lock:
            gone = [r for r in reasons if self._faults.pop(r, None) is not None]
        if gone and self.on_change is not None:
            self.on_change()

    def has(self, reason: str) -> bool:
        return any(f.reason == reason for f in self.faults())

    def faults(self) -> tuple[FaultView, ...]:
        """The current faults, oldest first (those not seen for `ttl_s` are dropped)."""
        now = self._clock()
        with self._lock:
            for reason in [r for r, f in self._faults.items() if now - f.last_seen > self.ttl_s]:
                del self._faults[reason]
            return tuple(sorted(self._faults.values(), key=lambda f: (f.since, f.reason)))

    @property
    def degraded(self) -> bool:
        return bool(self.faults())
