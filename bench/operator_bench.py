"""Operator throughput: bindings per second and create->bound latency on a real API server.

Starts a local etcd + kube-apiserver, registers 200 lightweight agents (CacheAgent
with status, plus a Lease renewed by one thread for all of them), then measures two
scenarios with the `stoker-operator` process:

- backlog: 2,000 jobs are pending before the operator starts; how fast does it bind them all?
- stream: the operator runs while 2,000 jobs are created as fast as 16 client threads can;
  per-job latency from the create call returning to the watch showing the binding label.

Every binding is the real thing: one preconditioned merge patch (label + attempt
annotation) and one status patch per job, plus a Scheduled Event (written in the
background, aggregated rather than dropped). Run:

    .venv/bin/python bench/operator_bench.py [--agents 200] [--jobs 2000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import pathlib
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from kubernetes import client, config, watch  # noqa: E402

from bench.report import describe_machine, write_section  # noqa: E402
from stoker.api.protocol import AGENT_LABEL, LEASE_LABEL  # noqa: E402
from stoker.kube import Objects  # noqa: E402
from stoker.testing import controlplane  # noqa: E402
from stoker.testing.operator_harness import operator_process, wait_for  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
PACED_RATE = 50.0


def api_for(kubeconfig: pathlib.Path, pool: int = 32) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


def setup_namespace(api: client.ApiClient, ns: str, *, agents: int, models: int, rng: random.Random) -> list[str]:
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objs = Objects(api, ns)
    names = [f"sd-{i:03d}" for i in range(models)]
    coord = client.CoordinationV1Api(api)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda m: objs.create("ModelCache", {
            "apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": m},
            "spec": {"source": {"url": f"https://models.example.com/{m}.safetensors", "sizeBytes": GIB},
                     "replicas": 0}}), names))

        def agent(i: int) -> None:
            name = f"agent-{i:03d}"
            objs.create("CacheAgent", {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                                       "metadata": {"name": name}, "spec": {}})
            held = rng.sample(names, 4)
            objs.patch_status("CacheAgent", name, {
                "node": f"node-{i // 4}", "zone": f"zone-{i % 3}", "slots": 10, "freeSlots": 10,
                "disk": {"budgetBytes": 50 * GIB, "usedBytes": 16 * GIB},
                "vram": {"budgetBytes": 80 * GIB, "usedBytes": 4 * GIB},
                "models": [{"name": m, "tier": "vram" if k == 0 else "disk", "sizeBytes": GIB}
                           for k, m in enumerate(held)],
                # Fast downloads: a cold load on a free agent (about 2 s of placement cost) beats waiting for a
                # busy holder (5 s by default). These agents never finish a job, so a job that chose to wait
                # would wait until it ages out; the benchmark measures the binder, not the waiting policy.
                "bandwidth": {"downloadBps": 2e9, "diskToGpuBps": 3e9, "ramToGpuBps": 25e9}})
            now = dt.datetime.now(dt.timezone.utc)
            coord.create_namespaced_lease(ns, client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, labels={LEASE_LABEL: "agent"}),
                spec=client.V1LeaseSpec(holder_identity=name, lease_duration_seconds=15, renew_time=now)))

        list(pool.map(agent, range(agents)))
    return names


def renew_leases(api: client.ApiClient, ns: str, agents: int, stop: threading.Event) -> None:
    coord = client.CoordinationV1Api(api)

    def renew(i: int) -> None:
        name = f"agent-{i:03d}"
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        try:
            coord.patch_namespaced_lease(name, ns, {"spec": {"renewTime": now}})
        except Exception:  # noqa: BLE001 - the control plane may be going away at the end of a run
            if not stop.is_set():
                raise

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while not stop.wait(5.0):
            list(pool.map(renew, range(agents)))


def create_jobs(api: client.ApiClient, ns: str, names: list[str], count: int, rng: random.Random,
                created: dict[str, float], *, rate_per_s: float | None = None) -> None:
    """Create `count` jobs with 16 threads, as fast as possible or paced at `rate_per_s`."""
    objs = Objects(api, ns)
    weights = [1 / (k + 1) for k in range(len(names))]  # Zipf-like popularity
    models = rng.choices(names, weights=weights, k=count)

    start = time.monotonic()

    def one(i: int) -> None:
        if rate_per_s:
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        name = f"job-{i:05d}"
        objs.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                      "metadata": {"name": name},
                                      "spec": {"model": models[i], "params": {"prompt": "a lighthouse", "steps": 20}}})
        created[name] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


class BindWatcher(threading.Thread):
    """Records when the watch first shows each job's binding label."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        super().__init__(daemon=True)
        self.custom = client.CustomObjectsApi(api)
        self.ns = ns
        self.bound: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.rv = self.custom.list_namespaced_custom_object("stoker.dev", "v1alpha1", ns, "generationjobs",
                                                            limit=1)["metadata"]["resourceVersion"]

    def run(self) -> None:
        while not self.stop_event.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self.custom.list_namespaced_custom_object, "stoker.dev", "v1alpha1", self.ns,
                                   "generationjobs", resource_version=self.rv, timeout_seconds=5):
                    obj = ev["object"]
                    self.rv = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    if name not in self.bound and AGENT_LABEL in (obj["metadata"].get("labels") or {}):
                        self.bound[name] = time.monotonic()
                    if self.stop_event.is_set():
                        return
            except Exception:  # noqa: BLE001 - restart the watch
                time.sleep(0.2)


