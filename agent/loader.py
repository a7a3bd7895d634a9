"""Load a safetensors file into one buffer on a device; every tensor is a view into it.

The header is validated first (``safetensors_header``). Then the file's data region
lands in a single allocation:

* **CUDA**: one device allocation. Reader threads read ~64 MiB chunks into a ring of
  pinned host buffers that the ``Loader`` allocates once and reuses for every load; a
  dedicated copy stream moves each chunk to the device while the next ones are read.
  A CUDA event recorded after each chunk's copy guards the ring slot: the next reader of
  that slot waits for it before overwriting. No per-tensor host-to-device copies.
* **CPU**: either the same chunked parallel reads straight into one host buffer
  (optionally pinned, which is what the RAM tier wants), or a private memory map of the
  file, with any pages not yet cached read in parallel before returning.
  ``LoadOptions.cpu_strategy`` picks; see the measurements next to ``DEFAULT_CPU_STRATEGY``.

Tensors are dtype views at their offsets; only a tensor whose offset is not a multiple
of its item size is cloned (kernels assume natural alignment).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import functools
import logging
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stoker.agent import safetensors_header
from stoker.agent.safetensors_header import Header

if TYPE_CHECKING:
    from os import PathLike

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CPU_STRATEGY",
    "CpuStrategy",
    "DeviceOutOfMemory",
    "FileIdentity",
    "LoadOptions",
    "LoadSource",
    "LoadTimings",
    "LoadedModel",
    "Loader",
    "LoaderError",
    "HostPin",
    "allocate_host_buffer",
    "build_views",
    "load_file",
    "torch_dtype",
]

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_CHUNK_BYTES = 64 * MIB
#: Offsets, lengths and buffer addresses of O_DIRECT reads are multiples of this.
DIRECT_IO_ALIGN_BYTES = 4096
_MADV_POPULATE_READ = 22  # Linux 5.14+; not exported by Python 3.11's mmap module


class CpuStrategy(enum.StrEnum):
    """How a CPU load gets the data region into memory."""

    READ = "read"  # parallel chunked reads into one (optionally pinned) host buffer
    MMAP = "mmap"  # private mapping of the file, pages populated before returning


# Measured with `.venv/bin/python bench/loader_bench.py --size-gb 3 --runs 5` on the 2-core,
# 24 GiB test machine (virtio disk, ext4), 777 fp16 tensors, medians, every load
# followed by touching each page of the result (BENCHMARKS.md has the full table):
#   warm page cache: mmap 114 GB/s, parallel reads into one buffer 2.4 GB/s,
#     safetensors.load_file 52 GB/s. Mapping cached pages only fills page tables;
#     read() copies every byte and first faults in fresh anonymous memory.
#   cold: mmap 3.0 GB/s, parallel reads 1.5 GB/s (O_DIRECT 1.4), raw 4-thread
#     pread of the file 2.6 GB/s, safetensors.load_file 1.5 GB/s. Populating the
#     mapping window by window from 4 threads runs 4 readahead streams at once.
# So mmap is the default. READ stays for pinned host buffers (the RAM tier), which a
# mapping of the page cache cannot provide, and for filesystems where mapping is slow.
DEFAULT_CPU_STRATEGY = CpuStrategy.MMAP


class LoaderError(Exception):
    """Loading a model failed for a reason other than a malformed header (see HeaderError)."""


class DeviceOutOfMemory(LoaderError, RuntimeError):
    """The device (or pinned host memory) has no room for the model's data.

    A RuntimeError whose message contains "out of memory", like torch's own
    OutOfMemoryError, so callers that map that to a retryable capacity failure still do.
    """


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file on disk a model was read from.

    A re-download is written to a new file and renamed over the old one, and an in-place
    rewrite changes the modification time, so a changed source never has the identity
    of the file it replaced. Hot tiers compare it to serve only current weights.
    """

    device: int
    inode: int
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | PathLike[str]) -> FileIdentity:
        return cls.from_stat(os.stat(path))

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(device=st.st_dev, inode=st.st_ino, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)


