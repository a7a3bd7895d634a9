"""Operator at fleet scale: bindings per second, create->bound latency, CPU and memory, from one run.

Starts a local etcd + kube-apiserver and, in one namespace, registers lightweight agents
(a CacheAgent with status and a labelled Lease each; they hold a few models and never
finish a job, so every binding fills a slot), then runs the `stoker-operator` process
through these phases, measuring everything against the same API server:

- ceiling: single preconditioned merge patches of a label and annotations (what a
  binding is) per second from 16 client threads: C, the most any binder can do here;
- backlog: jobs pending before the operator starts; bindings per second from the first
  binding to the last;
- paced: jobs created at a steady rate while the operator runs; create->bound latency
  (from the create call returning to the label showing on a watch);
- memory: jobs created until the namespace holds `--memory-jobs`; the operator's
  resident memory before and after, per job.

The operator's CPU time is sampled throughout and counted per binding within each
phase (start-up excluded). With `--profile DIR` the operator is sampled with py-spy
during the backlog and paced phases; the top entries go into the report. Run:

    .venv/bin/python bench/operator_bench.py                  # 1,000 agents, 100 creates/s for 5 min, 100,000 jobs
    .venv/bin/python bench/operator_bench.py --paced-s 60 --memory-jobs 20000   # shorter
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime as dt
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from kubernetes import client, config, watch  # noqa: E402

from bench.report import describe_machine, write_section  # noqa: E402
from stoker.api import protocol  # noqa: E402
from stoker.kube import Objects  # noqa: E402
from stoker.testing import controlplane  # noqa: E402
from stoker.testing.operator_harness import Process, operator_process, wait_for  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
AGENT_LABEL = protocol.AGENT_LABEL
LEASE_LABEL = getattr(protocol, "LEASE_LABEL", "stoker.dev/lease")


def api_for(kubeconfig: pathlib.Path, pool: int = 48) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


def parallel(fn: Any, items: Any, threads: int = 16) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def write_ceiling(api: client.ApiClient, *, count: int = 1000) -> float:
    """Preconditioned merge patches of a label and two annotations per second, 16 client threads."""
    ns = "bench-ceiling"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objs = Objects(api, ns)
    bodies = parallel(lambda i: objs.create("GenerationJob", {
        "apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": f"c-{i:05d}"},
        "spec": {"model": "m", "params": {"prompt": "x"}}}), range(count))
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()

    def patch(body: dict[str, Any]) -> None:
        objs.patch("GenerationJob", body["metadata"]["name"], {"metadata": {
            "labels": {AGENT_LABEL: "nobody"},
            "annotations": {"stoker.dev/attempt": "1", "stoker.dev/scheduled-at": stamp}}},
            resource_version=body["metadata"]["resourceVersion"])

    t0 = time.monotonic()
    parallel(patch, bodies)
    return count / (time.monotonic() - t0)


def setup_fleet(api: client.ApiClient, ns: str, *, agents: int, slots: int, models: int,
                lease_s: int, rng: random.Random) -> list[str]:
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objs = Objects(api, ns)
    coord = client.CoordinationV1Api(api)
    names = [f"sd-{i:03d}" for i in range(models)]
    parallel(lambda m: objs.create("ModelCache", {
        "apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": m},
        "spec": {"source": {"url": f"https://models.example.com/{m}.safetensors", "sizeBytes": GIB},
                 "replicas": 0}}), names)
    held = {i: rng.sample(names, 4) for i in range(agents)}

    def agent(i: int) -> None:
        name = f"agent-{i:04d}"
        objs.create("CacheAgent", {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                                   "metadata": {"name": name}, "spec": {}})
        objs.patch_status("CacheAgent", name, {
            "node": f"node-{i // 4}", "zone": f"zone-{i % 3}", "slots": slots, "freeSlots": slots,
            "disk": {"budgetBytes": 50 * GIB, "usedBytes": 16 * GIB},
            "vram": {"budgetBytes": 80 * GIB, "usedBytes": 4 * GIB},
            "models": [{"name": m, "tier": "vram" if k == 0 else "disk", "sizeBytes": GIB}
                       for k, m in enumerate(held[i])],
            # Downloads fast enough that a cold load on a free agent beats waiting for a busy holder
            # (these agents never finish a job: waiting for them would last until a promise breaks).
            "bandwidth": {"downloadBps": 2e10, "diskToGpuBps": 3e9, "ramToGpuBps": 25e9}})
        coord.create_namespaced_lease(ns, client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, labels={LEASE_LABEL: "agent"}),
            spec=client.V1LeaseSpec(holder_identity=name, lease_duration_seconds=lease_s * 3,
                                    renew_time=dt.datetime.now(dt.timezone.utc))))

    parallel(agent, range(agents))
    return names


class LeaseRenewer(threading.Thread):
    """Renews every agent's Lease once per `period_s`, spread evenly over the period."""

    def __init__(self, api: client.ApiClient, ns: str, agents: int, period_s: float) -> None:
        super().__init__(daemon=True)
        self.coord = client.CoordinationV1Api(api)
        self.ns, self.agents, self.period_s = ns, agents, period_s
        self.stop_event = threading.Event()
        self.errors = 0

    def run(self) -> None:
        i = 0
        step = self.period_s / max(1, self.agents)
        while not self.stop_event.wait(step):
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
            try:
                self.coord.patch_namespaced_lease(f"agent-{i % self.agents:04d}", self.ns, {"spec": {"renewTime": now}})
            except Exception as exc:  # noqa: BLE001 - a missed renewal is what the grace is for; keep going
                if self.stop_event.is_set():
                    return
                self.errors += 1
                print(f"lease renewal failed: {exc}", file=sys.stderr)
            i += 1


