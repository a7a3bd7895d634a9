"""Weights on the device: VRAM tier first, then the RAM tier, then the file on disk (I/O)."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from stoker.agent import safetensors_header
from stoker.agent.disk_cache import InsufficientCache
from stoker.agent.hot_tiers import NotResident, RamTier, VramTier
from stoker.agent.loader import FileIdentity, LoadedModel, Loader

log = logging.getLogger(__name__)


class Weights:
    """Hands out loaded models, loading through the fastest tier that has them.

    On a GPU, models evicted from VRAM are kept as pinned RAM copies so the next load is
    one DMA. On a CPU-only agent the device tier already lives in host memory, so there
    is no separate RAM tier (``ram_tier=True`` forces one, for tests).

    Every tier entry remembers the identity of the file it was read from (device, inode,
    size, modification time). A model whose file has since been replaced, e.g. because
    its source changed and the disk store downloaded it again, is never served: the
    caller passes the path the store returns, and a mismatch loads the new file.
    """

    def __init__(
        self,
        *,
        loader: Loader,
        device: torch.device,
        vram_budget_bytes: int,
        ram_budget_bytes: int,
        ram_tier: bool | None = None,
    ) -> None:
        self.loader = loader
        self.device = device
        wants_ram = device.type == "cuda" if ram_tier is None else ram_tier
        self.ram = RamTier(ram_budget_bytes, on_evict=self._ram_evicted) if wants_ram and ram_budget_bytes > 0 else None
        self.vram = VramTier(vram_budget_bytes, on_evict=self._demote, on_stale=self._forget)
        self.on_evict: list[Callable[[str], None]] = []
        """Called with the key of every model leaving VRAM (runners drop modules built on it)."""
        self.on_ram_evict: list[Callable[[str], None]] = []
        """Called with the key of every host copy evicted from the RAM tier."""
        self._lock = threading.RLock()  # re-entered when a finished future's callback runs at once
        self._deferred: dict[str, str] = {}  # key -> path: re-read into RAM once the current load is done
        self._background: set[Future[None]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._stage_loader: Loader | None = None

    # -- tiers

    def tier_of(self, key: str, path: pathlib.Path | None = None) -> str:
        """Where ``key`` would load from now: vram, ram or disk (with ``path``: only
        copies read from the file now at ``path`` count)."""
        identity = _identity_or_none(path) if path is not None else None
        if self.vram.holds(key, identity):
            return "vram"
        if self.ram is not None and self.ram.holds(key, identity):
            return "ram"
        return "disk"

    @contextlib.contextmanager
    def use(self, key: str, path: pathlib.Path) -> Iterator[tuple[LoadedModel, str]]:
        """The model for ``key`` (read from the file at ``path``) on the device, pinned in
        VRAM while the block runs, and the tier it came from (vram, ram or disk)."""
        identity = FileIdentity.of(path)
        size = safetensors_header.read_header(path).data_size_bytes
        came_from = "vram"

        def load() -> LoadedModel:
            nonlocal came_from
            if self.ram is not None:
                try:
                    model = self.ram.to_device(key, self.device, identity=identity)
                except NotResident:
                    pass  # never staged, evicted meanwhile, or read from an older file
                else:
                    came_from = "ram"
                    return model
            came_from = "disk"
            return self.loader.load(path, device=self.device)

        with contextlib.ExitStack() as stack:
            try:
                model = stack.enter_context(self.vram.acquire(key, load=load, size_bytes=size, identity=identity))
            finally:
                self._flush_deferred()  # demotions wait until the load they made room for is done
            yield model, came_from

    def stage(self, key: str, path: pathlib.Path) -> None:
        """Read the model for ``key`` into the RAM tier as a pinned host copy, leaving VRAM
        alone, so that a later ``use`` is one large copy to the GPU.

        Meant for the next job's weights while the current generation runs. Does nothing
        when a copy of the current file is already in RAM or VRAM (or loading there), and
        nothing when the RAM budget cannot fit it. Without a RAM tier (a CPU agent) it
        asks the kernel to read the file into the page cache in the background. Blocks
        while reading: call it from a worker thread. Raises HeaderError or LoaderError
        (OSError when the file is gone) like ``use`` would.
        """
        identity = FileIdentity.of(path)
        if self.vram.holds(key, identity) or self.vram.loading(key):
            return
        if self.ram is None:
            _readahead(path)
            return
        if self.ram.holds(key, identity):
            return
        try:
            self.ram.put_file(key, path, loader=self._staging_loader(), identity=identity)
        except InsufficientCache as err:
            log.info("not staging %s in RAM: %s", key, err)

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for background work (models leaving VRAM being re-read into RAM); False on timeout.

        A seam for tests and benchmarks, which need that work finished before they look."""
        with self._lock:
            pending = set(self._background)
        return not wait(pending, timeout=timeout_s).not_done

    def close(self) -> None:
        """Stop background work and release the staging reader threads."""
        with self._lock:
            pool, self._pool = self._pool, None
            stage_loader, self._stage_loader = self._stage_loader, None
            self._deferred.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if stage_loader is not None:
            stage_loader.close()

    # -- leaving VRAM

    def _ram_evicted(self, key: str, _model: LoadedModel) -> None:
        for callback in self.on_ram_evict:
            callback(key)

    def _forget(self, key: str, _model: LoadedModel) -> None:
        for callback in self.on_evict:
            callback(key)

    def _demote(self, key: str, model: LoadedModel) -> None:
        """Keep a model leaving VRAM in RAM, without slowing the load that evicted it.

        Copying it back from the GPU would run inside the next job's load (allocating and
        page-locking gigabytes of fresh host memory costs more than the copy). While its
        file is unchanged on disk, it is read from there into RAM in the background once
        that load is done; only a model whose file is gone is copied out of VRAM at once.
        """
        self._forget(key, model)
        if self.ram is None or self.ram.holds(key, model.identity):
            return  # no RAM tier, or it came from RAM and the copy is still there
        current = _identity_or_none(model.path) if model.path else None
        if model.identity is not None and current == model.identity:
            with self._lock:
                self._deferred[key] = str(model.path)
            return
        if model.identity is not None and current is not None:
            return  # the file changed: this copy is stale
        self.ram.put(key, model)  # the file is gone: this is the last copy

    def _flush_deferred(self) -> None:
        with self._lock:
            pending, self._deferred = self._deferred, {}
            for key, path in pending.items():
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stoker-stage")
                future = self._pool.submit(self._restage, key, pathlib.Path(path))
                self._background.add(future)
                future.add_done_callback(self._finished)

    def _finished(self, future: Future[None]) -> None:
        with self._lock:
            self._background.discard(future)

    def _restage(self, key: str, path: pathlib.Path) -> None:
        try:
            self.stage(key, path)
        except Exception as err:  # noqa: BLE001 - best effort: the file on disk remains
            log.warning("could not keep %s in RAM after it left VRAM: %s", key, err)

    def _staging_loader(self) -> Loader:
        """A loader of its own, so staging never waits for (or holds up) device loads."""
        with self._lock:
            if self._stage_loader is None:
                self._stage_loader = Loader(self.loader.options)
            return self._stage_loader


def _identity_or_none(path: str | os.PathLike[str]) -> FileIdentity | None:
    try:
        return FileIdentity.of(path)
    except OSError:
        return None


def _readahead(path: pathlib.Path) -> None:
    """Ask the kernel to start reading the file into the page cache (returns at once)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
