"""Loader benchmark: Stoker's loader against the common safetensors loaders, cold and warm.

    .venv/bin/python bench/loader_bench.py --size-gb 3 [--runs 5] [--device cpu|cuda[:N]] [--file PATH]

Creates a safetensors file shaped like a diffusion checkpoint (thousands of fp16 tensors,
a few large ones) unless ``--file`` is given, then loads it with every loader in the same
run: warm (file in the page cache) and cold (page cache dropped before every load), the
loader order rotated each run, medians reported. Ceilings are measured in the same run:
raw reads of the file (pread with 1 to 16 threads, O_DIRECT, and a parallel-populated
mapping; the best of them is "the raw read rate") and, on a GPU, pinned and pageable
host-to-device copy bandwidth. Then the issue's targets are checked (met, or missed by
how much and why). Loaders that are missing or fail are listed with the reason. The
tables are printed and written to the ``loader`` section of BENCHMARKS.md.

On a GPU machine: ``.venv/bin/python bench/loader_bench.py --device cuda --size-gb 5`` (root, for
dropping the page cache; ``--drop fadvise`` otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import gc
import json
import mmap
import os
import pathlib
import signal
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report
from stoker.agent import loader as stoker_loader
from stoker.agent import safetensors_header
from stoker.agent.hot_tiers import RamTier
from stoker.testing.page_cache import evict_from_page_cache

GB = 1e9
MIB = 1 << 20
REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".cache" / "loader-bench"

# Shapes cycled to fill the file: convolution, attention and MLP weights with their
# biases and norms, roughly the tensor-size mix of an SD 1.5 / SDXL UNet.
_SHAPE_CYCLE: list[tuple[int, ...]] = [
    (1280, 1280), (1280,), (640, 640, 3, 3), (640,), (320,), (5120, 1280), (1280,),
    (1280, 2048), (2048,), (320, 320, 3, 3), (320,), (10240, 1280), (1280,), (640, 640), (640,),
]  # fmt: skip


# ----------------------------------------------------------------------------- the test file


def write_checkpoint(path: pathlib.Path, *, size_bytes: int) -> None:
    """A valid fp16 safetensors file of about ``size_bytes``, streamed to disk."""
    specs: list[tuple[str, tuple[int, ...], int]] = []
    total, i = 0, 0
    while total < size_bytes:
        shape = _SHAPE_CYCLE[i % len(_SHAPE_CYCLE)]
        n = 2
        for d in shape:
            n *= d
        if total + n > size_bytes:
            shape, n = ((size_bytes - total) // 2,), (size_bytes - total) // 2 * 2
            if n == 0:
                break
        specs.append((f"model.diffusion_model.block{i // len(_SHAPE_CYCLE)}.t{i % len(_SHAPE_CYCLE)}.weight", shape, n))
        total += n
        i += 1
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, n in specs:
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8)
    pattern = torch.randn(32 * MIB // 2, generator=torch.Generator().manual_seed(0)).half().numpy().tobytes()
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        left = offset
        while left:
            piece = pattern[: min(left, len(pattern))]
            f.write(piece)
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    safetensors_header.read_header(path)  # the file we measure is valid


# ----------------------------------------------------------------------------- page cache


def drop_page_cache(path: pathlib.Path, *, how: str = "auto") -> str:
    """Evict the file from the page cache; returns the method used.

    ``auto`` drops every clean cached page of the machine when root may (what a cold
    start sees), else only this file's pages with posix_fadvise; ``fadvise`` always does
    the latter (leaves other processes' cache alone).
    """
    if how in ("auto", "drop_caches"):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            if how == "drop_caches":
                raise
    evict_from_page_cache(path)
    return "fadvise"


def warm_page_cache(path: pathlib.Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 * MIB)
        while f.readinto(buf):
            pass


# ----------------------------------------------------------------------------- loaders


def touch_all(result: Any) -> None:
    """Read one byte of every page the loaded tensors occupy.

    Part of every timed load: loaders that map the file (safetensors on CPU, Stoker's
    mmap strategy) could otherwise return before the data is in memory, and the first
    inference step would pay for it instead.
    """
    tensors = getattr(result, "tensors", result)
    if not isinstance(tensors, dict):
        return
    seen: set[int] = set()
    for t in tensors.values():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
        flat[::4096].sum()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class RawReader:
    """Reads a whole file with ``threads`` readers into buffers allocated (and faulted in) once.

    Allocating per run would time page faults of fresh memory, not the disk.
    """

    def __init__(self, threads: int, *, chunk_bytes: int = 64 * MIB) -> None:
        self.threads, self.chunk_bytes = threads, chunk_bytes
        self._buffers = [stoker_loader.allocate_host_buffer(chunk_bytes, pinned=False)[0] for _ in range(threads)]
        for b in self._buffers:
            b.fill_(0)

    def read(self, path: pathlib.Path, *, direct: bool = False) -> int:
        from concurrent.futures import ThreadPoolExecutor

        views = [memoryview(b.numpy()) for b in self._buffers]
        size = path.stat().st_size
        offsets = list(range(0, size, self.chunk_bytes))
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:

            def worker(k: int) -> int:
                got = 0
                for off in offsets[k :: self.threads]:
                    got += os.preadv(fd, [views[k]], off)
                return got

            with ThreadPoolExecutor(self.threads) as pool:
                return sum(pool.map(worker, range(self.threads)))
        finally:
            os.close(fd)


def raw_mmap_populate(path: pathlib.Path, *, threads: int, chunk_bytes: int = 64 * MIB) -> int:
    """Map the file and fault every page in from `threads` threads (MADV_POPULATE_READ), no copy,
    then read one byte of every page, as every timed load ends.

    The way a mapping loader gets its data; several populate calls in flight run several
    readahead streams, which on some disks beats any number of pread() readers. The final
    pass is not free: on the busy test machine it took 0.04-2.7 s after populating a cold
    3 GB mapping, with major faults (some populated pages were no longer cached).
    """
    from concurrent.futures import ThreadPoolExecutor

    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    libc = stoker_loader._libc()
    base = data.data_ptr()

    def populate(lo: int) -> int:
        hi = min(lo + chunk_bytes, size)
        if libc is None or libc.madvise(ctypes.c_void_p(base + lo), ctypes.c_size_t(hi - lo), stoker_loader._MADV_POPULATE_READ):
            data[lo:hi:4096].sum()  # kernels before 5.14: touch one byte per page
        return hi - lo

    try:
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(populate, range(0, size, chunk_bytes)))
        data[::4096].sum()
        return done
    finally:
        del data
        mapped.close()


def host_copy(source: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """What demoting a model from VRAM to RAM costs when done inline: fresh pinned memory, one copy."""
    buf, pin = stoker_loader.allocate_host_buffer(source.numel(), pinned=True)
    buf.copy_(source)
    return buf, pin


class Kind(enum.Enum):
    STOKER = "stoker"  # Stoker's loader (a target row)
    OTHER = "other"  # another loader Stoker must beat
    CEILING = "ceiling"  # raw hardware rates (no tensors)
    EXTRA = "extra"  # measured for context, not a loader


@dataclass
class Candidate:
    name: str
    run: Callable[[], Any]
    note: str = ""
    kind: Kind = Kind.OTHER
    warm_only: bool = False
    default: bool = False
    """The loader configuration the agent uses (its rows are the targets)."""
    error: str | None = None
    """Why it could not run at all (missing package)."""
    warm_error: str | None = None
    cold_error: str | None = None
    warm_s: list[float] = field(default_factory=list)
    cold_s: list[float] = field(default_factory=list)

    def failed(self, cold: bool) -> str | None:
        return self.error or (self.cold_error if cold else self.warm_error)


def build_candidates(path: pathlib.Path, device: str, *, threads: int, size_bytes: int) -> list[Candidate]:
    str_path = str(path)
    cands: list[Candidate] = []
    on_gpu = device.startswith("cuda")

    # Stoker: one Loader per variant, reused across runs (its pinned ring is allocated once).
    if on_gpu:
        ldr = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads))
        ldr_direct = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads, direct_io=True))
        for loader in (ldr, ldr_direct):
            loader.prepare(device)  # the ring is allocated once per agent, not per load
        cands.append(Candidate("stoker [default]", lambda: ldr.load(str_path, device=device), "pinned ring, copy stream",
                               kind=Kind.STOKER, default=True))  # fmt: skip
        cands.append(Candidate("stoker (O_DIRECT)", lambda: ldr_direct.load(str_path, device=device), "pinned ring, O_DIRECT reads",
                               kind=Kind.STOKER))  # fmt: skip
    else:
        default = stoker_loader.DEFAULT_CPU_STRATEGY
        for strategy, direct, note in [
            (stoker_loader.CpuStrategy.MMAP, False, f"private mapping; uncached pages read by {threads} threads first"),
            (stoker_loader.CpuStrategy.READ, False, f"{threads} readers x 64 MiB into one buffer"),
            (stoker_loader.CpuStrategy.READ, True, f"{threads} readers x 64 MiB, O_DIRECT"),
        ]:
            opts = stoker_loader.LoadOptions(reader_threads=threads, cpu_strategy=strategy, direct_io=direct)
            ldr_v = stoker_loader.Loader(opts)
            is_default = strategy is default and not direct
            label = f"stoker ({strategy}{', O_DIRECT' if direct else ''})" + (" [default]" if is_default else "")
            cands.append(Candidate(label, (lambda l=ldr_v: l.load(str_path, device="cpu")), note, kind=Kind.STOKER, default=is_default))

    from safetensors import safe_open
    from safetensors.torch import load_file

    cands.append(Candidate("safetensors load_file", lambda: load_file(str_path, device=device)))

    def by_tensor() -> dict[str, torch.Tensor]:
        with safe_open(str_path, framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    cands.append(Candidate("safetensors safe_open, tensor by tensor", by_tensor))
    cands.append(
        Candidate(
            "safetensors load_file to CPU, then .to(device)",
            lambda: {k: v.to(device) for k, v in load_file(str_path).items()},
            "identical to load_file on a CPU target" if not on_gpu else "",
        )
    )

    try:
        from runai_model_streamer import SafetensorsStreamer

        # Its default of 16 readers thrashes small machines (3 GB warm on 2 cores: 8.6 s with
        # 16, 5.5 s with 4, 1.6 s with 2), so give it one reader per core unless told otherwise.
        concurrency = os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(min(16, os.cpu_count() or 1)))

        def runai() -> dict[str, torch.Tensor]:
            with SafetensorsStreamer() as s:
                s.stream_file(str_path)
                return {name: t.to(device) for name, t in s.get_tensors()}

        cands.append(Candidate("runai-model-streamer", runai, f"RUNAI_STREAMER_CONCURRENCY={concurrency}; tensors owned (no buffer reuse)"))
    except Exception as err:  # noqa: BLE001 - report any import problem as a skipped row
        cands.append(Candidate("runai-model-streamer", lambda: None, error=f"not importable: {err}"))

    try:
        from fastsafetensors import SafeTensorsFileLoader

        block = max(16 * MIB, size_bytes // (threads * 4))
        # An explicit index: it copies through a device id of its own, and "cuda" alone leaves that to a default.
        fs_device = f"cuda:{torch.device(device).index or 0}" if on_gpu else device

        def fastsafe() -> dict[str, torch.Tensor]:
            fl = SafeTensorsFileLoader(None, fs_device, nogds=True, max_threads=threads, set_numa=False)
            try:
                fl.add_filenames({0: [str_path]})
                fb = fl.copy_files_to_device(max_copy_block_size=block)
                try:
                    return {k: fb.get_tensor(k) for k in fl.get_keys()}
                finally:
                    fb.close()
            finally:
                fl.close()

        cands.append(
            Candidate(
                "fastsafetensors (no GDS)",
                fastsafe,
                f"{threads} threads, copy blocks of {block // MIB} MiB (so every thread reads; "
                "2-8 threads and 16-178 MiB blocks measured alike on CPU)",
            )
        )
    except Exception as err:  # noqa: BLE001
        cands.append(Candidate("fastsafetensors (no GDS)", lambda: None, error=f"not importable: {err}"))

    # Ceilings: the best of these is what "the raw read rate" means in the targets.
    # Reads of 64 MiB, or of the whole file when smaller (a 29-buffer pool of 64 MiB would dwarf a test file).
    chunk = min(64 * MIB, -(-size_bytes // 4096) * 4096)
    readers = {n: RawReader(n, chunk_bytes=chunk) for n in sorted({1, threads, 8, 16})}
    for n, raw in readers.items():
        cands.append(Candidate(f"raw pread, {n} thread{'s' if n > 1 else ''} (ceiling)", (lambda raw=raw: raw.read(path)),
                               f"{chunk / MIB:.3g} MiB reads into buffers allocated once, no assembly", kind=Kind.CEILING))  # fmt: skip
    cands.append(Candidate(f"raw pread, {threads} threads, O_DIRECT (ceiling)", lambda: readers[threads].read(path, direct=True),
                           "", kind=Kind.CEILING))  # fmt: skip
    for n in sorted({threads, 16}):
        cands.append(Candidate(f"raw mmap + MADV_POPULATE_READ, {n} threads (ceiling)", (lambda n=n: raw_mmap_populate(path, threads=n)),
                               "64 MiB ranges populated in parallel, no copy, then every page read", kind=Kind.CEILING))  # fmt: skip

    if on_gpu:
        ram = RamTier(size_bytes * 2)
        ram_loader = stoker_loader.Loader()
        ram.put_file("bench", str_path, loader=ram_loader)
        cands.append(Candidate("stoker RAM tier -> GPU", lambda: ram.to_device("bench", device), "pinned host copy, one async copy",
                               kind=Kind.STOKER, warm_only=True))  # fmt: skip
        gpu_model = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads)).load(str_path, device=device)
        cands.append(Candidate("GPU model -> fresh pinned host memory", lambda: host_copy(gpu_model.buffer),
                               "what demoting a model from VRAM cost inside the next load; now re-read from "
                               "its file in the background after that load", kind=Kind.EXTRA, warm_only=True))  # fmt: skip
    else:
        host_model = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads, cpu_strategy="read")).load(str_path)
        cands.append(Candidate("loaded model -> fresh host memory", lambda: host_copy(host_model.buffer),
                               "what demoting a model from VRAM to RAM costs when done inline (on a GPU: "
                               "a device-to-host copy into fresh pinned memory); now done in the background", kind=Kind.EXTRA,
                               warm_only=True))  # fmt: skip
    return cands


def h2d_bandwidth(device: str, *, size_bytes: int, pinned: bool, runs: int) -> float:
    """Median host-to-device copy rate (GB/s) of one buffer of `size_bytes`.

    Pinned memory is registered the way the RAM tier pins it (exact size, no rounding up).
    """
    host = None
    if pinned:
        host, pin = stoker_loader.allocate_host_buffer(size_bytes, pinned=True)
        if pin is None:  # registration refused: torch's pinned allocator instead
            host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    else:
        host = torch.empty(size_bytes, dtype=torch.uint8)
    host.fill_(1)
    dev = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(runs + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize(device)
        rates.append(size_bytes / (time.perf_counter() - t0) / GB)
    return statistics.median(rates[1:])


def describe_gpu(device: str) -> str:
    props = torch.cuda.get_device_properties(device)
    text = f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError, ValueError):
        index = torch.device(device).index or 0
        out = subprocess.run(
            ["nvidia-smi", "-i", str(index), "--query-gpu=pcie.link.gen.max,pcie.link.width.max,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=20,
        ).stdout.strip().split(", ")  # fmt: skip
        text += f", PCIe gen {out[0]} x{out[1]}, driver {out[2]}"
    return text


# ----------------------------------------------------------------------------- measurement


class Stop:
    """When to stop starting loads: a deadline for the runs after the first, or SIGTERM at any time.

    The first run of every candidate always happens (unless terminated), so a short budget
    gives fewer samples, never missing rows.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.terminated = False

    def on_sigterm(self, *_: object) -> None:
        self.reason, self.terminated = "stopped by SIGTERM (stage timeout)", True

    def due(self, deadline: float | None, *, first_round: bool) -> bool:
        if self.terminated:
            return True
        if deadline is not None and not first_round and time.monotonic() >= deadline:
            self.reason = self.reason or "time budget spent"
            return True
        return False


def measure(cands: list[Candidate], *, path: pathlib.Path, device: str, runs: int, cold: bool, fast_runs: int = 0,
            drop: str = "auto", deadline: float | None = None, stop: Stop | None = None,
            after_round: Callable[[], None] = lambda: None) -> str:  # fmt: skip
    """Time every candidate `runs` times (`fast_runs` for warm loads under a second); returns how the cache was dropped.

    Runs after the first stop at `deadline` (monotonic clock) or when `stop` is terminated.
    """
    stop = stop or Stop()
    method = "warm"
    if not cold:
        warm_page_cache(path)
    label = "cold" if cold else "warm"
    for r in range(max(runs, fast_runs)):
        live = [c for c in cands if c.failed(cold) is None and not (cold and c.warm_only)]
        if r >= runs:  # extra samples only where a run is short enough to be noisy
            live = [c for c in live if statistics.median(c.warm_s or [0.0]) < 1.0]
        k = r % max(len(live), 1)
        for cand in live[k:] + live[:k]:
            if stop.due(deadline, first_round=r == 0):
                return method
            if cand.failed(cold) is not None:
                continue
            gc.collect()  # free the previous result first: its pages must not survive the drop
            if cold:
                method = drop_page_cache(path, how=drop)
            try:
                _sync(device)
                t0 = time.perf_counter()
                result = cand.run()
                touch_all(result)
                _sync(device)
                elapsed = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001 - a failing loader becomes a skipped cell
                reason = f"{label} run failed: {type(err).__name__}: {str(err)[:160]}"
                if cold:
                    cand.cold_error = reason
                else:
                    cand.warm_error = reason
                traceback.print_exc(file=sys.stderr)
                continue
            (cand.cold_s if cold else cand.warm_s).append(elapsed)
            del result
            print(f"  {label} run {r + 1}/{runs} {cand.name}: {elapsed:.3f} s", file=sys.stderr, flush=True)
        after_round()
    return method


def _gbps(times: list[float], size_bytes: int) -> float | None:
    return size_bytes / statistics.median(times) / GB if times else None


def _fmt(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def describe_disk(path: pathlib.Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
        return f"{out[0]} ({out[1]})"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="size of the generated file (default 3)")
    ap.add_argument("--runs", type=int, default=5, help="runs per loader and condition (default 5)")
    ap.add_argument("--fast-runs", type=int, default=15, help="warm runs for loaders whose warm load takes < 1 s (default 15)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--file", type=pathlib.Path, help="measure this file instead of generating one")
    ap.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR, help=f"where to generate the file (default {DEFAULT_DIR})")
    ap.add_argument("--threads", type=int, default=stoker_loader.LoadOptions().reader_threads,
                    help="reader threads of every loader that takes a count (default: the loader's default)")  # fmt: skip
    ap.add_argument("--drop", choices=["auto", "drop_caches", "fadvise"], default="auto",
                    help="how cold runs empty the page cache: drop_caches (root), fadvise (this file only), "
                         "auto (drop_caches when root, else fadvise)")  # fmt: skip
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run: runs after the first of each loader stop when it is spent "
                         "(about a third for warm runs, the rest for cold ones)")  # fmt: skip
    ap.add_argument("--json", type=pathlib.Path, help="also write the figures as JSON here (rewritten after every round)")
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    stop = Stop()
    previous_handler = signal.signal(signal.SIGTERM, stop.on_sigterm)  # finish the load in flight, then report

    generated = args.file is None
    path = args.file or args.dir / f"bench-{args.size_gb:g}gb.safetensors"
    if generated and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_checkpoint(path, size_bytes=int(args.size_gb * GB))
    header = safetensors_header.read_header(path)
    size = header.data_size_bytes
    disk = describe_disk(path)
    load_before = os.getloadavg()[0]
    machine = (report.describe_machine() + "; torch " + torch.__version__
               + ("; " + describe_gpu(args.device) if on_gpu else "; no GPU"))  # fmt: skip
    gpu_rows: list[tuple[str, float]] = []
    cands: list[Candidate] = []
    cold_method = "not measured"

    def snapshot(*, final: bool = False) -> str:
        md = render(cands, gpu_rows, disk=disk, load_avg=(load_before, os.getloadavg()[0]), header=header,
                    device=args.device, runs=args.runs, fast_runs=args.fast_runs, threads=args.threads,
                    cold_method=cold_method, argv=argv if argv is not None else sys.argv[1:], machine=machine,
                    stopped=stop.reason)  # fmt: skip
        if args.json:
            data = results_json(cands, gpu_rows, size=size, threads=args.threads, device=args.device, header=header,
                                disk=disk, cold_method=cold_method, machine=machine, stopped=stop.reason,
                                complete=final, markdown=md)  # fmt: skip
            tmp = args.json.with_suffix(".partial")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(args.json)
        return md

    try:
        if on_gpu:  # first: two of the three GPU targets are ratios to it, so a cut-short run still has it
            gpu_rows.append((PINNED_ROW, h2d_bandwidth(args.device, size_bytes=size, pinned=True, runs=args.runs)))
            gpu_rows.append(("pageable host -> GPU copy", h2d_bandwidth(args.device, size_bytes=size, pinned=False, runs=args.runs)))
            gc.collect()
            torch.cuda.empty_cache()
        cands = build_candidates(path, args.device, threads=args.threads, size_bytes=size)
        warm_deadline = cold_deadline = None
        if args.time_budget is not None:
            left = args.time_budget - (time.monotonic() - started) - 10  # rendering, cleanup
            warm_deadline, cold_deadline = time.monotonic() + left / 3, time.monotonic() + left
        measure(cands, path=path, device=args.device, runs=args.runs, cold=False, fast_runs=args.fast_runs,
                deadline=warm_deadline, stop=stop, after_round=snapshot)  # fmt: skip
        cold_method = "pending"
        cold_method = measure(cands, path=path, device=args.device, runs=args.runs, cold=True, drop=args.drop,
                              deadline=cold_deadline, stop=stop, after_round=snapshot)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if generated and not args.keep:
            with contextlib.suppress(OSError):
                path.unlink()

    md = snapshot(final=True)
    print(md)
    if not args.no_write:
        report.write_section("loader", md)
    return 0