class BindWatcher(threading.Thread):
    """When the watch first shows each job's binding label, and to which agent."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        super().__init__(daemon=True)
        self.custom = client.CustomObjectsApi(api)
        self.ns = ns
        self.bound: dict[str, float] = {}
        self.agent_of: dict[str, str] = {}
        self.stop_event = threading.Event()
        self.rv = self.custom.list_namespaced_custom_object("stoker.dev", "v1alpha1", ns, "generationjobs",
                                                            limit=1)["metadata"]["resourceVersion"]

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                for ev in watch.Watch().stream(self.custom.list_namespaced_custom_object, "stoker.dev", "v1alpha1",
                                               self.ns, "generationjobs", resource_version=self.rv, timeout_seconds=5,
                                               allow_watch_bookmarks=True):
                    obj = ev["object"]
                    self.rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    agent = (obj["metadata"].get("labels") or {}).get(AGENT_LABEL)
                    if agent and name not in self.bound:
                        self.bound[name] = time.monotonic()
                        self.agent_of[name] = agent
                    if self.stop_event.is_set():
                        return
            except Exception:  # noqa: BLE001 - restart the watch
                time.sleep(0.2)


def create_jobs(api: client.ApiClient, ns: str, models: list[str], names: list[str], rng: random.Random,
                created: dict[str, float], *, rate_per_s: float | None = None, threads: int = 16) -> float:
    """Create jobs `names` with `threads` client threads, as fast as possible or paced; returns
    the creates per second delivered."""
    objs = Objects(api, ns)
    weights = [1 / (k + 1) for k in range(len(models))]  # Zipf-like popularity
    chosen = rng.choices(models, weights=weights, k=len(names))
    start = time.monotonic()

    def one(i: int) -> None:
        if rate_per_s:
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        objs.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                      "metadata": {"name": names[i]},
                                      "spec": {"model": chosen[i], "params": {"prompt": "a lighthouse", "steps": 20}}})
        created[names[i]] = time.monotonic()

    parallel(one, range(len(names)), threads)
    return len(names) / max(1e-9, time.monotonic() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat, idle and iowait excluded)."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Every 0.25 s: (monotonic time, operator CPU seconds, bindings seen, CPU seconds of each of
    `others`, busy seconds of the machine); and the load average."""

    def __init__(self, pid: int, watcher: BindWatcher, others: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pid, self.watcher, self.others = pid, watcher, others
        self.samples: list[tuple[float, float, int, dict[str, float], float]] = []
        self.loads: list[float] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop_event.wait(0.25):
            try:
                self.samples.append((time.monotonic(), cpu_seconds(self.pid), len(self.watcher.bound),
                                     {name: cpu_seconds(pid) for name, pid in self.others.items()},
                                     machine_busy_seconds()))
            except OSError:
                return
            n += 1
            if n % 20 == 0:
                self.loads.append(os.getloadavg()[0])

    def _around(self, t0: float, t1: float) -> tuple[tuple[float, float, int, dict[str, float], float], ...]:
        before = max((s for s in self.samples if s[0] <= t0), default=self.samples[0], key=lambda s: s[0])
        after = min((s for s in self.samples if s[0] >= t1), default=self.samples[-1], key=lambda s: s[0])
        return before, after

    def cpu_between(self, t0: float, t1: float) -> float:
        """Operator CPU seconds spent between two monotonic times (nearest samples)."""
        before, after = self._around(t0, t1)
        return after[1] - before[1]

    def cores_between(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used on average between two monotonic times: the operator, each of `others`, the machine."""
        before, after = self._around(t0, t1)
        span = max(1e-9, after[0] - before[0])
        cores = {"operator": (after[1] - before[1]) / span}
        cores.update({name: (after[3][name] - before[3][name]) / span for name in self.others})
        cores["machine"] = (after[4] - before[4]) / span
        return cores


class Profiler:
    """py-spy sampling the operator for one phase (raw stacks; see `top_entries`)."""

    def __init__(self, pid: int, out: pathlib.Path) -> None:
        spy = shutil.which("py-spy", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/python -m pip install py-spy (it is in the bench extra)")
        self.out = out
        # --gil: only the thread running Python at each sample, i.e. where the CPU goes (threads waiting
        # on the API server are left out).
        self.proc = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out),
                                      "--nonblocking", "--gil"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def top_entries(raw: pathlib.Path, n: int = 12) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """(self, inclusive) shares of the busiest functions in py-spy raw output, threads together."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].rsplit(":", 1)[0] + ")" if " (" in f else f
                  for f in stack.split(";")]
        k = int(count)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    total = max(1, total)
    skip = ("<module>", "run (threading.py)", "_bootstrap", "_bootstrap_inner", "_worker (concurrent")
    inclusive = [(c / total, f) for f, c in incl.most_common() if not f.startswith(skip)][:n]
    return [(c / total, f) for f, c in own.most_common(n)], inclusive


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def operator_jobs_seen(log: pathlib.Path) -> int:
    """The job count of the operator's latest summary line ("jobs N, pending M, ...")."""
    seen = 0
    for line in log.read_text(errors="replace").splitlines():
        if " jobs " in line and ", pending " in line:
            try:
                seen = int(line.split(" jobs ", 1)[1].split(",", 1)[0])
            except ValueError:
                pass
    return seen


def run(args: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    rng = random.Random(7)
    out: dict[str, Any] = {"agents": args.agents, "slots": args.slots}
    with controlplane.run_control_plane(workdir=work / "cp", crd_dir=REPO / "crds") as cp:
        api = api_for(cp.kubeconfig)
        out["ceiling"] = ceiling = write_ceiling(api)
        print(f"ceiling C: {ceiling:.0f} binding-shaped patches/s", flush=True)
        ns = "bench"
        models = setup_fleet(api, ns, agents=args.agents, slots=args.slots, models=args.models,
                             lease_s=int(args.lease_renew_s), rng=rng)
        print(f"{args.agents} agents registered", flush=True)
        renewer = LeaseRenewer(api, ns, args.agents, args.lease_renew_s)
        renewer.start()
        watcher = BindWatcher(api, ns)
        watcher.start()
        created: dict[str, float] = {}
        serial = iter(range(10**9))
        log = work / "operator.log"
        op = operator_process(cp.kubeconfig, ns, log, identity="bench", lease_grace_s=args.lease_renew_s * 3,
                              leader_lease_s=15)
        sampler: Sampler | None = None
        try:
            backlog = [f"job-{next(serial):06d}" for _ in range(args.backlog)]
            if backlog:
                out["backlog_create_rate"] = create_jobs(api, ns, models, backlog, rng, created)
            t_start = time.monotonic()
            op.start()
            assert op.proc is not None
            sampler = Sampler(op.proc.pid, watcher, {m.name: m.proc.pid for m in cp.servers.values() if m.proc})
            sampler.start()
            prof = Profiler(op.proc.pid, work / "profile-backlog.raw") if args.profile else None
            if backlog:
                wait_for(lambda: len(watcher.bound) >= len(backlog), timeout_s=1200, interval_s=0.2,
                         message=lambda: f"the backlog bound ({len(watcher.bound)} of {len(backlog)})\n{op.tail(10)}")
                times = sorted(watcher.bound[n] for n in backlog)
                out["backlog"] = {
                    "jobs": len(backlog), "rate": (len(times) - 1) / max(1e-9, times[-1] - times[0]),
                    "all_bound_s": times[-1] - t_start, "first_s": times[0] - t_start,
                    "cpu_per_binding_ms": sampler.cpu_between(times[0], times[-1]) / max(1, len(times) - 1) * 1e3,
                    "cores": sampler.cores_between(times[0], times[-1]),
                    "load": os.getloadavg()[0]}
                print(f"backlog: {out['backlog']}", flush=True)
            else:
                wait_for(lambda: "state synced" in log.read_text(), timeout_s=120, message="the operator to sync")
            if prof is not None:
                prof.stop()
                out["profile_backlog"] = top_entries(prof.out)
            if args.paced_s > 0:
                rate = args.paced_rate if args.paced_rate > 0 else 0.4 * ceiling
                if args.agents * args.slots < args.backlog + int(rate * args.paced_s):
                    # jobs beyond the slots would never bind: the phase would wait for them forever
                    raise SystemExit(f"the agents' {args.agents * args.slots} slots cannot hold the backlog and "
                                     f"{int(rate * args.paced_s)} paced jobs ({rate:.0f}/s for {args.paced_s:g} s); "
                                     f"raise --slots or --agents, or lower --paced-s")
                paced = [f"job-{next(serial):06d}" for _ in range(int(rate * args.paced_s))]
                prof = Profiler(op.proc.pid, work / "profile-paced.raw") if args.profile else None
                out["paced_create_rate"] = create_jobs(api, ns, models, paced, rng, created, rate_per_s=rate)
                wait_for(lambda: all(n in watcher.bound for n in paced), timeout_s=600, interval_s=0.2,
                         message=lambda: f"the paced jobs bound ({sum(n in watcher.bound for n in paced)} of "
                                         f"{len(paced)})\n{op.tail(10)}")
                if prof is not None:
                    prof.stop()
                    out["profile_paced"] = top_entries(prof.out)
                lat = [watcher.bound[n] - created[n] for n in paced]
                times = sorted(watcher.bound[n] for n in paced)
                out["paced"] = {
                    "jobs": len(paced), "rate": rate, "p50_ms": statistics.median(lat) * 1e3,
                    "p99_ms": pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3,
                    "bind_rate": (len(times) - 1) / max(1e-9, times[-1] - times[0]),
                    "cpu_per_binding_ms": sampler.cpu_between(times[0], times[-1]) / max(1, len(times) - 1) * 1e3,
                    "cores": sampler.cores_between(times[0], times[-1]),
                    "load": os.getloadavg()[0]}
                print(f"paced: {out['paced']}", flush=True)
            per_agent = collections.Counter(watcher.agent_of.values())
            out["max_per_agent"] = max(per_agent.values(), default=0)
            assert out["max_per_agent"] <= args.slots, f"an agent got {out['max_per_agent']} jobs for {args.slots} slots"
            if args.memory_jobs > len(created):
                jobs_before = len(created)
                wait_for(lambda: operator_jobs_seen(log) >= jobs_before, timeout_s=60, interval_s=1.0,
                         message="the operator's summary line")
                rss_before = rss_bytes(op.proc.pid)
                more = [f"job-{next(serial):06d}" for _ in range(args.memory_jobs - len(created))]
                out["memory_create_rate"] = create_jobs(api, ns, models, more, rng, created)
                wait_for(lambda: operator_jobs_seen(log) >= args.memory_jobs, timeout_s=600, interval_s=1.0,
                         message=lambda: f"the operator to see {args.memory_jobs} jobs\n{op.tail(5)}")
                rss_after = rss_bytes(op.proc.pid)
                t_mem = time.monotonic()
                cpu_idle_0 = cpu_seconds(op.proc.pid)
                prof = Profiler(op.proc.pid, work / "profile-idle.raw") if args.profile else None
                time.sleep(10.0)  # what holding them costs while nothing happens (no free slot is left)
                if prof is not None:
                    prof.stop()  # (raw stacks only: not summarised in the table)
                out["memory"] = {
                    "jobs": args.memory_jobs, "added": len(more), "rss_before": rss_before, "rss_after": rss_after,
                    "per_job_bytes": (rss_after - rss_before) / max(1, len(more)),
                    "idle_cpu_share": (cpu_seconds(op.proc.pid) - cpu_idle_0) / (time.monotonic() - t_mem)}
                print(f"memory: {out['memory']}", flush=True)
            out["operator_cpu_s"] = cpu_seconds(op.proc.pid)
        finally:
            if sampler is not None:
                sampler.stop_event.set()
                out["loads"] = sampler.loads
            op.stop()
            renewer.stop_event.set()
            watcher.stop_event.set()
    return out


def markdown(args: argparse.Namespace, r: dict[str, Any], load_start: float) -> str:
    c = r["ceiling"]
    loads = r.get("loads") or [load_start]
    rows = [f"| single-patch ceiling C | {c:.0f} patches/s | |"]
    if "backlog" in r:
        b = r["backlog"]
        rows.append(f"| backlog: {b['jobs']:,} jobs pending at start | {b['rate']:.0f} bindings/s = "
                    f"**{b['rate'] / c:.2f} C**; all bound {b['all_bound_s']:.1f} s after start (first after "
                    f"{b['first_s']:.1f} s) | >= 0.6 C: {'met' if b['rate'] >= 0.6 * c else 'missed'} |")
    if "paced" in r:
        p = r["paced"]
        rows.append(f"| paced: {p['jobs']:,} jobs at {p['rate']:.0f} creates/s (**{p['rate'] / c:.2f} C**; "
                    f"{r['paced_create_rate']:.0f}/s delivered) | create->bound p50 **{p['p50_ms']:.0f} ms**, "
                    f"p99 **{p['p99_ms']:.0f} ms** (max {p['max_ms']:.0f} ms); {p['bind_rate']:.0f} bindings/s | "
                    f"p99 <= 1 s at 0.4 C: {'met' if p['p99_ms'] <= 1000 and p['rate'] >= 0.4 * c * 0.95 else 'missed'} |")
    cpu = [(name, r[name]["cpu_per_binding_ms"]) for name in ("backlog", "paced") if name in r]
    if cpu:
        rows.append("| operator CPU per binding | " + ", ".join(f"{name} **{ms:.2f} ms**" for name, ms in cpu)
                    + f" | <= 2 ms: {'met' if all(ms <= 2 for _, ms in cpu) else 'missed'} |")
    shares = [(name, r[name]["cores"]) for name in ("backlog", "paced") if "cores" in r.get(name, {})]
    if shares:
        rows.append("| cores in use (of " + str(os.cpu_count()) + ") | " + "; ".join(
            f"{name}: " + ", ".join(f"{who} {n:.2f}" for who, n in cores.items()) for name, cores in shares) + " | |")
    if "memory" in r:
        m = r["memory"]
        rows.append(f"| operator memory at {m['jobs']:,} jobs | RSS {m['rss_after'] / 2**20:.0f} MiB "
                    f"({m['rss_before'] / 2**20:.0f} MiB before the last {m['added']:,}): "
                    f"**{m['per_job_bytes'] / 1024:.1f} KiB per job**; idle with them: {m['idle_cpu_share'] * 100:.0f} % "
                    f"of a core | bounded (linear in jobs) |")
    lines = [
        "## Operator at fleet scale: bindings, create→bound latency, CPU, memory",
        "",
        "Command: `.venv/bin/python bench/operator_bench.py` "
        f"(--agents {args.agents} --slots {args.slots} --backlog {args.backlog} --paced-rate "
        f"{args.paced_rate if args.paced_rate > 0 else '0.4C'} --paced-s {args.paced_s} --memory-jobs {args.memory_jobs}"
        f"{' --profile DIR' if args.profile else ''}). "
        "Real kube-apiserver + etcd on loopback, the `stoker-operator` process, one namespace of lightweight agents "
        f"(a CacheAgent with status and a labelled Lease each, renewed every {args.lease_renew_s:.0f} s; "
        f"{args.slots} slots, 4 of {args.models} models held; 20 GB/s downloads, so that no job prefers waiting "
        "for a busy agent: they never finish a job), "
        "jobs over the models with Zipf popularity. A binding is one preconditioned merge patch (label and two "
        "annotations); the Scheduled Event is written in the background.",
        "",
        f"Machine: {describe_machine()}. The API server, etcd, the operator and the load generator share it; "
        f"1-minute load average during the run: mean {statistics.mean(loads):.1f}, max {max(loads):.1f} "
        "(other work on the machine counts against every figure; the targets are ratios of this run's ceiling).",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        *rows,
        "",
        "C: preconditioned merge patches of the binding's shape per second from 16 client threads, measured first "
        "in the same run. Backlog rate: bindings from the first to the last, as a watch saw them. Paced latency: "
        "from the create call returning to the label showing on a watch. CPU: the operator process's user + system "
        "time between the phase's first and last binding, per binding (start-up excluded). Cores in use: CPU seconds per "
        "second over the same span, of each process and of the whole machine (the load generator and the watch "
        "that times bindings are the rest). Memory: resident set "
        "of the operator process before and after the namespace grew to the stated number of jobs (most of them "
        "pending: the agents' slots are full), per job added.",
    ]
    for phase in ("backlog", "paced"):
        prof = r.get(f"profile_{phase}")
        if prof:
            own, incl = prof
            lines += ["", f"Where the operator's CPU went in the {phase} phase (py-spy `--gil`: the thread running "
                      "Python at each sample; share of samples):",
                      "", "| self | function | | inclusive | function |", "|---:|---|---|---:|---|"]
            for (so, fo), (si, fi) in zip(own, incl):
                lines.append(f"| {so * 100:.1f} % | `{fo}` | | {si * 100:.1f} % | `{fi}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups: stop the operator and the control plane
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--slots", type=int, default=40, help="slots per agent (agents never finish a job)")
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--backlog", type=int, default=5000, help="jobs pending before the operator starts")
    p.add_argument("--paced-rate", type=float, default=100.0,
                   help="creates per second in the paced phase; 0: 0.4 times the ceiling measured in the run")
    p.add_argument("--paced-s", type=float, default=300.0, help="length of the paced phase; 0 skips it")
    p.add_argument("--memory-jobs", type=int, default=100_000,
                   help="grow the namespace to this many jobs and measure the operator's memory; 0 skips it")
    p.add_argument("--lease-renew-s", type=float, default=60.0, help="each agent renews its Lease this often")
    p.add_argument("--profile", action="store_true", help="sample the operator with py-spy (backlog and paced phases)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--workdir", default=None, help="keep logs (and profiles) here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.agents * args.slots < args.backlog + args.paced_rate * args.paced_s:
        p.error("the agents' slots cannot hold the backlog and the paced jobs: raise --slots or --agents")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stoker-opbench-") as tmp:
        work = pathlib.Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    md = markdown(args, result, load_start)
    print(md)
    if not args.no_write:
        write_section("operator", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
