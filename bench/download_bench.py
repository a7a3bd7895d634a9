"""Download throughput of the agent's downloader against plain curl, in one run.

    .venv/bin/python bench/download_bench.py --size-gb 2

A model file server (the test server, using sendfile) runs in a separate process
on 127.0.0.1, so this process's CPU time is the downloader's alone. Each round
downloads the same file with curl (a child process) and with the agent's
`Downloader` (streaming, sha256, fsync, atomic rename); rounds alternate to share
page-cache and CPU-frequency effects. curl does not fsync, so a "curl + fsync"
figure is also given for a like-for-like comparison. Results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench.report import describe_machine, write_section
from stoker.agent.download import DownloadPolicy, DownloadRequest, Downloader

_BLOCK = 64 << 20


def make_file(path: pathlib.Path, size_bytes: int) -> str:
    """Random-looking content (a random block repeated) and its sha256."""
    block = os.urandom(_BLOCK)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size_bytes
        while left > 0:
            chunk = block[: min(left, _BLOCK)]
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_cpu_s_per_gb() -> float:
    """CPU seconds hashlib's sha256 needs per GB here: the floor of verified downloads."""
    block = os.urandom(_BLOCK)
    before = cpu_s(resource.RUSAGE_SELF)
    digest = hashlib.sha256()
    for _ in range(8):
        digest.update(block)
    return (cpu_s(resource.RUSAGE_SELF) - before) / (8 * _BLOCK / 1e9)


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_curl(url: str, dest: pathlib.Path) -> tuple[float, float, float]:
    """(wall seconds, wall seconds including fsync, curl CPU seconds)."""
    before = cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dest), url], check=True)
    wall = time.perf_counter() - t0
    cpu = cpu_s(resource.RUSAGE_CHILDREN) - before
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return wall, time.perf_counter() - t0, cpu


def run_agent(downloader: Downloader, url: str, dest: pathlib.Path, sha256: str, size_bytes: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    before = cpu_s(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = downloader.download(DownloadRequest(url=url, dest=dest, sha256=sha256, size_bytes=size_bytes))
    wall = time.perf_counter() - t0
    assert result.sha256 == sha256 and result.size_bytes == size_bytes
    return wall, cpu_s(resource.RUSAGE_SELF) - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="file size in GB (10^9 bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    size_bytes = int(args.size_gb * 1e9)
    gb = size_bytes / 1e9
    load_before = os.getloadavg()[0]
    sha_cpu = sha256_cpu_s_per_gb()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="stoker-download-bench-") as tmp:
        work = pathlib.Path(tmp)
        serve_dir, out_dir = work / "serve", work / "out"
        serve_dir.mkdir()
        out_dir.mkdir()
        print(f"writing a {gb:.2f} GB test file ...", flush=True)
        sha256 = make_file(serve_dir / "model.safetensors", size_bytes)
        server = subprocess.Popen(
            [sys.executable, "-m", "stoker.testing.model_server", str(serve_dir), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = server.stdout.readline() if server.stdout else ""
            base_url = line.strip().rsplit(" ", 1)[-1]
            url = f"{base_url}/model.safetensors"
            curl_walls, curl_sync_walls, curl_cpus, agent_walls, agent_cpus = [], [], [], [], []
            policy = DownloadPolicy(allow_http=True, trust_env=False)
            with Downloader(policy) as downloader:
                for i in range(args.rounds):
                    dest = out_dir / "curl.bin"
                    wall, wall_sync, cpu = run_curl(url, dest)
                    dest.unlink()
                    curl_walls.append(wall)
                    curl_sync_walls.append(wall_sync)
                    curl_cpus.append(cpu)
                    dest = out_dir / "agent.bin"
                    wall, cpu = run_agent(downloader, url, dest, sha256, size_bytes)
                    dest.unlink()
                    agent_walls.append(wall)
                    agent_cpus.append(cpu)
                    print(
                        f"round {i + 1}: curl {gb / curl_walls[-1]:.2f} GB/s ({gb / wall_sync:.2f} with fsync), "
                        f"agent {gb / wall:.2f} GB/s, agent CPU {cpu / gb:.2f} s/GB",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(timeout=10)

    load_after = os.getloadavg()[0]
    curl_rate = gb / statistics.median(curl_walls)
    curl_sync_rate = gb / statistics.median(curl_sync_walls)
    agent_rate = gb / statistics.median(agent_walls)
    rows = [
        ("curl (no fsync)", curl_rate, statistics.median(curl_cpus) / gb),
        ("curl + fsync", curl_sync_rate, statistics.median(curl_cpus) / gb),
        ("agent downloader (sha256 + fsync + rename)", agent_rate, statistics.median(agent_cpus) / gb),
    ]
    table = "\n".join(
        ["| client | throughput (GB/s, median) | CPU s per GB |", "|---|---|---|"]
        + [f"| {name} | {rate:.2f} | {cpu:.2f} |" for name, rate, cpu in rows]
    )
    md = (
        f"## Model download over loopback\n\n"
        f"Command: `.venv/bin/python bench/download_bench.py --size-gb {args.size_gb:g} --rounds {args.rounds}` "
        f"({gb:.2f} GB file, {args.rounds} alternating rounds, server in its own process using sendfile).\n"
        f"Machine: {describe_machine()}.\n\n{table}\n\n"
        f"Agent / curl throughput: **{agent_rate / curl_rate:.2f}** "
        f"(against curl + fsync: **{agent_rate / curl_sync_rate:.2f}**). "
        f"Agent CPU: **{statistics.median(agent_cpus) / gb:.2f} s per GB** (streaming, sha256, write, fsync); "
        f"sha256 alone costs {sha_cpu:.2f} s per GB on this machine, the rest is receiving through "
        f"httpx/h11 and writing.\n\n"
        f"1-minute load average {load_before:.1f} before and {load_after:.1f} after the run "
        f"(other work shared the machine; compare the ratio, not the absolute rates).\n"
    )
    print()
    print(md)
    if not args.no_write:
        write_section("download", md)


if __name__ == "__main__":
    main()
