"""Weights on the device: VRAM tier first, then the RAM tier, then the file on disk (I/O)."""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator

import torch

from stoker.agent import safetensors_header
from stoker.agent.hot_tiers import RamTier, VramTier
from stoker.agent.loader import LoadedModel, Loader

log = logging.getLogger(__name__)


class Weights:
    """Hands out loaded models, loading through the fastest tier that has them.

    On a GPU, models evicted from VRAM are demoted to pinned RAM so the next load is one
    DMA. On a CPU-only agent the device tier already lives in host memory, so there is
    no separate RAM tier.
    """

    def __init__(self, *, loader: Loader, device: torch.device, vram_budget_bytes: int, ram_budget_bytes: int) -> None:
        self.loader = loader
        self.device = device
        self.ram = RamTier(ram_budget_bytes) if device.type == "cuda" and ram_budget_bytes > 0 else None
        self.vram = VramTier(vram_budget_bytes, on_evict=self._demote)
        self.on_evict: list[Callable[[str], None]] = []
        """Called with the key of every model leaving VRAM (runners drop modules built on it)."""

    def _demote(self, key: str, model: LoadedModel) -> None:
        for callback in self.on_evict:
            callback(key)
        if self.ram is not None:
            self.ram.put(key, model)

    def tier_of(self, key: str) -> str:
        if key in self.vram:
            return "vram"
        if self.ram is not None and key in self.ram:
            return "ram"
        return "disk"

    @contextlib.contextmanager
    def use(self, key: str, path: pathlib.Path) -> Iterator[tuple[LoadedModel, str]]:
        """The model for `key` on the device, pinned in VRAM while the block runs, and the
        tier it came from (vram, ram or disk)."""
        tier = self.tier_of(key)
        if tier == "ram":
            assert self.ram is not None
            ram = self.ram

            def load() -> LoadedModel:
                return ram.to_device(key, self.device)
        else:
            def load() -> LoadedModel:
                return self.loader.load(path, device=self.device)
        size = safetensors_header.read_header(path).data_size_bytes
        with self.vram.acquire(key, load=load, size_bytes=size) as model:
            yield model, tier

    def drop(self, key: str) -> None:
        """Forget a model in every hot tier (its file changed or was removed)."""
        self.vram.evict(key)
        if self.ram is not None:
            self.ram.evict(key)
