"""Loader benchmark: Stoker's loader against the common safetensors loaders, cold and warm.

    python -m bench.loader_bench --size-gb 3 [--runs 5] [--device cpu|cuda] [--file PATH]

Creates a safetensors file shaped like a diffusion checkpoint (thousands of fp16 tensors,
a few large ones) unless ``--file`` is given, then loads it with every loader in the same
run: warm (file in the page cache) and cold (page cache dropped before every load), the
loader order rotated each run, medians reported. Ceilings are measured in the same run:
the raw parallel read rate of the file and, on a GPU, pinned and pageable host-to-device
copy bandwidth. Loaders that are missing or fail are listed with the reason. The table is
printed and written to the ``loader`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
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

from bench import report
from stoker.agent import loader as stoker_loader
from stoker.agent import safetensors_header
from stoker.agent.hot_tiers import RamTier

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


def drop_page_cache(path: pathlib.Path) -> str:
    """Evict the file from the page cache; returns the method used."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
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
        torch.cuda.synchronize()


def raw_parallel_read(path: pathlib.Path, *, threads: int, chunk_bytes: int = 64 * MIB, direct: bool = False) -> int:
    """Read every byte of the file with `threads` readers into reused buffers (no assembly)."""
    from concurrent.futures import ThreadPoolExecutor

    size = path.stat().st_size
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        buffers = [stoker_loader.allocate_host_buffer(chunk_bytes, pinned=False)[0] for _ in range(threads)]
        for b in buffers:  # fault the buffers in: the ceiling is the disk, not page faults
            b.fill_(0)
        views = [memoryview(b.numpy()) for b in buffers]
        offsets = list(range(0, size, chunk_bytes))

        def worker(k: int) -> int:
            got = 0
            for off in offsets[k::threads]:
                got += os.preadv(fd, [views[k]], off)
            return got

        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(worker, range(threads)))
    finally:
        os.close(fd)


@dataclass
class Candidate:
    name: str
    run: Callable[[], Any]
    note: str = ""
    error: str | None = None
    warm_s: list[float] = field(default_factory=list)
    cold_s: list[float] = field(default_factory=list)
    ceiling: bool = False
    warm_only: bool = False


def build_candidates(path: pathlib.Path, device: str, *, threads: int, size_bytes: int) -> list[Candidate]:
    str_path = str(path)
    cands: list[Candidate] = []
    on_gpu = device.startswith("cuda")

    # Stoker: one Loader per variant, reused across runs (its pinned ring is allocated once).
    if on_gpu:
        ldr = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads))
        ldr_direct = stoker_loader.Loader(stoker_loader.LoadOptions(reader_threads=threads, direct_io=True))
        cands.append(Candidate("stoker", lambda: ldr.load(str_path, device=device), "pinned ring, copy stream"))
        cands.append(Candidate("stoker (O_DIRECT)", lambda: ldr_direct.load(str_path, device=device), "pinned ring, O_DIRECT reads"))
    else:
        default = stoker_loader.DEFAULT_CPU_STRATEGY
        for strategy, direct, note in [
            (stoker_loader.CpuStrategy.MMAP, False, "private mapping; uncached pages read by 4 threads first"),
            (stoker_loader.CpuStrategy.READ, False, f"{threads} readers x 64 MiB into one buffer"),
            (stoker_loader.CpuStrategy.READ, True, f"{threads} readers x 64 MiB, O_DIRECT"),
        ]:
            opts = stoker_loader.LoadOptions(reader_threads=threads, cpu_strategy=strategy, direct_io=direct)
            ldr_v = stoker_loader.Loader(opts)
            label = f"stoker ({strategy}{', O_DIRECT' if direct else ''})"
            if strategy is default and not direct:
                label += " [default]"
            cands.append(Candidate(label, (lambda l=ldr_v: l.load(str_path, device="cpu")), note))

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

        def fastsafe() -> dict[str, torch.Tensor]:
            fl = SafeTensorsFileLoader(None, device, nogds=True, max_threads=threads, set_numa=False)
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

    cands.append(Candidate(f"raw read, {threads} threads (ceiling)", lambda: raw_parallel_read(path, threads=threads), "no assembly, buffers reused", ceiling=True))
    cands.append(Candidate("raw read, 1 thread (ceiling)", lambda: raw_parallel_read(path, threads=1), "", ceiling=True))
    cands.append(
        Candidate(f"raw read, {threads} threads, O_DIRECT (ceiling)", lambda: raw_parallel_read(path, threads=threads, direct=True), "", ceiling=True)
    )

    if on_gpu:
        ram = RamTier(size_bytes * 2)
        ram_loader = stoker_loader.Loader()
        ram.put_file("bench", str_path, loader=ram_loader)
        cands.append(Candidate("stoker RAM tier -> GPU", lambda: ram.to_device("bench", device), "pinned host copy, one async copy", warm_only=True))
    return cands