class LoadSource(enum.StrEnum):
    """The tier a load read its bytes from."""

    DISK = "disk"  # a file (possibly already in the page cache)
    RAM = "ram"  # a host copy kept by the RAM tier


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Tuning knobs of the loader; the defaults suit NVMe disks and PCIe Gen4/5 GPUs."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Size of one read and one host-to-device copy. A multiple of 4096."""
    reader_threads: int = 4
    """Concurrent reads in flight; several keep NVMe queues and network disks busy."""
    ring_buffers: int = 6
    """Pinned host buffers of ``chunk_bytes`` each in the GPU path's ring (allocated once)."""
    direct_io: bool = False
    """Read with O_DIRECT, bypassing the page cache (cold loads of files read once); falls
    back to buffered reads where the filesystem refuses it. A mapping cannot bypass the
    page cache, so on a CPU target this implies the READ strategy. ``LoadedModel.method``
    says what was used (``+direct``, or ``+direct+buffered`` when a load had to finish
    with buffered reads)."""
    cpu_strategy: CpuStrategy = DEFAULT_CPU_STRATEGY
    """How CPU loads fill memory (ignored for CUDA devices, pinned loads and ``direct_io``)."""

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.chunk_bytes % DIRECT_IO_ALIGN_BYTES:
            raise ValueError(f"chunk_bytes must be a positive multiple of {DIRECT_IO_ALIGN_BYTES}, got {self.chunk_bytes}")
        if self.reader_threads < 1:
            raise ValueError(f"reader_threads must be >= 1, got {self.reader_threads}")
        if self.ring_buffers < 1:
            raise ValueError(f"ring_buffers must be >= 1, got {self.ring_buffers}")
        object.__setattr__(self, "cpu_strategy", CpuStrategy(self.cpu_strategy))


@dataclass(frozen=True, slots=True)
class LoadTimings:
    """Where the time of one load went, in seconds."""

    header_s: float = 0.0
    allocate_s: float = 0.0
    data_s: float = 0.0
    views_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded safetensors file: ``tensors`` are views into ``buffer`` (except ``cloned``)."""

    tensors: Mapping[str, torch.Tensor]
    header: Header
    buffer: torch.Tensor
    """uint8 tensor holding the file's data region, ``size_bytes`` long."""
    device: torch.device
    source: LoadSource
    method: str
    """How the bytes arrived: ``read``, ``read+direct``, ``mmap``, ``pinned-ring``, ``ram-copy``..."""
    timings: LoadTimings
    path: str | None = None
    pinned: bool = False
    cloned: tuple[str, ...] = ()
    """Tensors copied out of ``buffer`` because their offset was misaligned for their dtype."""
    identity: FileIdentity | None = None
    """The file the bytes came from (None for models built in memory)."""
    _keepalive: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def size_bytes(self) -> int:
        return self.header.data_size_bytes

    @property
    def throughput_gbps(self) -> float:
        return self.size_bytes / self.timings.total_s / 1e9 if self.timings.total_s > 0 else float("inf")


# ----------------------------------------------------------------------------- dtypes and views

_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "F4": "float4_e2m1fn_x2",  # two values per byte, as safetensors loads it
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