def results_json(cands: list[Candidate], gpu_rows: list[tuple[str, float]], *, size: int, threads: int, device: str,
                 header: safetensors_header.Header, disk: str, cold_method: str, machine: str, stopped: str | None,
                 complete: bool, markdown: str) -> dict[str, Any]:  # fmt: skip
    """The run's figures for machine readers (bench/gpu_check.sh): every loader, the ceilings, the targets."""
    on_gpu = device.startswith("cuda")
    best_raw = max(((c.name, _gbps(c.cold_s, size)) for c in cands if c.kind is Kind.CEILING and c.cold_s),
                   key=lambda nr: nr[1] or 0.0, default=(None, None))  # fmt: skip
    rows = dict(gpu_rows)
    return {
        "device": device,
        "gpu_name": torch.cuda.get_device_name(device) if on_gpu else None,
        "machine": machine,
        "file": {"bytes": size, "tensors": len(header.tensors), "disk": disk},
        "threads": threads,
        "cold_method": cold_method,
        "complete": complete,
        "stopped_early": stopped,
        "loaders": [
            {"name": c.name, "kind": c.kind.value, "default": c.default, "warm_only": c.warm_only, "note": c.note,
             "error": c.error, "warm_error": c.warm_error, "cold_error": c.cold_error,
             "warm_gbps": _gbps(c.warm_s, size), "cold_gbps": None if c.warm_only else _gbps(c.cold_s, size),
             "warm_runs": len(c.warm_s), "cold_runs": len(c.cold_s)}
            for c in cands
        ],  # fmt: skip
        "ceilings": {
            "pinned_h2d_gbps": rows.get(PINNED_ROW),
            "pageable_h2d_gbps": rows.get("pageable host -> GPU copy"),
            "raw_read_cold_gbps": best_raw[1],
            "raw_read_cold_name": best_raw[0],
        },
        "targets": [
            {"key": t.key, "name": t.name, "goal": t.goal_text, "ratio_goal": t.goal, "measured": t.measured,
             "met": t.met if t.measured is not None else None, "verdict": t.verdict(), "detail": t.detail}
            for t in targets(cands, gpu_rows, size=size, threads=threads, on_gpu=on_gpu)
        ],  # fmt: skip
        "markdown": markdown,
    }


