"""Hot replicas on this agent: models the operator ordered kept loaded (I/O).

A hold at tier `vram` keeps the model in the VRAM tier (on a CPU-only agent that tier is
host memory) with a standing reference, so LRU eviction never takes it while the order
stands; jobs that use the model find it there (a `vram` hit). A hold at tier `ram` keeps
a pinned host copy in the RAM tier (an agent without one keeps it in its device tier,
which is host memory there too).

Releasing a hold drops the reference and unloads the model when no job is using it, so
the ModelCache's count of loaded copies follows the order; on a GPU agent the model
leaves VRAM the usual way (demoted to the RAM tier). Loading and unloading block: call
them from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import threading
from typing import Any, Literal

log = logging.getLogger(__name__)

HotTier = Literal["vram", "ram"]


class HotHolds:
    """The standing references of the hot holds, per model key."""

    def __init__(self, weights: Any) -> None:
        self.weights = weights
        self._lock = threading.Lock()
        self._held: dict[str, tuple[HotTier, contextlib.ExitStack]] = {}

    def tier_of(self, key: str) -> HotTier | None:
        """The tier `key` is held loaded in, or None."""
        with self._lock:
            entry = self._held.get(key)
            return entry[0] if entry is not None else None

    def held(self) -> dict[str, HotTier]:
        """Key -> tier of every model held loaded now."""
        with self._lock:
            return {k: t for k, (t, _) in self._held.items()}

    def load(self, key: str, path: pathlib.Path, tier: HotTier) -> None:
        """Load `key` from `path` into `tier` and keep it there until `release`. Blocking.

        Raises what loading raises (InsufficientCache when the tier's budget cannot make room
        without evicting models in use, HeaderError, DeviceOutOfMemory, OSError)."""
        current = self.tier_of(key)
        if current == tier:
            return
        if current is not None:
            self.release(key, unload=False)
        stack = contextlib.ExitStack()
        ram = getattr(self.weights, "ram", None)
        if tier == "ram" and ram is not None:
            stack.enter_context(ram.keep(key, path, loader=self.weights.loader))
        else:
            stack.enter_context(self.weights.use(key, path))
        with self._lock:
            old = self._held.pop(key, None)
            self._held[key] = (tier, stack)
        if old is not None:  # a concurrent load of the same key won: keep one reference
            old[1].close()
        log.info("hot replica: %s is loaded in %s and kept there", key, tier)

    def release(self, key: str, *, unload: bool = True) -> bool:
        """Stop keeping `key` loaded; with `unload`, also unload it unless a job uses it. Blocking.
        False when it was not held."""
        with self._lock:
            entry = self._held.pop(key, None)
        if entry is None:
            return False
        tier, stack = entry
        stack.close()
        if unload:
            self._unload(key, tier)
        log.info("hot replica: %s is no longer kept in %s", key, tier)
        return True

    def release_all(self) -> None:
        for key in list(self.held()):
            self.release(key, unload=False)

    def _unload(self, key: str, tier: HotTier) -> None:
        from stoker.agent.hot_tiers import ModelInUse

        ram = getattr(self.weights, "ram", None)
        target = ram if tier == "ram" and ram is not None else self.weights.vram
        try:
            target.evict(key)
        except ModelInUse:
            log.info("hot replica: %s stays loaded while jobs use it; it is an ordinary cache entry now", key)
