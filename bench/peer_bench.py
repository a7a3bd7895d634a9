"""Peer-serving overhead: time per image of a running generation while the agent serves a large
file to another agent, against the same generation idle.

    PYTHONSAFEPATH=1 .venv/bin/python bench/peer_bench.py

The generation is the built-in diffusers runner on the tiny SD 1.5 test checkpoint (real
architecture, random weights) on the CPU, as in `bench/runner_bench.py`. The serving side is
the agent's real `PeerServer` (its default upload cap, then no cap) sending a file of
`--file-gib` to a fetching client in another process over loopback, for as long as the
generations run. Rounds alternate idle and serving so that drift in the machine's load hits
both alike. On a machine where the fetching client shares the cores, the figure is an upper
bound of what serving costs the agent. Written to BENCHMARKS.md (section "peer-serving").
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report
from stoker.agent.peer_server import PeerServer, PeerServerSettings, blob_path
from stoker.agent.runner.base import ArtifactKind, GenerationRequest, LoadedArtifact
from stoker.agent.runner.diffusers_runner import DiffusersRunner
from stoker.agent.settings import AgentSettings
from stoker.testing import tiny_models

TOKEN = "bench-peer-token-0123456789abcdef"


def _fetch_forever(url: str, token: str, stop: multiprocessing.synchronize.Event, done: multiprocessing.Value) -> None:
    """Another agent fetching the file again and again, reading it into one reused buffer."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while not stop.is_set():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", parts.path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        if response.status != 200:
            time.sleep(0.05)
            conn.close()
            continue
        while not stop.is_set():
            n = response.readinto(view)
            if not n:
                break
            with done.get_lock():
                done.value += n
        conn.close()


def _image_s(generate: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-gib", type=float, default=2.0, help="size of the file served (default 2 GiB)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating idle/serving rounds per condition")
    parser.add_argument("--repeats", type=int, default=3, help="images per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the generation")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    state = tiny_models.tiny_sd15_state()
    checkpoint = LoadedArtifact(name="tiny-sd15", kind=ArtifactKind.CHECKPOINT, tensors=state, sha256="sd15")
    runner = DiffusersRunner(device="cpu")
    request = GenerationRequest(prompt="a lighthouse", width=args.size, height=args.size, steps=args.steps, seed=1)

    def generate() -> object:
        return runner.generate(checkpoint=checkpoint, loras=[], vae=None, request=request,
                               on_step=lambda i, n: None, should_cancel=lambda: False)

    generate()  # warm-up: builds the pipeline modules
    default_cap = float(AgentSettings.model_fields["peer_upload_bytes_per_s"].default)
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        blob = pathlib.Path(tmp) / "blob"
        chunk = os.urandom(1 << 20)
        with blob.open("wb") as fh:
            for _ in range(int(args.file_gib * 1024)):
                fh.write(chunk)
        digest = hashlib.sha256(b"stand-in: the server looks the digest up, it does not hash").hexdigest()
        results: list[tuple[str, list[float], float]] = []
        idle: list[float] = []
        conditions = (("serving, the agent's default cap", default_cap), ("serving, no cap", 0.0))
        serving: dict[str, tuple[list[float], int, float]] = {name: ([], 0, 0.0) for name, _ in conditions}
        cpu_per_gib: dict[str, float] = {}
        for name, cap in conditions:
            settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", max_uploads=2, upload_bytes_per_s=cap)
            with PeerServer(settings, lookup=lambda sha: blob if sha == digest else None) as server:
                url = server.url("127.0.0.1") + blob_path(digest)
                for _ in range(args.rounds):
                    idle += _image_s(generate, args.repeats)
                    stop = multiprocessing.Event()
                    done = multiprocessing.Value("q", 0)
                    client = multiprocessing.Process(target=_fetch_forever, args=(url, TOKEN, stop, done), daemon=True)
                    client.start()
                    deadline = time.monotonic() + 30
                    while done.value == 0 and time.monotonic() < deadline:
                        time.sleep(0.01)  # the transfer is under way before the generation starts
                    started, before = time.perf_counter(), done.value
                    times = _image_s(generate, args.repeats)
                    elapsed, moved = time.perf_counter() - started, done.value - before
                    stop.set()
                    client.join(timeout=30)
                    if client.is_alive():
                        client.kill()
                    got, total_bytes, total_s = serving[name]
                    serving[name] = (got + times, total_bytes + moved, total_s + elapsed)
                cpu_per_gib[name] = _server_cpu_per_gib(url)
        load_after = os.getloadavg()[0]
    base = statistics.median(idle)
    rows = [f"| idle | {base * 1000:.0f} ms | {_p90(idle) * 1000:.0f} ms | - | - | - |"]
    for name, cap in conditions:
        times, moved, seconds = serving[name]
        med = statistics.median(times)
        rate = moved / seconds / 2**20 if seconds else 0.0
        rows.append(f"| {name} ({f'{cap / 2**20:.0f} MiB/s' if cap else 'unlimited'}) | {med * 1000:.0f} ms | "
                    f"{_p90(times) * 1000:.0f} ms | {rate:.0f} MiB/s | {100 * (med / base - 1):+.1f} % | "
                    f"{cpu_per_gib[name] * 1000:.0f} ms |")
    command = "PYTHONSAFEPATH=1 .venv/bin/python bench/peer_bench.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k != "no_write")
    markdown = "\n".join([
        "## Peer serving: overhead on a running generation",
        "",
        f"Command: `{command}`. Machine: {report.describe_machine()}; 1-minute load average {load_before:.2f} "
        f"at the start and {load_after:.2f} at the end.",
        "",
        f"Time per image of the built-in runner (tiny SD 1.5 architecture, CPU, {args.threads} torch thread(s), "
        f"{args.size}x{args.size}, {args.steps} euler steps, CFG on) while the agent's `PeerServer` sends a "
        f"{args.file_gib:g} GiB file to a fetching client in another process over loopback, against the same "
        f"generation idle ({args.rounds} alternating rounds of {args.repeats} images per condition). The server "
        "sends with sendfile(2) in paced slices from its own threads; the fetching client shares this machine's "
        "cores, so the overhead is an upper bound of what serving alone costs the agent. The last column is "
        "the CPU time of the serving process per GiB sent, measured with no generation running.",
        "",
        "| agent | time per image (median) | p90 | served | overhead (median) | server CPU per GiB served |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(markdown)
    if not args.no_write:
        report.write_section("peer-serving", markdown)


def _server_cpu_per_gib(url: str, *, seconds: float = 3.0) -> float:
    """CPU seconds this process (only the server's threads are busy) spends per GiB it serves."""
    stop = multiprocessing.Event()
    done = multiprocessing.Value("q", 0)
    client = multiprocessing.Process(target=_fetch_forever, args=(url, TOKEN, stop, done), daemon=True)
    client.start()
    deadline = time.monotonic() + 30
    while done.value == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu, before = time.process_time(), done.value
    time.sleep(seconds)
    cpu, moved = time.process_time() - cpu, done.value - before
    stop.set()
    client.join(timeout=30)
    if client.is_alive():
        client.kill()
    return cpu / max(1e-9, moved / 2**30)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


if __name__ == "__main__":
    main()