PINNED_ROW = "pinned host -> GPU copy (ceiling)"


@dataclass(frozen=True)
class Target:
    """One target of the issue: ``measured`` and ``goal`` are ratios (1.0 = 100 %)."""

    name: str
    goal_text: str
    goal: float
    measured: float | None
    detail: str = ""
    why: str = ""
    """Shown when the target is missed: what bounds the measured rate."""
    key: str = ""
    """Stable identifier for machine-read reports (the name embeds the loader's label)."""

    @property
    def met(self) -> bool:
        return self.measured is not None and self.measured >= self.goal

    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if self.met:
            return "met"
        return f"missed by {100 * (1 - self.measured / self.goal):.0f} %"


def targets(cands: list[Candidate], gpu_rows: list[tuple[str, float]], *, size: int, threads: int, on_gpu: bool) -> list[Target]:
    """The issue's targets, computed from one run's medians."""

    def rate(c: Candidate | None, cold: bool) -> float | None:
        if c is None or c.failed(cold):
            return None
        return _gbps(c.cold_s if cold else c.warm_s, size)

    def fastest(kind: Kind, cold: bool) -> tuple[Candidate | None, float | None]:
        rated = [(c, rate(c, cold)) for c in cands if c.kind is kind and not (cold and c.warm_only)]
        rated = [(c, r) for c, r in rated if r is not None]
        return max(rated, key=lambda cr: cr[1]) if rated else (None, None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def vs(a: float | None, b: float | None, b_name: str) -> str:
        return f"{_fmt(a)} vs {_fmt(b)} GB/s ({b_name})"

    default = next((c for c in cands if c.default), None)
    name = default.name if default else "stoker"
    warm, cold = rate(default, False), rate(default, True)
    ceiling, raw_cold = fastest(Kind.CEILING, True)
    raw_name = ceiling.name.removesuffix(" (ceiling)") if ceiling else "raw read"
    out: list[Target] = []
    if on_gpu:
        pinned = dict(gpu_rows).get(PINNED_ROW)
        ram = rate(next((c for c in cands if "RAM tier" in c.name), None), False)
        out.append(Target("RAM tier -> GPU vs pinned host -> GPU copy", ">= 90 %", 0.90, ratio(ram, pinned),
                          vs(ram, pinned, "pinned copy"),
                          "one copy of the whole model from pinned memory plus one device allocation; a gap means the "
                          "allocation (fresh device memory) or a pinned buffer on the far NUMA node", "ram_tier_vs_pinned"))  # fmt: skip
        out.append(Target(f"page cache -> GPU ({name}, warm) vs pinned copy", ">= 75 %", 0.75, ratio(warm, pinned),
                          vs(warm, pinned, "pinned copy"),
                          f"every byte is copied twice: page cache -> pinned ring by read() on {threads} threads "
                          "(host memory bandwidth), then ring -> GPU; the read() copy bounds it when slower than PCIe",
                          "page_cache_vs_pinned"))  # fmt: skip
        out.append(Target(f"cold ({name}) vs best raw read", ">= 90 %", 0.90, ratio(cold, raw_cold), vs(cold, raw_cold, raw_name),
                          "reads land in the pinned ring and wait for a free slot; the best ceiling only reads into "
                          "reused buffers or faults pages in", "cold_vs_raw"))  # fmt: skip
    else:
        st_warm = rate(next((c for c in cands if c.name == "safetensors load_file"), None), False)
        out.append(Target(f"warm ({name}) vs safetensors load_file", ">= 100 %", 1.0, ratio(warm, st_warm),
                          vs(warm, st_warm, "safetensors load_file"),
                          "both map the file; a gap means page-table work or the per-page touch dominated",
                          "warm_vs_safetensors"))  # fmt: skip
        out.append(Target(f"cold ({name}) vs best raw read", ">= 90 % (within 10 %)", 0.90, ratio(cold, raw_cold),
                          vs(cold, raw_cold, raw_name),
                          "the loader's reads follow the data region in 64 MiB windows on its reader threads; the best "
                          "ceiling may use more threads or another way of reading than the default strategy",
                          "cold_vs_raw"))  # fmt: skip
    for is_cold, label in ((False, "warm"), (True, "cold")):
        other, other_rate = fastest(Kind.OTHER, is_cold)
        mine = cold if is_cold else warm
        out.append(Target(f"{label} ({name}) vs the fastest other loader", "> every other", 1.0, ratio(mine, other_rate),
                          vs(mine, other_rate, other.name if other else "none measured"),
                          f"{other.name if other else 'another loader'} was faster in this run",
                          f"{label}_vs_others"))  # fmt: skip
    return out


def render(
    cands: list[Candidate],
    gpu_rows: list[tuple[str, float]],
    *,
    disk: str,
    load_avg: tuple[float, float],
    header: safetensors_header.Header,
    device: str,
    runs: int,
    fast_runs: int,
    threads: int,
    cold_method: str,
    argv: list[str],
    machine: str,
    stopped: str | None = None,
) -> str:
    size = header.data_size_bytes
    cores = os.cpu_count() or 1
    busy = max(load_avg) > 0.5 * cores
    lines = [
        "## Loader",
        "",
        f"Command: `.venv/bin/python bench/loader_bench.py {' '.join(argv)}`",
        "",
        f"- Machine: {machine}",
        f"- File: {size / GB:.2f} GB of data in {len(header.tensors)} fp16 tensors on {disk}",
        f"- Device: `{device}`; {runs} runs per loader and condition ({max(runs, fast_runs)} warm runs for loaders "
        "whose warm load takes under a second), loader order rotated each run, medians shown; "
        f"GB = 10^9 bytes; {threads} reader threads where a loader takes a thread count",
        "- Every timed load ends with one byte of every page of the result read (loaders that map the file "
        "would otherwise return before the data is in memory)",
        "- Cold: garbage collected, then the page cache dropped before every load with "
        + {"drop_caches": "`echo 1 > /proc/sys/vm/drop_caches`", "fadvise": "`posix_fadvise(DONTNEED)` on the file"}.get(
            cold_method, f"(cold runs {cold_method})")
        + "; on a virtual machine the host may still cache the disk image, so cold rates are those of the virtual disk",
        f"- 1-minute load average {load_avg[0]:.1f} before and {load_avg[1]:.1f} after the run on {cores} cores"
        + (" (high: other processes shared the CPUs and slowed every loader, ceilings included; compare ratios within one run)"
           if busy else " (other processes slow every loader alike; compare ratios within one run)"),  # fmt: skip
        "",
        "| Loader | Warm GB/s | Cold GB/s | Notes |",
        "|---|---:|---:|---|",
    ]
    for c in cands:
        if c.error:
            lines.append(f"| {c.name} | - | - | skipped: {c.error} |")
            continue
        warm = "failed" if c.warm_error else _fmt(_gbps(c.warm_s, size))
        cold = "n/a" if c.warm_only else ("failed" if c.cold_error else _fmt(_gbps(c.cold_s, size)))
        errors = [c.warm_error, c.cold_error]
        if c.warm_error and c.cold_error and c.warm_error.partition(":")[2] == c.cold_error.partition(":")[2]:
            errors = ["warm and cold runs failed:" + c.warm_error.partition(":")[2]]
        notes = "; ".join(x for x in (c.note, *errors) if x)
        lines.append(f"| {c.name} | {warm} | {cold} | {notes} |")
    for name, rate in gpu_rows:
        lines.append(f"| {name} | {rate:.2f} | n/a | one {size / GB:.1f} GB buffer |")

    rows = targets(cands, gpu_rows, size=size, threads=threads, on_gpu=device.startswith("cuda"))
    lines += ["", f"Targets ({'GPU' if device.startswith('cuda') else 'CPU'}):", "",
              "| Target | Goal | Measured | Result |", "|---|---|---|---|"]  # fmt: skip
    for t in rows:
        measured = f"{100 * t.measured:.0f} %: {t.detail}" if t.measured is not None else t.detail
        lines.append(f"| {t.name} | {t.goal_text} | {measured} | {t.verdict()} |")
    if stopped:
        lines += ["", f"Stopped early ({stopped}): fewer runs than asked where the counts are short; "
                  "every loader ran at least once per condition unless its cell is empty."]
    missed = [t for t in rows if t.measured is not None and not t.met]
    if missed:
        lines += ["", "Why the missed targets were missed:"]
        for t in missed:
            lines.append(f"- {t.name}: {t.verdict()}; {t.why}" + ("; the machine was busy during the run" if busy else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
