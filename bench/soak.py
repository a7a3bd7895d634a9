"""Chaos soak: real control plane, real operator and agent processes, faults injected all along.

    .venv/bin/python bench/soak.py [--minutes 15] [--short] [--no-write] [--json FILE] [--workdir DIR]

Starts etcd and kube-apiserver (stoker.testing.controlplane), two `stoker-operator`
processes (leader election), four real `stoker-agent` processes on the CPU with small
disk budgets, and a model server on 127.0.0.1 that serves a handful of tiny SD 1.5
checkpoints only to a bearer token (a Secret the agents read from their secrets folder).
A feeder submits GenerationJobs at a steady rate while a chaos schedule injects:

* agent kill -9 every 30-60 s (a random agent; restarted after a few seconds, half the
  time with its cache wiped, as a pod on a new node);
* operator kill -9 every few minutes (restarted a few seconds later, as a kubelet would);
* one kube-apiserver restart (same port and etcd data);
* the model server down for 20 s;
* one agent's disk full (its cache volume, a tmpfs, filled to the brim for a while).

Then it drains (every job must end), checks and prints: jobs, faults by kind, succeeded,
failed by reason (and whether a fault explains each), lost jobs (never finished),
duplicate results (a second result file, or a job that succeeded twice), disk budget
overruns (bytes on an agent's disk above its budget, sampled every second), partial files
(a copy reported that is not a complete, verified file), requeue latency after agent kills
(p50/p99, kill -> the job unbound from the dead agent), failover time after operator kills
and the API server restart, and secret leaks (the token anywhere in logs, statuses or
Events). Writes the "soak" section of BENCHMARKS.md.

`--short` is the same in about four minutes, for the test suite (tests/integration/test_soak.py),
which asserts: 0 lost, 0 duplicates, 0 overruns, 0 partial files, 0 leaks, every failure explained.

Needs root for the tmpfs (the full disk); without it that fault is skipped and said so.
Loopback only. The full soak keeps two cores busy: run nothing else heavy beside it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import pathlib
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from kubernetes import client, config, watch

from stoker import kube
from stoker.testing import controlplane, tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import BIN, Process, operator_process, wait_for

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import describe_machine, write_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMESPACE = "soak"
SECRET = "model-token"
EXPLAINING_REASONS = frozenset({
    "AgentLost", "AgentStopping", "DiskFull", "DiskError", "OutOfMemory", "InsufficientCache", "ConnectionFailed",
    "HTTPServerError", "Timeout", "ModelUnavailable", "SourceChanged", "APIUnavailable",
})
"""Reasons a job may fail through an injected fault (a job failing for anything else is unexplained)."""


@dataclasses.dataclass
class Plan:
    """What the soak does and when (seconds from the start of the load)."""

    minutes: float = 15.0
    operators: int = 2
    agents: int = 4
    models: int = 6
    budget_models: int = 3
    """Disk budget of each agent, in model files: evictions happen all along."""
    jobs_per_minute: float = 32.0
    steps: int = 20
    size: int = 256
    """Image side in pixels: with `steps`, a second or two per job on a CPU, so that agent kills hit running jobs."""
    agent_kill_every_s: tuple[float, float] = (30.0, 60.0)
    wipe_fraction: float = 0.5
    operator_kill_every_s: float = 150.0
    apiserver_restart_at_s: float = 300.0
    apiserver_down_s: float = 8.0
    server_down_at_s: float = 420.0
    server_down_s: float = 20.0
    disk_full_at_s: float = 180.0
    disk_full_for_s: float = 150.0
    agent_lease_s: int = 10
    leader_lease_s: float = 10.0
    drain_timeout_s: float = 600.0
    seed: int = 7

    @classmethod
    def short(cls) -> Plan:
        return cls(minutes=3.5, models=4, jobs_per_minute=24.0, steps=3, size=64, agent_kill_every_s=(30.0, 45.0),
                   operator_kill_every_s=100.0, apiserver_restart_at_s=75.0, server_down_at_s=125.0,
                   disk_full_at_s=40.0, disk_full_for_s=60.0, agent_lease_s=6, leader_lease_s=6.0,
                   drain_timeout_s=420.0)


@dataclasses.dataclass
class Results:
    jobs: int = 0
    succeeded: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    unexplained: list[str] = dataclasses.field(default_factory=list)
    lost: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)
    result_mismatches: list[str] = dataclasses.field(default_factory=list)
    overruns: list[str] = dataclasses.field(default_factory=list)
    partial: list[str] = dataclasses.field(default_factory=list)
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    requeue_s: list[float] = dataclasses.field(default_factory=list)
    requeue_missed: list[str] = dataclasses.field(default_factory=list)
    """Jobs bound to a killed agent that neither left it nor finished within 120 s."""
    failover_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    leaks: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0
    attempts: int = 0

    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.result_mismatches or self.overruns or self.partial
                    or self.leaks or self.unexplained or self.requeue_missed)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Soak:
    def __init__(self, plan: Plan, work: pathlib.Path, cp: controlplane.ControlPlane) -> None:
        self.plan, self.work, self.cp = plan, work, cp
        self.rng = random.Random(plan.seed)
        self.api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        self.objects = kube.Objects(self.api, NAMESPACE)
        self.coord = client.CoordinationV1Api(self.api)
        self.token = secrets.token_urlsafe(24)
        self.results = Results()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        """Latest object of every job seen on the watch."""
        self.unbound_at: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        """Job -> (time, agent) each time the watch saw it leave an agent."""
        self.agents: dict[str, Process] = {}
        self.operators: dict[str, Process] = {}
        self.budget_bytes = 0
        self.model_sizes: dict[str, int] = {}
        self.model_sha: dict[str, str] = {}
        self.full_agent: str | None = None
        self.server: ModelServer | None = None
        self.results_dir = work / "results"
        self.created = 0
        self.restarting: set[str] = set()
        """Processes the chaos schedule is restarting itself (the kubelet stand-in leaves them alone)."""

    # ---- setup --------------------------------------------------------------------

    def setup(self) -> None:
        core = client.CoreV1Api(self.api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        files: dict[str, pathlib.Path] = {}
        for i in range(self.plan.models):
            path = tiny_models.write_tiny_sd15(self.work / "models" / f"m{i}.safetensors", seed=100 + i)
            files[path.name] = path
            self.model_sizes[f"m{i}"] = path.stat().st_size
            self.model_sha[f"m{i}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        self.server = ModelServer(files).start()
        self.server.faults.required_token = self.token
        self.budget_bytes = int(self.plan.budget_models * max(self.model_sizes.values()) * 1.05)
        secret_dir = self.work / "secrets" / SECRET
        secret_dir.mkdir(parents=True)
        (secret_dir / "token").write_text(self.token)
        core.create_namespaced_secret(NAMESPACE, client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET), string_data={"token": self.token}))
        for i in range(self.plan.models):
            name = f"m{i}"
            self.objects.create("ModelCache", {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
                                               "metadata": {"name": name}, "spec": {
                                                   "replicas": 1 if i < 2 else 0,
                                                   "source": {"url": self.server.url(f"{name}.safetensors"),
                                                              "sha256": self.model_sha[name],
                                                              "sizeBytes": self.model_sizes[name],
                                                              "secretRef": {"name": SECRET}}}})
        self.results_dir.mkdir()
        for i in range(self.plan.operators):
            self._start_operator(f"op-{i}")
        names = [f"agent-{i}" for i in range(self.plan.agents)]
        self.full_agent = names[-1] if self._mount_volume(names[-1]) else None
        if self.full_agent is None:
            self.results.notes.append("no tmpfs could be mounted (not root?): the full-disk fault was skipped")
        for name in names:
            core.create_namespaced_pod(NAMESPACE, client.V1Pod(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1PodSpec(node_name=f"node-{name}", containers=[client.V1Container(name="agent",
                                                                                               image="stoker")])))
            self._start_agent(name)
        for name in names:
            wait_for(lambda name=name: self._accepting(name), timeout_s=300, interval_s=0.5,
                     message=lambda name=name: f"{name} to be ready\n{self.agents[name].tail()}")

    def cache_dir(self, agent: str) -> pathlib.Path:
        return self.work / "agents" / agent / "cache"

    def _mount_volume(self, agent: str) -> bool:
        volume = self.cache_dir(agent)
        volume.mkdir(parents=True, exist_ok=True)
        size = f"{(self.budget_bytes * 2) // 2**20 + 8}m"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(volume)],
                              capture_output=True, text=True)
        return done.returncode == 0

    def _credential_args(self) -> list[str]:
        """The token's Secret declared for the model server's host, where agents bind credentials to hosts."""
        from stoker.agent.settings import AgentSettings

        if "credentials" not in AgentSettings.model_fields:
            return []
        return ["--credentials", json.dumps([{"secret": SECRET, "hosts": ["127.0.0.1"]}])]

    def _start_agent(self, name: str) -> None:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.agents[name] = Process([*self._agent_command(name)], log).start()

    def _agent_command(self, name: str) -> list[str]:
        return [
            str(BIN / "stoker-agent"), "--kubeconfig", str(self.cp.kubeconfig), "--namespace", NAMESPACE,
            "--pod-name", name, "--node-name", f"node-{name}", "--cache-dir", str(self.cache_dir(name)),
            "--results-dir", str(self.results_dir), "--allow-http", "--metrics-port", "0", "--device", "cpu",
            "--disk-budget-bytes", str(self.budget_bytes), "--vram-budget-bytes", "256MiB",
            "--secrets-dir", str(self.work / "secrets"), "--lease-duration-s", str(self.plan.agent_lease_s),
            "--lease-renew-interval-s", "2", "--status-min-interval-s", "0.5", "--torch-threads", "1",
            "--shutdown-grace-s", "20", *self._credential_args(),
        ]

    def _start_operator(self, identity: str) -> None:
        log = self.work / "logs" / f"{identity}.log"
        log.parent.mkdir(exist_ok=True)
        self.operators[identity] = operator_process(self.cp.kubeconfig, NAMESPACE, log, identity=identity,
                                                    lease_grace_s=float(self.plan.agent_lease_s),
                                                    leader_lease_s=self.plan.leader_lease_s).start()

    def _accepting(self, name: str) -> bool:
        status = self.objects.get("CacheAgent", name).get("status") or {}
        return bool(status.get("slots")) and status.get("accepting", True)

    # ---- observers ----------------------------------------------------------------

    def watch_jobs(self) -> None:
        custom = self.objects.custom
        version = None
        while not self.stop.is_set():
            try:
                if version is None:
                    listing = custom.list_namespaced_custom_object("stoker.dev", "v1alpha1", NAMESPACE, "generationjobs")
                    version = listing["metadata"]["resourceVersion"]
                    for obj in listing["items"]:
                        self._saw_job(obj)
                for ev in watch.Watch().stream(custom.list_namespaced_custom_object, "stoker.dev", "v1alpha1",
                                               NAMESPACE, "generationjobs", resource_version=version, timeout_seconds=5):
                    if ev["type"] == "ERROR":
                        version = None
                        break
                    version = ev["object"]["metadata"]["resourceVersion"]
                    self._saw_job(ev["object"])
            except Exception:  # noqa: BLE001 - the API server restarts during the soak: relist
                version = None
                self.stop.wait(0.5)

    def _saw_job(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        agent = (obj["metadata"].get("labels") or {}).get("stoker.dev/agent")
        with self.lock:
            old = self.jobs.get(name)
            if old is not None and int(old["metadata"]["resourceVersion"]) >= int(obj["metadata"]["resourceVersion"]):
                return
            before = (old["metadata"].get("labels") or {}).get("stoker.dev/agent") if old else None
            self.jobs[name] = obj
            if before and before != agent:
                self.unbound_at[name].append((time.monotonic(), before))

    def sample(self) -> None:
        """Every second: bytes on each agent's disk against its budget, and copies reported against files."""
        while not self.stop.wait(1.0):
            for name in list(self.agents):
                models = self.cache_dir(name) / "models"
                try:
                    used = sum(p.stat().st_size for p in models.iterdir() if not p.name.endswith(".json"))
                except OSError:
                    continue
                if used > self.budget_bytes:
                    self.results.overruns.append(f"{name}: {used} bytes on disk, budget {self.budget_bytes}")
            try:
                agents = self.objects.list("CacheAgent")["items"]
            except Exception:  # noqa: BLE001 - the API server may be down
                continue
            for ca in agents:
                name = ca["metadata"]["name"]
                self._check_reported(name, (ca.get("status") or {}).get("models", []))

    def _check_reported(self, agent: str, models: list[dict[str, Any]]) -> None:
        """A copy an agent reports must be a complete file of the right size (a reported file may be
        evicted between the report and this look: only a file that exists with another size counts)."""
        if not self.agents[agent].alive:
            return
        sizes = {}
        for meta in (self.cache_dir(agent) / "models").glob("*.meta.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(meta.read_text())
                data_file = meta.with_name(meta.name[: -len(".meta.json")])
                if data_file.exists():
                    sizes[data["key"].rsplit("/", 1)[-1]] = data_file.stat().st_size
        for m in models:
            if m.get("preloaded") or m["name"] not in self.model_sizes or m["name"] not in sizes:
                continue
            if sizes[m["name"]] != self.model_sizes[m["name"]]:
                self.results.partial.append(f"{agent} reported {m['name']} with {sizes[m['name']]} bytes on disk")

    def kubelet(self) -> None:
        """Restart any operator or agent process that exited on its own (an operator that lost its
        leadership exits with an error so that its kubelet restarts it)."""
        while not self.stop.wait(1.0):
            for table, start in ((self.operators, self._start_operator), (self.agents, self._start_agent)):
                for name, proc in list(table.items()):
                    if proc.alive or name in self.restarting or self.stop.is_set():
                        continue
                    code = proc.proc.returncode if proc.proc is not None else None
                    self.results.notes.append(f"{name} exited on its own (code {code}) and was restarted")
                    print(f"[{time.strftime('%H:%M:%S')}] {name} exited (code {code}); restarting", flush=True)
                    start(name)

    # ---- load ---------------------------------------------------------------------

    def feed(self, until: float) -> None:
        period = 60.0 / self.plan.jobs_per_minute
        weights = [1.0 / (i + 1) for i in range(self.plan.models)]  # Zipf-like popularity
        while not self.stop.is_set() and time.monotonic() < until:
            model = self.rng.choices([f"m{i}" for i in range(self.plan.models)], weights)[0]
            name = f"job-{self.created:04d}"
            body = {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
                    "spec": {"model": model, "params": {"prompt": f"a lighthouse {self.created}", "steps": self.plan.steps,
                                                        "width": self.plan.size, "height": self.plan.size}}}
            for _ in range(120):  # the API server may be restarting: keep the job, as a client would
                try:
                    self.objects.create("GenerationJob", body)
                    self.created += 1
                    break
                except client.exceptions.ApiException as exc:
                    if exc.status == 409:
                        self.created += 1
                        break
                    time.sleep(0.5)
                except Exception:  # noqa: BLE001
                    time.sleep(0.5)
            self.stop.wait(period)

    # ---- chaos --------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        self.results.faults[kind] = self.results.faults.get(kind, 0) + 1
        print(f"[{time.strftime('%H:%M:%S')}] fault: {kind}", flush=True)

    def chaos(self, start: float, until: float) -> None:
        p = self.plan
        events: list[tuple[float, str]] = []
        t = start + self.rng.uniform(*p.agent_kill_every_s)
        while t < until:
            events.append((t, "agent"))
            t += self.rng.uniform(*p.agent_kill_every_s)
        t = start + p.operator_kill_every_s
        while t < until:
            events.append((t, "operator"))
            t += p.operator_kill_every_s
        events += [(start + p.apiserver_restart_at_s, "apiserver"), (start + p.server_down_at_s, "server"),
                   (start + p.disk_full_at_s, "disk")]
        threads: list[threading.Thread] = []
        for at, kind in sorted(events):
            if at >= until:
                continue
            if self.stop.wait(max(0.0, at - time.monotonic())):
                break
            action = {"agent": self.kill_agent, "operator": self.kill_operator, "apiserver": self.restart_apiserver,
                      "server": self.server_down, "disk": self.fill_disk}[kind]
            t = threading.Thread(target=action, name=f"fault-{kind}", daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    def kill_agent(self) -> None:
        name = self.rng.choice(sorted(self.agents))
        wipe = self.rng.random() < self.plan.wipe_fraction
        bound = self._bound_to(name)
        killed = time.monotonic()
        self.restarting.add(name)
        self.agents[name].kill()
        self.fault("agent kill -9 (cache wiped)" if wipe else "agent kill -9")
        if wipe:
            volume = self.cache_dir(name)
            for child in volume.iterdir() if volume.exists() else ():
                if child.name == ".ballast":
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.stop.wait(self.rng.uniform(2.0, 6.0))
        self._start_agent(name)
        self.restarting.discard(name)
        threading.Thread(target=self._measure_requeue, args=(name, bound, killed), daemon=True).start()

    def _bound_to(self, agent: str) -> list[str]:
        with self.lock:
            return [n for n, o in self.jobs.items() if (o["metadata"].get("labels") or {}).get("stoker.dev/agent") == agent
                    and (o.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]

    def _measure_requeue(self, agent: str, jobs: list[str], killed: float) -> None:
        deadline = killed + 120
        pending = set(jobs)
        while pending and time.monotonic() < deadline and not self.stop.is_set():
            with self.lock:
                for name in list(pending):
                    left = [t for t, a in self.unbound_at.get(name, []) if a == agent and t >= killed]
                    phase = (self.jobs[name].get("status") or {}).get("phase")
                    if left:
                        self.results.requeue_s.append(left[0] - killed)
                        pending.discard(name)
                    elif phase in ("Succeeded", "Failed"):
                        pending.discard(name)  # it finished before the kill was noticed
            time.sleep(0.2)
        if pending and not self.stop.is_set():
            with self.lock:
                self.results.requeue_missed.extend(f"{name} (on {agent})" for name in sorted(pending))

    def _leader(self) -> tuple[str | None, Any]:
        spec = self.coord.read_namespaced_lease("stoker-operator", NAMESPACE, _request_timeout=(2, 5)).spec
        return spec.holder_identity, spec.renew_time

    def _wait_leader(self, since: float, *, after: Any, kind: str) -> None:
        """Record the time from `since` until a live operator renews the leader Lease after `after`."""
        def renewed() -> bool:
            with contextlib.suppress(Exception):
                holder, renew = self._leader()
                return (holder in self.operators and self.operators[holder].alive and renew is not None
                        and (after is None or renew > after))
            return False

        try:
            wait_for(renewed, timeout_s=120, interval_s=0.2, message="a leader")
            self.results.failover_s.setdefault(kind, []).append(time.monotonic() - since)
        except AssertionError:
            self.results.notes.append(f"no leader renewed the Lease within 120 s after {kind}")

    def kill_operator(self) -> None:
        try:
            holder, renew = self._leader()
        except Exception:  # noqa: BLE001
            holder, renew = None, None
        victim = holder if holder in self.operators else self.rng.choice(sorted(self.operators))
        killed = time.monotonic()
        self.restarting.add(victim)
        self.operators[victim].kill()
        self.fault("operator kill -9 (leader)" if victim == holder else "operator kill -9")
        waiter = threading.Thread(target=self._wait_leader, args=(killed,),
                                  kwargs={"after": renew, "kind": "operator kill"}, daemon=True)
        waiter.start()
        self.stop.wait(5.0)
        self._start_operator(victim)
        self.restarting.discard(victim)
        waiter.join()

    def restart_apiserver(self) -> None:
        self.fault("kube-apiserver restart")
        self.cp.restart_apiserver(down_s=self.plan.apiserver_down_s)
        back, back_wall = time.monotonic(), dt.datetime.now(dt.timezone.utc)
        self._wait_leader(back, after=back_wall, kind="kube-apiserver restart")

    def server_down(self) -> None:
        assert self.server is not None
        files = {p.name: p for p in (self.work / "models").glob("*.safetensors")}
        port = self.server.port
        self.server.stop()
        self.fault("model server down 20 s")
        self.stop.wait(self.plan.server_down_s)
        for _ in range(50):
            try:
                self.server = ModelServer(files, port=port).start()
                break
            except OSError:
                time.sleep(0.2)
        self.server.faults.required_token = self.token

    def fill_disk(self) -> None:
        if self.full_agent is None:
            return
        volume = self.cache_dir(self.full_agent)
        ballast = volume / ".ballast"
        subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=1M", "count=100000"], capture_output=True)
        self.fault("agent disk full")
        self.stop.wait(self.plan.disk_full_for_s)
        ballast.unlink(missing_ok=True)

    # ---- the end ------------------------------------------------------------------

    def drain(self) -> None:
        def done() -> bool:
            with self.lock:
                return len(self.jobs) >= self.created and all(
                    (o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in self.jobs.values())

        with contextlib.suppress(AssertionError):
            wait_for(done, timeout_s=self.plan.drain_timeout_s, interval_s=1.0, message="every job to finish")

    def collect(self) -> None:
        r = self.results
        items = self.objects.list("GenerationJob")["items"]
        r.jobs = len(items)
        files = collections.Counter(p.name.split("__")[1] for p in self.results_dir.glob("*.png"))
        events = client.CoreV1Api(self.api).list_namespaced_event(NAMESPACE).items
        succeeded_events = collections.Counter(e.involved_object.name for e in events if e.reason == "Succeeded")
        for job in items:
            name, st = job["metadata"]["name"], job.get("status") or {}
            phase = st.get("phase")
            r.attempts += int(st.get("attempt") or 1)
            if phase == "Succeeded":
                r.succeeded += 1
                location = pathlib.Path((st.get("result") or {}).get("location", ""))
                if not location.is_file() or hashlib.sha256(location.read_bytes()).hexdigest() != st["result"]["sha256"]:
                    r.result_mismatches.append(f"{name}: result file missing or not what the status says")
            elif phase == "Failed":
                reason = st.get("reason") or "Unknown"
                r.failed[reason] = r.failed.get(reason, 0) + 1
                text = json.dumps(st)
                if reason not in EXPLAINING_REASONS and not any(x in text for x in EXPLAINING_REASONS):
                    r.unexplained.append(f"{name}: {reason}: {st.get('message')}")
            else:
                r.lost.append(f"{name}: {phase}")
            if files.get(name, 0) > 1 or succeeded_events.get(name, 0) > 1:
                r.duplicates.append(f"{name}: {files.get(name, 0)} result files, {succeeded_events.get(name, 0)} "
                                    "Succeeded events")
        for name in self.agents:  # every file left is complete and what its source holds
            for meta in (self.cache_dir(name) / "models").glob("*.meta.json"):
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(meta.read_text())
                    model = data["key"].rsplit("/", 1)[-1]
                    data_file = meta.with_name(meta.name[: -len(".meta.json")])
                    if hashlib.sha256(data_file.read_bytes()).hexdigest() != self.model_sha.get(model):
                        r.partial.append(f"{name}: {data_file.name} ({model}) is not the file its source serves")
        self._leaks(items, events)

    def _leaks(self, jobs: list[dict[str, Any]], events: list[Any]) -> None:
        haystacks: dict[str, str] = {}
        for log in (self.work / "logs").glob("*.log"):
            haystacks[log.name] = log.read_text(errors="replace")
        for f in self.cp.workdir.glob("*.log"):
            haystacks[f"control-plane/{f.name}"] = f.read_text(errors="replace")
        for kind in ("CacheAgent", "ModelCache"):
            haystacks[kind] = json.dumps(self.objects.list(kind))
        haystacks["GenerationJob"] = json.dumps(jobs)
        haystacks["Event"] = "\n".join(f"{e.reason} {e.message}" for e in events)
        self.results.leaks = [where for where, text in haystacks.items() if self.token in text]

    def shutdown(self) -> None:
        self.stop.set()
        for p in [*self.agents.values(), *self.operators.values()]:
            p.stop(timeout_s=30)
        if self.server is not None:
            self.server.stop()
        if self.full_agent is not None:
            subprocess.run(["umount", "-l", str(self.cache_dir(self.full_agent))], check=False)


def run(plan: Plan, work: pathlib.Path) -> Results:
    with controlplane.run_control_plane(workdir=work / "control-plane", crd_dir=REPO / "crds") as cp:
        soak = Soak(plan, work, cp)
        threads: list[threading.Thread] = []
        try:
            soak.setup()
            print(f"[{time.strftime('%H:%M:%S')}] {plan.agents} agents and {plan.operators} operators up; load for "
                  f"{plan.minutes:.1f} min", flush=True)
            start = time.monotonic()
            until = start + plan.minutes * 60
            for target, args in ((soak.watch_jobs, ()), (soak.sample, ()), (soak.chaos, (start, until)),
                                 (soak.kubelet, ())):
                t = threading.Thread(target=target, args=args, daemon=True)
                t.start()
                threads.append(t)
            soak.feed(until)
            threads[2].join()  # the chaos schedule ends and everything it broke is restored
            soak.drain()
            soak.results.duration_s = time.monotonic() - start
            soak.collect()
        finally:
            soak.shutdown()
            for t in threads:
                t.join(timeout=15)
        return soak.results


def render(plan: Plan, r: Results, *, command: str, load: tuple[float, float]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    failover = "; ".join(f"{kind}: {', '.join(f'{x:.1f}' for x in xs)} s" for kind, xs in sorted(r.failover_s.items()))
    lines = [
        f"| jobs | {r.jobs} ({r.attempts} attempts) |",
        f"| faults | {sum(r.faults.values())}: " + ", ".join(f"{k} x{v}" for k, v in sorted(r.faults.items())) + " |",
        f"| succeeded | {r.succeeded} |",
        f"| failed | {sum(r.failed.values())}" + (": " + ", ".join(f"{k} x{v}" for k, v in sorted(r.failed.items()))
                                                   if r.failed else "") + f" (unexplained: {len(r.unexplained)}) |",
        f"| lost | {len(r.lost)} |",
        f"| duplicate results | {len(r.duplicates)} (result files not matching status: {len(r.result_mismatches)}) |",
        f"| disk budget overruns | {len(r.overruns)} (samples over budget) |",
        f"| partial files | {len(r.partial)} |",
        f"| requeue after agent kill | p50 {fmt(percentile(r.requeue_s, 0.5))}, p99 {fmt(percentile(r.requeue_s, 0.99))} "
        f"({len(r.requeue_s)} jobs; agent Lease {plan.agent_lease_s} s; left bound to a killed agent: "
        f"{len(r.requeue_missed)}) |",
        f"| failover | {failover or '-'} (leader Lease {plan.leader_lease_s:.0f} s) |",
        f"| secret leaks | {len(r.leaks)}" + (f" ({', '.join(r.leaks)})" if r.leaks else "") + " |",
    ]
    table = "\n".join(["| measure | value |", "| --- | --- |", *lines])
    notes = "".join(f"\n- {n}" for n in r.notes)
    return f"""
## Chaos soak (`{command}`)

{plan.operators} operators, {plan.agents} agents (disk budgets of {plan.budget_models} model files), {plan.models}
token-protected tiny SD 1.5 checkpoints, {plan.jobs_per_minute:.0f} jobs/min ({plan.steps} steps at {plan.size}x{plan.size})
for {plan.minutes:.1f} min, then a
drain; {r.duration_s / 60:.1f} min in all. {describe_machine()}; load average {load[0]:.2f} at the start,
{load[1]:.2f} at the end.

{table}

Verdict: {"all invariants held" if r.ok() else "INVARIANTS BROKEN (see the soak's output)"}: 0 lost, 0 duplicates,
0 overruns, 0 partial files, 0 leaks, every failure explained by a fault.{notes}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, help="minutes of load (default 15; 3.5 with --short)")
    ap.add_argument("--short", action="store_true", help="the few-minute version the test suite runs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    ap.add_argument("--workdir", type=pathlib.Path, help="keep processes' logs and files here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    plan = Plan.short() if args.short else Plan()
    plan.seed = args.seed
    if args.minutes is not None:
        plan.minutes = args.minutes
    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="stoker-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    results = run(plan, work)
    load_end = os.getloadavg()[0]
    command = "PYTHONSAFEPATH=1 .venv/bin/python bench/soak.py" + (" --short" if args.short else "") + (
        f" --minutes {args.minutes:g}" if args.minutes is not None else "")
    text = render(plan, results, command=command, load=(load_start, load_end))
    print(text)
    for title, items in (("unexplained failures", results.unexplained), ("lost", results.lost),
                         ("duplicates", results.duplicates), ("result mismatches", results.result_mismatches),
                         ("overruns", results.overruns[:20]), ("partial files", results.partial), ("leaks", results.leaks)):
        if items:
            print(f"{title}:\n  " + "\n  ".join(items))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(results), indent=2))
    if not args.no_write:
        write_section("soak", text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