@functools.lru_cache(maxsize=None)
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name; LoaderError if this torch lacks it."""
    attr = _TORCH_DTYPES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    if not isinstance(dtype, torch.dtype):
        raise LoaderError(f"dtype {name} has no equivalent in torch {torch.__version__}; upgrade torch")
    return dtype


def build_views(buffer: torch.Tensor, header: Header) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Tensors of ``header`` as views into ``buffer`` (the data region, uint8), plus the names cloned.

    A tensor whose address is not a multiple of its item size is cloned into a fresh
    (aligned) allocation on the same device instead.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < header.data_size_bytes:
        raise ValueError(f"buffer must be a 1-D uint8 tensor of at least {header.data_size_bytes} bytes")
    base = buffer.data_ptr()
    tensors: dict[str, torch.Tensor] = {}
    cloned: list[str] = []
    for spec in header.tensors:
        if spec.end == spec.begin:  # no bytes to share, and torch refuses views at unaligned offsets
            # A view, as safetensors makes it: torch.empty computes contiguous strides, which
            # overflow for shapes like [0, 2**62, 2**62] that a zero-size view holds fine.
            empty = torch.empty(0, dtype=torch.uint8, device=buffer.device)
            tensors[spec.name] = empty.view(torch_dtype(spec.dtype)).view(_torch_shape(spec))
            continue
        raw = buffer[spec.begin : spec.end]
        if (base + spec.begin) % spec.item_bytes:
            raw = raw.clone()
            cloned.append(spec.name)
        tensors[spec.name] = raw.view(torch_dtype(spec.dtype)).view(_torch_shape(spec))
    return tensors, tuple(cloned)


def _torch_shape(spec: safetensors_header.TensorSpec) -> tuple[int, ...]:
    """The tensor's shape in torch: packed sub-byte dtypes hold two values per element of the last dimension."""
    if safetensors_header.DTYPE_BITS[spec.dtype] < 8:
        return (*spec.shape[:-1], spec.shape[-1] // 2)
    return spec.shape


# ----------------------------------------------------------------------------- host memory


def _cuda_host_register(tensor: torch.Tensor) -> bool:
    """Page-lock an existing host allocation in place.

    torch's pinned allocator rounds every request up to a power of two (a 5 GB model
    would pin 8 GB); registering the exact allocation wastes nothing.
    """
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    try:
        rc = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 1))  # 1: portable
    except (AttributeError, RuntimeError) as err:
        log.debug("cudaHostRegister unavailable: %s", err)
        return False
    if rc != 0:
        log.warning("cudaHostRegister of %d bytes failed with CUDA error %d; using pageable memory", tensor.numel(), rc)
        return False
    return True


class HostPin:
    """Keeps a page-locked host allocation registered; unregisters it when collected.

    Holds the allocation itself, so the memory is never freed while still registered.
    Views into the memory stay valid after unregistering (they are merely pageable then).
    """

    def __init__(self, owner: torch.Tensor) -> None:
        self._finalizer = weakref.finalize(self, _cuda_host_unregister, owner.data_ptr(), owner)

    def release(self) -> None:
        self._finalizer()