def h2d_bandwidth(device: str, *, size_bytes: int, pinned: bool, runs: int) -> float:
    """Median host-to-device copy rate (GB/s) of one buffer of `size_bytes`."""
    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    rates = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        rates.append(size_bytes / (time.perf_counter() - t0) / GB)
    return statistics.median(rates[1:])


# ----------------------------------------------------------------------------- measurement


def measure(cands: list[Candidate], *, path: pathlib.Path, device: str, runs: int, cold: bool, fast_runs: int = 0) -> str:
    """Time every candidate `runs` times (`fast_runs` for warm loads under a second)."""
    method = "warm"
    if not cold:
        warm_page_cache(path)
    for r in range(max(runs, fast_runs)):
        live = [c for c in cands if c.error is None and not (cold and c.warm_only)]
        if r >= runs:  # extra samples only where a run is short enough to be noisy
            live = [c for c in live if statistics.median(c.warm_s or [0.0]) < 1.0]
        k = r % max(len(live), 1)
        for cand in live[k:] + live[:k]:
            if cand.error is not None:
                continue
            if cold:
                method = drop_page_cache(path)
            gc.collect()
            try:
                _sync(device)
                t0 = time.perf_counter()
                result = cand.run()
                touch_all(result)
                _sync(device)
                elapsed = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001 - a failing loader becomes a skipped row
                cand.error = f"failed: {type(err).__name__}: {str(err)[:160]}"
                traceback.print_exc(file=sys.stderr)
                continue
            (cand.cold_s if cold else cand.warm_s).append(elapsed)
            del result
            print(f"  {'cold' if cold else 'warm'} run {r + 1}/{runs} {cand.name}: {elapsed:.3f} s", file=sys.stderr, flush=True)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="size of the generated file (default 3)")
    ap.add_argument("--runs", type=int, default=5, help="runs per loader and condition (default 5)")
    ap.add_argument("--fast-runs", type=int, default=15, help="warm runs for loaders whose warm load takes < 1 s (default 15)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--file", type=pathlib.Path, help="measure this file instead of generating one")
    ap.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR, help="where to generate the file")
    ap.add_argument("--threads", type=int, default=stoker_loader.LoadOptions().reader_threads, help="reader threads")
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")

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
    try:
        cands = build_candidates(path, args.device, threads=args.threads, size_bytes=size)
        warm_method = measure(cands, path=path, device=args.device, runs=args.runs, cold=False, fast_runs=args.fast_runs)
        cold_method = measure(cands, path=path, device=args.device, runs=args.runs, cold=True)
        del warm_method
        gpu_rows: list[tuple[str, float]] = []
        if args.device.startswith("cuda"):
            n = min(size, 2 << 30)
            gpu_rows.append(("pinned host -> GPU copy (ceiling)", h2d_bandwidth(args.device, size_bytes=n, pinned=True, runs=args.runs)))
            gpu_rows.append(("pageable host -> GPU copy", h2d_bandwidth(args.device, size_bytes=n, pinned=False, runs=args.runs)))
    finally:
        if generated and not args.keep:
            with contextlib.suppress(OSError):
                path.unlink()

    load_after = os.getloadavg()[0]
    md = render(cands, gpu_rows, disk=disk, load_avg=(load_before, load_after), header=header, device=args.device, runs=args.runs, fast_runs=args.fast_runs, threads=args.threads,
                cold_method=cold_method, argv=argv if argv is not None else sys.argv[1:])  # fmt: skip
    print(md)
    if not args.no_write:
        report.write_section("loader", md)
    return 0


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
) -> str:
    size = header.data_size_bytes
    lines = [
        "## Loader",
        "",
        f"Command: `python -m bench.loader_bench {' '.join(argv)}`",
        "",
        f"- Machine: {report.describe_machine()}; torch {torch.__version__}"
        + (f"; GPU {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else "; no GPU"),
        f"- File: {size / GB:.2f} GB of data in {len(header.tensors)} fp16 tensors on {disk}",
        f"- Device: `{device}`; {runs} runs per loader and condition ({max(runs, fast_runs)} warm runs for loaders "
        "whose warm load takes under a second), loader order rotated each run, medians shown; "
        f"GB = 10^9 bytes; {threads} reader threads where a loader takes a thread count",
        "- Every timed load ends with one byte of every page of the result read (loaders that map the file "
        "would otherwise return before the data is in memory)",
        f"- Cold: page cache dropped before every load with "
        + ("`echo 1 > /proc/sys/vm/drop_caches`" if cold_method == "drop_caches" else "`posix_fadvise(DONTNEED)` on the file (not root)")
        + "; on a virtual machine the host may still cache the disk image, so cold rates are those of the virtual disk",
        f"- 1-minute load average {load_avg[0]:.1f} before and {load_avg[1]:.1f} after the run "
        "(other processes on the machine slow every loader alike; compare ratios within one run)",
        "",
        "| Loader | Warm GB/s | Cold GB/s | Notes |",
        "|---|---:|---:|---|",
    ]
    for c in cands:
        if c.error:
            lines.append(f"| {c.name} | - | - | skipped: {c.error} |")
        else:
            lines.append(f"| {c.name} | {_fmt(_gbps(c.warm_s, size))} | {_fmt(_gbps(c.cold_s, size))} | {c.note} |")
    for name, rate in gpu_rows:
        lines.append(f"| {name} | {rate:.2f} | - | one {min(size, 2 << 30) / GB:.1f} GB buffer |")

    def best(pred: Callable[[Candidate], bool], attr: str) -> float | None:
        rates = [_gbps(getattr(c, attr), size) for c in cands if pred(c) and not c.error]
        rates = [r for r in rates if r is not None]
        return max(rates) if rates else None

    stoker_default = next((c for c in cands if c.name.startswith("stoker") and ("[default]" in c.name or c.name == "stoker")), None)
    st_warm = best(lambda c: c.name == "safetensors load_file", "warm_s")
    raw_cold = best(lambda c: c.ceiling, "cold_s")
    lines += ["", "Targets:"]
    if stoker_default and not stoker_default.error:
        sw, sc = _gbps(stoker_default.warm_s, size), _gbps(stoker_default.cold_s, size)
        best_cold = best(lambda c: c.name.startswith("stoker") and "RAM" not in c.name, "cold_s")
        if sw and st_warm:
            lines.append(f"- warm, {stoker_default.name} vs safetensors load_file: {sw / st_warm:.2f}x (target >= 1.00x)")
        if sc and raw_cold:
            lines.append(f"- cold, {stoker_default.name} vs best raw read: {100 * sc / raw_cold:.0f} % (target >= 90 %)")
        if best_cold and raw_cold:
            lines.append(f"- cold, best Stoker variant vs best raw read: {100 * best_cold / raw_cold:.0f} %")
        if gpu_rows:
            pinned = gpu_rows[0][1]
            ram = next((c for c in cands if "RAM tier" in c.name and not c.error), None)
            if ram and ram.warm_s:
                lines.append(f"- RAM tier -> GPU vs pinned copy: {100 * _gbps(ram.warm_s, size) / pinned:.0f} % (target >= 90 %)")
            if sw:
                lines.append(f"- page cache -> GPU vs pinned copy: {100 * sw / pinned:.0f} % (target >= 75 %)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
