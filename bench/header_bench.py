"""Safetensors header parsing: Stoker's validating parser against safetensors' own.

    .venv/bin/python bench/header_bench.py [--tensors 20000] [--runs 30] [--no-write]

Writes a file with N small tensors (names like a real checkpoint's) and times, with a
warm page cache, the best of `--runs`:

* safetensors: `safe_open(path).keys()`, which parses and validates the header in Rust;
* stoker: `safetensors_header.read_header(path)`, the check the agent runs on every
  download, every file at start-up and every load.

Target: Stoker within 2x of safetensors. Writes the "header" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable

from safetensors import safe_open

from stoker.agent import safetensors_header

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import describe_machine, write_section  # noqa: E402

TARGET_RATIO = 2.0


def write_file(path: pathlib.Path, tensors: int) -> int:
    """A valid safetensors file with `tensors` F16 tensors of 2x2 (the header is what is measured)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in range(tensors):
        name = f"model.diffusion_model.output_blocks.{i // 100}.{i % 100}.transformer_blocks.0.attn1.to_q.weight"
        header[name] = {"dtype": "F16", "shape": [2, 2], "data_offsets": [offset, offset + 8]}
        offset += 8
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return len(blob)


def best_of(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=20_000, help="tensors in the file (default 20000)")
    ap.add_argument("--runs", type=int, default=30, help="runs of each parser; the best counts (default 30)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="stoker-header-bench-") as tmp:
        path = pathlib.Path(tmp) / "many.safetensors"
        header_bytes = write_file(path, args.tensors)

        def theirs() -> None:
            with safe_open(path, "pt") as f:
                assert len(f.keys()) == args.tensors

        def ours() -> None:
            assert len(safetensors_header.read_header(path).tensors) == args.tensors

        theirs(), ours()  # warm the page cache and the imports
        st_best, st_median = best_of(theirs, args.runs)
        our_best, our_median = best_of(ours, args.runs)
    ratio = our_best / st_best
    load = os.getloadavg()[0]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    rows = [
        f"| safetensors `safe_open(...).keys()` | {st_best * 1e3:.1f} | {st_median * 1e3:.1f} |",
        f"| stoker `read_header` | {our_best * 1e3:.1f} | {our_median * 1e3:.1f} |",
    ]
    table = "\n".join(["| parser | best ms | median ms |", "| --- | ---: | ---: |", *rows])
    print(table)
    print(f"stoker / safetensors: {ratio:.2f}x (target <= {TARGET_RATIO:.0f}x: {verdict}); load average {load:.2f}")
    if not args.no_write:
        write_section("header", f"""
## Safetensors header parsing (`.venv/bin/python bench/header_bench.py`)

{args.tensors} tensors, a {header_bytes / 1e6:.1f} MB header, warm page cache, best and median of {args.runs} runs.
{describe_machine()}; load average {load:.2f} when measured.

{table}

Stoker's parser takes {ratio:.2f}x the time of safetensors' own (target: at most {TARGET_RATIO:.0f}x, {verdict}).
It validates what safetensors validates and nothing less (see `agent/safetensors_header.py`).
""")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