def _cuda_host_unregister(ptr: int, _owner: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown or a dead context: nothing left to release
        pass


def allocate_host_buffer(
    size_bytes: int, *, pinned: bool, align_bytes: int = DIRECT_IO_ALIGN_BYTES
) -> tuple[torch.Tensor, HostPin | None]:
    """A 1-D uint8 host tensor of ``size_bytes`` starting at an ``align_bytes`` boundary.

    With ``pinned`` and a GPU present the memory is page-locked for as long as the
    returned ``HostPin`` lives (keep it next to the tensor); otherwise the pin is None.
    """
    raw = torch.empty(size_bytes + align_bytes, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % align_bytes
    buf = raw[shift : shift + size_bytes]
    pin = HostPin(raw) if pinned and _cuda_host_register(raw) else None
    return buf, pin


# ----------------------------------------------------------------------------- file reads


@dataclass(frozen=True, slots=True)
class _Window:
    """One chunk: file bytes ``[file_begin, file_end)``; ``need_end`` is where real data stops."""

    file_begin: int
    file_end: int
    need_end: int


def _plan_windows(*, begin: int, end: int, chunk_bytes: int, align_bytes: int) -> list[_Window]:
    """Chunks covering file bytes ``[begin, end)``; starts aligned down to ``align_bytes``."""
    start = begin - begin % align_bytes
    windows = []
    for lo in range(start, end, chunk_bytes):
        hi = min(lo + chunk_bytes, end)
        windows.append(_Window(file_begin=lo, file_end=hi + (-hi) % align_bytes, need_end=hi))
    return windows


class _Reader:
    """Fills windows of one open file, with O_DIRECT for as long as it works.

    O_DIRECT needs every offset, length and buffer address aligned. A short read in the
    middle of the file (network and FUSE filesystems return them) leaves the next offset
    unaligned, and a late EINVAL shows the filesystem refusing; either way the fd is
    switched to buffered reads for the rest of the load. Aligned reads that other threads
    have in flight are valid in both modes, so the switch needs no coordination beyond
    flipping the flag after the fd.
    """

    def __init__(self, fd: int, *, direct: bool) -> None:
        self.fd = fd
        self.direct = direct
        self.fell_back = False
        self._lock = threading.Lock()

    def _to_buffered(self, why: str) -> None:
        with self._lock:
            if self.direct:
                _set_direct(self.fd, False)
                self.direct, self.fell_back = False, True
                log.info("O_DIRECT read %s; finishing this load with buffered reads", why)

    def read(self, view: memoryview, offset: int, *, need_bytes: int) -> None:
        """File bytes ``[offset, offset + need_bytes)`` into the start of ``view``.

        Direct reads ask for all of ``view`` (the aligned window, which may run past the
        end of the file); buffered reads stop at ``need_bytes``.
        """
        got = 0
        while got < need_bytes:
            direct = self.direct and got % DIRECT_IO_ALIGN_BYTES == 0
            if self.direct and not direct:
                self._to_buffered(f"stopped short at byte {offset + got}, not a multiple of {DIRECT_IO_ALIGN_BYTES}")
            try:
                n = os.preadv(self.fd, [view[got:] if direct else view[got:need_bytes]], offset + got)
            except OSError as err:
                if not direct or err.errno != errno.EINVAL:
                    raise
                self._to_buffered(f"at byte {offset + got} was refused (EINVAL)")
                continue
            if n == 0:
                raise LoaderError(
                    f"file ended at byte {offset + got}, expected data up to {offset + need_bytes}; "
                    "it was truncated or replaced while loading, fetch it again"
                )
            got += n

    def method(self, base: str) -> str:
        if self.fell_back:
            return f"{base}+direct+buffered"
        return f"{base}+direct" if self.direct else base


def _read_header_fd(fd: int) -> Header:
    """Read and validate the header through an open fd (the same file the data comes from)."""
    return safetensors_header.read_header_fd(fd)


def _shrunk(fd: int, path: str, needed_bytes: int) -> LoaderError | None:
    """A LoaderError when the file behind `fd` is now shorter than `needed_bytes` (else None)."""
    size = os.fstat(fd).st_size
    if size >= needed_bytes:
        return None
    return LoaderError(
        f"{path} shrank to {size} bytes while it was being loaded (its header needs {needed_bytes}); "
        "it was truncated or rewritten in place: fetch it again")


def _set_direct(fd: int, enabled: bool) -> bool:
    """Switch O_DIRECT on or off for ``fd``; False where the filesystem refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if enabled else (flags & ~os.O_DIRECT))
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False
    return enabled


def _enable_direct(fd: int, scratch: memoryview, offset: int) -> bool:
    """Turn on O_DIRECT and prove one aligned read works; otherwise leave buffered reads on.

    Some filesystems accept the flag but fail the reads; find out before fanning out.
    """
    if not _set_direct(fd, True):
        log.info("O_DIRECT refused by the filesystem; using buffered reads")
        return False
    try:
        os.preadv(fd, [scratch[:DIRECT_IO_ALIGN_BYTES]], offset)
        return True
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        log.info("O_DIRECT reads refused by the filesystem; using buffered reads")
        _set_direct(fd, False)
        return False


def _as_memoryview(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


# ----------------------------------------------------------------------------- the loader


@dataclass(eq=False)
class _Slot:
    host: torch.Tensor
    done: torch.cuda.Event | None = None


class Loader:
    """Loads safetensors files; owns a pinned ring and reader threads reused across loads.

    Loads through one ``Loader`` are serialised (they share the ring, and run at disk
    or PCIe speed anyway). Close it, or use it as a context manager, to free the ring.
    """

    def __init__(self, options: LoadOptions | None = None) -> None:
        self.options = options or LoadOptions()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ring: list[_Slot] | None = None
        self._ring_pin: HostPin | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the reader threads and the pinned ring; the Loader can still be used after."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._ring = None
            if self._ring_pin is not None:
                self._ring_pin.release()
                self._ring_pin = None

    def prepare(self, device: str | torch.device) -> None:
        """Allocate the pinned ring and the copy stream for ``device`` now (CUDA only), so
        the first load does not pay for page-locking the ring."""
        target = torch.device(device)
        if target.type != "cuda":
            return
        with self._lock:
            self._ensure_ring()
            self.copy_stream(target)

    @property
    def ring_bytes(self) -> int:
        """Pinned host memory held by the ring (0 until the first CUDA load)."""
        return 0 if self._ring is None else len(self._ring) * self.options.chunk_bytes

    def load(self, path: str | PathLike[str], *, device: str | torch.device = "cpu", pin_memory: bool = False) -> LoadedModel:
        """Load the file at ``path`` onto ``device``.

        ``pin_memory`` (CPU only) reads into page-locked memory, ready for fast copies to
        a GPU. Raises ``HeaderError`` for a malformed file, ``DeviceOutOfMemory`` when
        the device has no room for it, OSError when it cannot be opened, and
        ``LoaderError`` for every other failure (reads included).
        """
        target = torch.device(device)
        path = os.fspath(path)
        t0 = time.perf_counter()
        if target.type not in ("cpu", "cuda"):
            raise LoaderError(f"cannot load {path} onto {target}: only cpu and cuda devices are supported")
        # One fd for the header and the data: a file renamed over `path` meanwhile
        # (a re-download) cannot mix one file's header with another's bytes. Regular files
        # only: opening a FIFO would block.
        fd = safetensors_header.open_regular(path)
        try:
            identity = FileIdentity.from_stat(os.fstat(fd))
            header = _read_header_fd(fd)
            t_header = time.perf_counter() - t0
            with self._lock:
                if target.type == "cuda":
                    model = self._load_cuda(fd, path, header, target)
                elif pin_memory or self.options.direct_io or self.options.cpu_strategy is CpuStrategy.READ:
                    # A mapping always reads through the page cache, so direct_io means reads.
                    model = self._load_cpu_read(fd, path, header, pinned=pin_memory)
                else:
                    model = self._load_cpu_mmap(fd, path, header)
        finally:
            os.close(fd)
        total = time.perf_counter() - t0
        timings = LoadTimings(
            header_s=t_header,
            allocate_s=model.timings.allocate_s,
            data_s=model.timings.data_s,
            views_s=model.timings.views_s,
            total_s=total,
        )
        object.__setattr__(model, "timings", timings)
        object.__setattr__(model, "identity", identity)
        log.debug("loaded %s (%d bytes) to %s by %s in %.3fs", path, model.size_bytes, target, model.method, total)
        return model

    # -- shared plumbing

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.options.reader_threads, thread_name_prefix="stoker-read")
        return self._pool

    def _run_all(self, path: str, windows: list[_Window], work: Callable[[_Window, threading.Event], None]) -> None:
        """Run ``work`` for every window on the reader threads; first failure cancels the rest."""
        cancel = threading.Event()

        def guarded(w: _Window) -> None:
            if cancel.is_set():
                return
            try:
                work(w, cancel)
            except BaseException:
                cancel.set()
                raise

        futures: list[Future[None]] = [self._executor().submit(guarded, w) for w in windows]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            if isinstance(first, LoaderError):
                raise first
            raise LoaderError(f"reading {path} failed: {type(first).__name__}: {first}; check the disk and retry") from first

    # -- CPU: parallel reads into one host buffer

    def _load_cpu_read(self, fd: int, path: str, header: Header, *, pinned: bool) -> LoadedModel:
        opts = self.options
        data_begin, data_end = header.data_offset, header.file_size_bytes
        t0 = time.perf_counter()
        direct = False
        try:
            align = DIRECT_IO_ALIGN_BYTES
            windows = _plan_windows(begin=data_begin, end=data_end, chunk_bytes=opts.chunk_bytes, align_bytes=align)
            span_begin = data_begin - data_begin % align
            span = (windows[-1].file_end - span_begin) if windows else 0
            whole, pin = allocate_host_buffer(max(span, align), pinned=pinned)
            data = whole[data_begin - span_begin : data_end - span_begin]
            t1 = time.perf_counter()
            target = _as_memoryview(whole)
            direct = bool(opts.direct_io and windows) and _enable_direct(fd, target, span_begin)
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            reader = _Reader(fd, direct=direct)

            def read(w: _Window, _cancel: threading.Event) -> None:
                lo = w.file_begin - span_begin
                hi = (w.file_end if direct else w.need_end) - span_begin
                reader.read(target[lo:hi], w.file_begin, need_bytes=w.need_end - w.file_begin)

            self._run_all(path, windows, read)
            t2 = time.perf_counter()
        finally:
            if direct:
                _set_direct(fd, False)
        tensors, cloned = build_views(data, header)
        t3 = time.perf_counter()
        return LoadedModel(
            tensors=tensors,
            header=header,
            buffer=data,
            device=torch.device("cpu"),
            source=LoadSource.DISK,
            method=reader.method("read"),
            timings=LoadTimings(allocate_s=t1 - t0, data_s=t2 - t1, views_s=t3 - t2),
            path=path,
            pinned=pin is not None,
            cloned=cloned,
            _keepalive=(pin,) if pin else (),
        )

    # -- CPU: private mapping, populated up front

    def _load_cpu_mmap(self, fd: int, path: str, header: Header) -> LoadedModel:
        t0 = time.perf_counter()
        size = header.file_size_bytes
        if header.data_size_bytes == 0:
            data = torch.empty(0, dtype=torch.uint8)
            keep: tuple[Any, ...] = ()
        else:
            # A file cut short since its header was read cannot be mapped to its full size
            # (mmap raises ValueError) and, mapped, would raise SIGBUS on the missing pages.
            if (err := _shrunk(fd, path, size)) is not None:
                raise err
            # ACCESS_COPY: writable for torch (no read-only buffer warning), and a write
            # changes a private copy of the page, never the cached file.
            try:
                mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            except (ValueError, OSError) as exc:
                raise _shrunk(fd, path, size) or LoaderError(f"cannot map {path}: {exc}; check the disk") from exc
            whole = torch.frombuffer(mapped, dtype=torch.uint8)
            data = whole[header.data_offset : size]
            keep = (mapped,)
        t1 = time.perf_counter()
        if header.data_size_bytes:
            self._populate(path, data, fd=fd, file_size_bytes=size, windows=_plan_windows(
                begin=0, end=header.data_size_bytes, chunk_bytes=self.options.chunk_bytes, align_bytes=mmap.PAGESIZE
            ))
        t2 = time.perf_counter()
        tensors, cloned = build_views(data, header)
        t3 = time.perf_counter()
        return LoadedModel(
            tensors=tensors,
            header=header,
            buffer=data,
            device=torch.device("cpu"),
            source=LoadSource.DISK,
            method="mmap",
            timings=LoadTimings(allocate_s=t1 - t0, data_s=t2 - t1, views_s=t3 - t2),
            path=path,
            cloned=cloned,
            _keepalive=keep,
        )

    def _populate(self, path: str, data: torch.Tensor, *, fd: int, file_size_bytes: int,
                  windows: list[_Window]) -> None:
        """Make sure every page of the mapping is in the page cache, reading in parallel.

        When the file looks cached (mincore on two pages per window; a full scan costs
        more than it saves), the mapping is left lazy: the first touch maps pages in
        batches (fault-around), which on a 3 GB file took 11 ms against 19 ms for
        MADV_POPULATE_READ plus the same pass. Otherwise each window is populated with
        MADV_POPULATE_READ on the reader threads, so that several readahead streams keep
        the disk busy (about 1.5x the cold rate of one sequential reader on the test
        machine); it maps cached pages read-only without copying, and a later write to
        the private mapping still gets copy-on-write. ctypes drops the GIL for the call.
        """
        libc = _libc()
        base = data.data_ptr()
        page_base = base - base % mmap.PAGESIZE
        end = base + data.numel()
        samples = [page_base + w.file_begin for w in windows] + [base + (w.file_begin + w.need_end) // 2 for w in windows]
        if libc is not None and _all_resident(libc, samples):
            if (shrunk := _shrunk(fd, path, file_size_bytes)) is not None:
                raise shrunk
            return

        def populate(w: _Window, _cancel: threading.Event) -> None:
            lo = page_base + w.file_begin
            hi = base + w.need_end
            if libc is not None:
                if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_READ) == 0:
                    return
                err = ctypes.get_errno()
                if err != errno.EINVAL:  # EFAULT: pages past the end of the file; EIO: the disk
                    raise _shrunk(fd, path, file_size_bytes) or LoaderError(
                        f"reading {path} failed: {os.strerror(err)}; check the disk and retry")
            # Kernels before 5.14: touch one byte per page, once the file is known to be whole.
            if (shrunk := _shrunk(fd, path, file_size_bytes)) is not None:
                raise shrunk
            chunk = data[max(lo - base, 0) : w.need_end]
            chunk[:: mmap.PAGESIZE].sum()

        self._run_all(path, windows, populate)
        if (shrunk := _shrunk(fd, path, file_size_bytes)) is not None:
            raise shrunk

    # -- CUDA: pinned ring and a copy stream

    def _ensure_ring(self) -> list[_Slot]:
        if self._ring is None:
            opts = self.options
            if not torch.cuda.is_available():
                raise LoaderError("CUDA is not available")
            block, pin = allocate_host_buffer(opts.chunk_bytes * opts.ring_buffers, pinned=True)
            self._ring_pin = pin
            if pin is None:
                # Fall back to torch's pinned allocator (one allocation, once).
                block = torch.empty(opts.chunk_bytes * opts.ring_buffers + DIRECT_IO_ALIGN_BYTES, dtype=torch.uint8, pin_memory=True)
                shift = (-block.data_ptr()) % DIRECT_IO_ALIGN_BYTES
                block = block[shift : shift + opts.chunk_bytes * opts.ring_buffers]
            self._ring = [_Slot(host=block[i * opts.chunk_bytes : (i + 1) * opts.chunk_bytes]) for i in range(opts.ring_buffers)]
        return self._ring

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The dedicated host-to-device copy stream for ``device`` (created once)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def _load_cuda(self, fd: int, path: str, header: Header, device: torch.device) -> LoadedModel:
        if not torch.cuda.is_available():
            raise LoaderError(f"cannot load {path} onto {device}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        opts = self.options
        t0 = time.perf_counter()
        ring = self._ensure_ring()
        stream = self.copy_stream(device)
        try:
            dest = torch.empty(header.data_size_bytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError as err:
            raise DeviceOutOfMemory(
                f"out of memory on {device}: {path} needs {header.data_size_bytes} bytes in one allocation ({err}); "
                "lower the VRAM budget, evict models, or free the GPU"
            ) from err
        # dest may reuse memory that work queued on the current stream still touches.
        stream.wait_stream(torch.cuda.current_stream(device))
        t1 = time.perf_counter()
        data_begin, data_end = header.data_offset, header.file_size_bytes
        windows = _plan_windows(begin=data_begin, end=data_end, chunk_bytes=opts.chunk_bytes, align_bytes=DIRECT_IO_ALIGN_BYTES)
        free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in ring:
            free.put(slot)
        direct = False
        try:
            direct = bool(opts.direct_io and windows) and _enable_direct(fd, _as_memoryview(ring[0].host), windows[0].file_begin)
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            reader = _Reader(fd, direct=direct)

            def read_and_copy(w: _Window, cancel: threading.Event) -> None:
                torch.cuda.set_device(device)  # reader threads are the loader's own
                slot = free.get()
                try:
                    if slot.done is not None:
                        slot.done.synchronize()  # the previous chunk's copy out of this slot is finished
                    if cancel.is_set():
                        return
                    length = (w.file_end if direct else w.need_end) - w.file_begin
                    reader.read(_as_memoryview(slot.host[:length]), w.file_begin, need_bytes=w.need_end - w.file_begin)
                    lo, hi = max(w.file_begin, data_begin), w.need_end
                    with torch.cuda.stream(stream):
                        dest[lo - data_begin : hi - data_begin].copy_(
                            slot.host[lo - w.file_begin : hi - w.file_begin], non_blocking=True
                        )
                        done = torch.cuda.Event()
                        done.record(stream)
                    slot.done = done
                except BaseException:
                    # Before the slot goes back: a copy out of it may be queued without its
                    # event, so no other reader may refill it (they check cancel first).
                    cancel.set()
                    raise
                finally:
                    free.put(slot)

            try:
                self._run_all(path, windows, read_and_copy)
            finally:
                # Whatever happened, no copy may still read the ring when we return.
                stream.synchronize()
            t2 = time.perf_counter()
        finally:
            if direct:
                _set_direct(fd, False)
        tensors, cloned = build_views(dest, header)
        t3 = time.perf_counter()
        return LoadedModel(
            tensors=tensors,
            header=header,
            buffer=dest,
            device=device,
            source=LoadSource.DISK,
            method=reader.method("pinned-ring"),
            timings=LoadTimings(allocate_s=t1 - t0, data_s=t2 - t1, views_s=t3 - t2),
            path=path,
            cloned=cloned,
        )


_libc_handle: Any = None


def _libc() -> Any:
    """libc with madvise and mincore prototypes, or None where it cannot be loaded."""
    global _libc_handle
    if _libc_handle is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            lib.mincore.restype = ctypes.c_int
            _libc_handle = lib
        except (OSError, AttributeError):
            _libc_handle = False
    return _libc_handle or None


def _all_resident(libc: Any, addresses: list[int]) -> bool:
    """Whether the pages holding ``addresses`` are all in the page cache; False if unknown."""
    vec = ctypes.c_ubyte(0)
    for addr in addresses:
        page = addr - addr % mmap.PAGESIZE
        if libc.mincore(ctypes.c_void_p(page), ctypes.c_size_t(mmap.PAGESIZE), ctypes.byref(vec)) != 0 or not vec.value & 1:
            return False
    return True


def load_file(path: str | PathLike[str], device: str | torch.device = "cpu", **options: Any) -> LoadedModel:
    """Load one file with a throwaway ``Loader``; keep a ``Loader`` to reuse its pinned ring."""
    pin_memory = bool(options.pop("pin_memory", False))
    with Loader(LoadOptions(**options)) as loader:
        return loader.load(path, device=device, pin_memory=pin_memory)