def write_ceiling(api: client.ApiClient, *, count: int = 500) -> float:
    """Single preconditioned label patches per second with 16 threads, measured in the same run:
    the API server's ceiling on this machine right now (a binding needs two patches and an Event)."""
    ns = "bench-ceiling"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objs = Objects(api, ns)

    def make(i: int) -> dict[str, Any]:
        return objs.create("GenerationJob", {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                                             "metadata": {"name": f"c-{i:05d}"},
                                             "spec": {"model": "m", "params": {"prompt": "x"}}})

    def patch(body: dict[str, Any]) -> None:
        objs.patch("GenerationJob", body["metadata"]["name"],
                   {"metadata": {"labels": {AGENT_LABEL: "nobody"}, "annotations": {"stoker.dev/attempt": "1"}}},
                   resource_version=body["metadata"]["resourceVersion"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(make, range(count)))
        t0 = time.monotonic()
        list(pool.map(patch, bodies))
        return count / (time.monotonic() - t0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_scenario(cp: controlplane.ControlPlane, api: client.ApiClient, *, mode: str, agents: int, jobs: int,
                 workdir: pathlib.Path, rng: random.Random) -> dict[str, Any]:
    ns = f"bench-{mode}"
    names = setup_namespace(api, ns, agents=agents, models=50, rng=rng)
    stop = threading.Event()
    renewer = threading.Thread(target=renew_leases, args=(api, ns, agents, stop), daemon=True)
    renewer.start()
    watcher = BindWatcher(api, ns)
    watcher.start()
    created: dict[str, float] = {}
    log = workdir / f"operator-{mode}.log"
    op = operator_process(cp.kubeconfig, ns, log, identity=f"bench-{mode}", lease_grace_s=30)
    try:
        if mode == "backlog":
            create_jobs(api, ns, names, jobs, rng, created)
            t0 = time.monotonic()
            op.start()
            wait_for(lambda: len(watcher.bound) >= jobs, timeout_s=600, interval_s=0.2,
                     message=lambda: f"all {jobs} bindings ({len(watcher.bound)} so far)\n{op.tail(20)}")
        else:
            op.start()
            wait_for(lambda: "state synced" in log.read_text(), timeout_s=60, message="the operator to sync")
            t0 = time.monotonic()
            create_jobs(api, ns, names, jobs, rng, created, rate_per_s=PACED_RATE if mode == "paced" else None)
            wait_for(lambda: len(watcher.bound) >= jobs, timeout_s=600, interval_s=0.2,
                     message=lambda: f"all {jobs} bindings ({len(watcher.bound)} so far)\n{op.tail(20)}")
        op_cpu = cpu_seconds(op.proc.pid) if op.proc is not None else float("nan")
        t_end = max(watcher.bound.values())
        first = min(watcher.bound.values())
        lat = [watcher.bound[n] - created[n] for n in created if n in watcher.bound]
        synced_line = next((line for line in log.read_text().splitlines() if "state synced" in line), "")
        # Verify that every job is bound exactly once to an agent with a free slot.
        items = client.CustomObjectsApi(api).list_namespaced_custom_object(
            "stoker.dev", "v1alpha1", ns, "generationjobs")["items"]
        per_agent: dict[str, int] = {}
        for j in items:
            a = j["metadata"]["labels"][AGENT_LABEL]
            per_agent[a] = per_agent.get(a, 0) + 1
        assert max(per_agent.values()) <= 10, "an agent got more jobs than slots"
        return {
            "mode": mode, "jobs": jobs, "agents": agents,
            "bind_rate": (jobs - 1) / max(1e-9, t_end - first),
            "end_to_end_s": t_end - t0,
            "p50": statistics.median(lat) if mode != "backlog" else None,
            "p99": pct(lat, 99) if mode != "backlog" else None,
            "create_rate": jobs / max(1e-9, max(created.values()) - min(created.values())),
            "synced": synced_line.split("INFO", 1)[-1].strip(),
            "operator_cpu_s": op_cpu,
        }
    finally:
        op.stop()
        stop.set()
        watcher.stop_event.set()
        renewer.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups: stop the operator and the control plane
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--modes", default="backlog,stream,paced", help="scenarios to run, comma-separated")
    p.add_argument("--workdir", default=None, help="keep logs here instead of a temporary folder")
    args = p.parse_args(argv)
    rng = random.Random(7)
    results = []
    loads: list[float] = []
    sampling = threading.Event()

    def sample_load() -> None:  # other work on the machine counts against every figure: record how much
        while not sampling.wait(5.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="stoker-opbench-") as tmp:
        work = pathlib.Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with controlplane.run_control_plane(workdir=work / "cp", crd_dir=REPO / "crds") as cp:
            api = api_for(cp.kubeconfig)
            ceiling = write_ceiling(api)
            print(f"API server ceiling: {ceiling:.0f} label patches/s", flush=True)
            for mode in args.modes.split(","):
                r = run_scenario(cp, api, mode=mode, agents=args.agents, jobs=args.jobs, workdir=work, rng=rng)
                print(r, flush=True)
                results.append(r)
    sampling.set()
    loads = loads or [os.getloadavg()[0]]
    rows = []
    for r in results:
        lat = "n/a (all created before the operator started)" if r["p50"] is None else \
            f"{r['p50'] * 1000:.0f} ms / {r['p99'] * 1000:.0f} ms"
        creates = "before start" if r["mode"] == "backlog" else f"{r['create_rate']:.0f}"
        rows.append(f"| {r['mode']} | {r['agents']} | {r['jobs']} | {creates} | {r['bind_rate']:.0f} | "
                    f"{r['end_to_end_s']:.1f} s | {lat} | {r['operator_cpu_s']:.0f} s |")
    stream_rates = ", ".join(f"{r['create_rate']:.0f} creates/s" for r in results if r["mode"] == "stream")
    md = "\n".join([
        "## Operator: bindings per second and create→bound latency",
        "",
        "Command: `.venv/bin/python bench/operator_bench.py` "
        f"(--agents {args.agents} --jobs {args.jobs}). Real kube-apiserver + etcd on loopback, the "
        "`stoker-operator` process, lightweight agents (CacheAgent status + Lease renewed every 5 s; "
        "10 slots each, 2 GB/s downloads so that no job prefers waiting for a busy agent, which these agents, "
        "never finishing a job, would not repay), 50 models with Zipf popularity. Each binding is one preconditioned merge patch "
        "(label + attempt annotation), one status patch and one Event.",
        "",
        f"Machine: {describe_machine()}. The API server, etcd, the operator and the load generator share it; "
        f"1-minute load average during the run: mean {statistics.mean(loads):.1f}, max {max(loads):.1f} (other work "
        "on the machine counts against every figure). "
        f"Ceiling measured in the same run: {ceiling:.0f} single preconditioned label patches/s from 16 client "
        "threads. A binding costs two patches plus an Event (aggregated, and written by two background threads "
        "that give way while the write pool is saturated, so Events trail a burst instead of slowing it; none "
        "is dropped below 10,000 waiting), and every create and watch competes for the same two cores, so "
        "about a third of that ceiling is what any binder following the protocol can reach here. The operator "
        "uses placement's fast paths: a pending queue kept sorted between passes and read lazily, incremental "
        "demand counts, a FleetIndex per namespace and AgentViews reused until their agent changes.",
        "",
        "| scenario | agents | jobs | creates/s | bindings/s | all bound after | create→bound p50 / p99 | operator CPU |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "backlog: jobs pending before the operator starts; the time includes its start-up, leader election and "
        "initial list. Operator CPU: user + system seconds of the operator process, start-up included. stream: "
        "jobs created as fast as 16 client threads can while the operator runs "
        f"({stream_rates}), faster "
        f"than they can be bound, so latency is queueing. paced: one job every {1000 / PACED_RATE:.0f} ms is "
        "requested (the creates/s column shows what the API server delivered). Latency is "
        "from the create call returning to the binding label appearing on a watch. Reference: the Kubernetes "
        "scheduler's throughput target is about 100 pods/s.",
    ])
    print(md)
    if not args.no_write:
        write_section("operator", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
