"""The `stoker-operator` command: watches through kopf, control loops in a thread (shell).

kopf's `on.event` watchers (no per-object handlers, so nothing is written back to
the objects) keep the in-memory `State` current. One control thread, active only
while this process holds the leader Lease, runs the scheduling pass, the failure
reconciler and the replica planner; their writes go through a thread pool. A standby
keeps its watches warm and takes over when the leader stops renewing.

Every thread either survives whatever the client raises (a failed pass or renewal is
retried) or, if it ends anyway, takes the process down with exit code 1 so that the
kubelet restarts it: an operator whose leader election or control loop died must never
keep running as if it were fine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from stoker import __version__, logs
from stoker.operator import gc_policy
from stoker.operator.placement import PlacementSettings

log = logging.getLogger("stoker.operator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stoker-operator",
        description="Stoker operator: binds GenerationJobs to CacheAgents, keeps warm replicas of ModelCaches, "
                    "and recovers from lost agents.")
    p.add_argument("--version", action="version", version=f"stoker-operator {__version__}")
    p.add_argument("--namespace", default=os.environ.get("STOKER_WATCH_NAMESPACE") or None,
                   help="watch only this namespace (default: all namespaces; env STOKER_WATCH_NAMESPACE)")
    p.add_argument("--fleet", default=os.environ.get("STOKER_FLEET") or None,
                   help="manage only the GenerationJobs, ModelCaches and CacheAgents labelled stoker.dev/fleet=FLEET "
                        "(default: those without the label; env STOKER_FLEET), so that two installations can share "
                        "a namespace")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig file (default: $KUBECONFIG, then the in-cluster service account)")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="serve Prometheus metrics at /metrics on this port; 0 picks a free port (logged)")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address the metrics endpoint listens on (default %(default)s; 0.0.0.0 or :: where "
                        "Prometheus scrapes the pod)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="serve no metrics")
    p.add_argument("--health-port", type=int, default=0,
                   help="serve kopf's liveness probe at /healthz on this port; 0 disables")
    p.add_argument("--health-addr", default="127.0.0.1",
                   help="address the liveness probe listens on (default %(default)s; 0.0.0.0 in a pod, for the kubelet)")
    p.add_argument("--lease-grace-s", type=float, default=None,
                   help="an agent whose Lease was not renewed for this long is NotReady and loses its jobs "
                        "(default: the Lease's own leaseDurationSeconds)")
    p.add_argument("--identity", default=None,
                   help="this operator's name in the leader Lease (default: $POD_NAME, else host name and a random suffix)")
    p.add_argument("--leader-namespace", default=None,
                   help="namespace of the leader Lease (default: --namespace, else $POD_NAMESPACE, else default)")
    p.add_argument("--leader-lease-name", default=None,
                   help="name of the leader Lease (default stoker-operator); operators sharing it elect one leader, so "
                        "each installation in a namespace needs its own (the chart uses the release's name)")
    p.add_argument("--leader-lease-duration-s", type=float, default=15.0,
                   help="a standby takes over after seeing no leader renewal for this long")
    p.add_argument("--download-weight", type=float,
                   default=os.environ.get("STOKER_DOWNLOAD_WEIGHT") or str(PlacementSettings().download_weight),
                   help="placement cost of a second of downloading relative to a second of waiting; higher trades "
                        "start latency for fewer bytes pulled from model sources (>= 1, default %(default)s, the "
                        "placement core's; env STOKER_DOWNLOAD_WEIGHT)")
    p.add_argument("--peer-weight", type=float,
                   default=os.environ.get("STOKER_PEER_WEIGHT") or str(PlacementSettings().peer_weight),
                   help="placement cost of a second of fetching a model from another agent (the peer tier) relative "
                        "to a second of waiting; higher keeps jobs with the agents that hold their model rather "
                        "than spreading copies (>= 1, default %(default)s; env STOKER_PEER_WEIGHT)")
    p.add_argument("--pass-interval-s", type=float, default=os.environ.get("STOKER_PASS_INTERVAL_S") or "0.05",
                   help="least time between the starts of two control passes: a busy fleet's events are planned "
                        "in batches, not one pass per event (adds at most this to a binding's latency; default "
                        "%(default)s; env STOKER_PASS_INTERVAL_S)")
    p.add_argument("--write-threads", type=int, default=16, help="concurrent API writes")
    p.add_argument("--missing-model-grace-s", type=float,
                   default=float(os.environ.get("STOKER_MISSING_MODEL_GRACE_S") or 60.0),
                   help="a job naming a ModelCache that does not exist fails with ModelCacheNotFound this long after "
                        "its creation, unless its spec.missingModelGraceSeconds says otherwise (default %(default)s; "
                        "env STOKER_MISSING_MODEL_GRACE_S)")
    p.add_argument("--job-ttl-s", type=float, default=float(os.environ["STOKER_JOB_TTL_S"])
                   if os.environ.get("STOKER_JOB_TTL_S") else None,
                   help="delete finished jobs that set no ttlSecondsAfterFinished this long after they finish "
                        "(default: keep them; env STOKER_JOB_TTL_S)")
    p.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("STOKER_LOG_FORMAT") or "text",
                   help="text, or json: one object per line with job, model and agent as fields (env STOKER_LOG_FORMAT)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return p


def make_api_client(kubeconfig: str | None, *, pool_size: int) -> Any:
    """A kubernetes ApiClient with a connection pool large enough for the write threads."""
    from kubernetes import client, config

    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook = _at_most_every(_AUTH_REFRESH_S, cfg.refresh_api_key_hook)
    return client.ApiClient(cfg)


_AUTH_REFRESH_S = 5.0
"""How often the client's credentials are re-read: the kubernetes client's hook re-applies the whole
configuration before every request (setting the host scans the proxy environment), while it reloads a
token only once a minute (in-cluster) or five minutes before it expires (kubeconfig)."""


def _at_most_every(period_s: float, hook: Callable[[Any], None]) -> Callable[[Any], None]:
    last = -math.inf

    def throttled(cfg: Any) -> None:
        nonlocal last, hook
        now = time.monotonic()
        if now - last >= period_s:
            last = now
            hook(cfg)
            if cfg.refresh_api_key_hook is not throttled:  # the client's hook installs itself again
                hook, cfg.refresh_api_key_hook = cfg.refresh_api_key_hook, throttled

    return throttled


class Operator:
    """The state, the loops and the leader election of one operator process."""

    def __init__(self, args: argparse.Namespace, api: Any) -> None:
        from stoker.api.protocol import OPERATOR_LEASE
        from stoker.operator import failure, leader, pending_report, placement, replica_shell, scheduler, state

        self.args = args
        self.api = api
        placement_settings = placement.PlacementSettings(download_weight=args.download_weight,
                                                         peer_weight=args.peer_weight)
        self.state = state.State(placement_settings=placement_settings)
        self.stop = threading.Event()
        self.lost = threading.Event()
        self.fatal: str | None = None
        """Why the process must exit with an error (a thread that should run for good ended)."""
        identity = args.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        lease_ns = args.leader_namespace or args.namespace or os.environ.get("POD_NAMESPACE") or "default"
        self.leader = leader.LeaderElector(
            api, leader.LeaderSettings(namespace=lease_ns, identity=identity, name=args.leader_lease_name or OPERATOR_LEASE,
                                       lease_duration_s=args.leader_lease_duration_s),
            on_lost=self._on_lost)
        self.writer = scheduler.Writer(api, threads=args.write_threads, is_leader=self.leader.is_leader)
        self.writer.objects("default")  # import the client's API modules now, not in the first pass
        grace = args.lease_grace_s
        self.scheduler = scheduler.Scheduler(self.state, self.writer, lease_grace_s=grace, settings=placement_settings)
        self.reconciler = failure.Reconciler(self.state, self.writer, lease_grace_s=grace, default_ttl_s=args.job_ttl_s)
        self.pending = pending_report.PendingReporter(
            self.state, self.writer, lease_grace_s=grace, missing_grace_s=args.missing_model_grace_s,
            placement_messages=lambda: dict(self.scheduler.unplaceable))
        self.replicas = replica_shell.ReplicaShell(self.state, self.writer, lease_grace_s=grace)
        self.on_lost_callbacks: list[Any] = []
        self._synced = False

    def _on_lost(self) -> None:
        self.lost.set()
        for cb in self.on_lost_callbacks:
            cb()

    def fail(self, why: str) -> None:
        """Stop everything and exit with an error (see the module docstring)."""
        if self.fatal is None:
            self.fatal = why
        self.stop.set()
        self.state.changed.set()
        for cb in self.on_lost_callbacks:
            cb()

    def supervised(self, name: str, target: Any, *args: Any) -> threading.Thread:
        """A daemon thread running `target(*args)` that ends the process when it dies or returns
        while the operator is still meant to run."""

        def run() -> None:
            try:
                target(*args)
            except BaseException:  # noqa: BLE001 - anything at all: exit rather than limp on
                log.critical("thread %s died; exiting so that the operator restarts", name, exc_info=True)
                self.fail(f"thread {name} died")
                return
            if not self.stop.is_set() and not self.lost.is_set():
                log.critical("thread %s ended while the operator was running; exiting", name)
                self.fail(f"thread {name} ended")

        return threading.Thread(target=run, name=name, daemon=True)

    def sync(self) -> None:
        """List everything once, so that the first passes of a new leader see complete state
        (kopf's watches deliver the same objects too; older versions are ignored)."""
        from kubernetes import client

        from stoker.api import GROUP, VERSION
        from stoker.api.protocol import LEASE_LABEL, fleet_selector

        custom = client.CustomObjectsApi(self.api)
        ns = self.args.namespace
        fleet = fleet_selector(self.args.fleet)

        def items(group: str, version: str, plural: str, selector: str = "") -> list[dict[str, Any]]:
            if ns:
                return custom.list_namespaced_custom_object(group, version, ns, plural, label_selector=selector)["items"]
            return custom.list_cluster_custom_object(group, version, plural, label_selector=selector)["items"]

        now_mono = time.monotonic()
        for body in items("coordination.k8s.io", "v1", "leases", LEASE_LABEL):
            self.state.upsert_lease(body, now_mono=now_mono)
        for body in items(GROUP, VERSION, "cacheagents", fleet):
            self.state.upsert_agent(body)
        for body in items(GROUP, VERSION, "modelcaches", fleet):
            self.state.upsert_model(body)
        for body in items(GROUP, VERSION, "generationjobs", fleet):
            self.state.upsert_job(body)
        with self.state.lock:
            log.info("state synced: %d jobs (%d pending), %d agents, %d models, %d leases", len(self.state.jobs),
                     len(self.state.pending), len(self.state.agents), len(self.state.models), len(self.state.leases))

    def control_loop(self) -> None:
        last_reconcile = last_replicas = last_summary = last_pending = 0.0
        last_fleet = -1
        collector = gc_policy.Collector()
        while not self.stop.is_set():
            self.state.changed.wait(0.25)
            self.state.changed.clear()
            collector.tick(time.monotonic())
            if self.stop.is_set() or not self.leader.is_leader():
                continue
            try:
                if not self._synced:
                    self.sync()
                    self._synced = True
                t0 = time.perf_counter()
                mono = time.monotonic()
                # Reconcile first: it also decides which model sources count as Failed, whose jobs
                # the scheduler must not bind.
                if mono - last_reconcile >= 0.5:
                    last_reconcile = mono
                    self.reconciler.reconcile_once()
                t1 = time.perf_counter()
                self.scheduler.schedule_once()
                t2 = time.perf_counter()
                # The replica plan covers every model and agent: rerun it when they changed (at most
                # every 2 s), and every 10 s for demand decay and Lease expiry.
                fleet = self.state.fleet_version
                if (mono - last_replicas >= 2.0 and fleet != last_fleet) or mono - last_replicas >= 10.0:
                    last_replicas, last_fleet = mono, fleet
                    self.replicas.apply_once()
                if mono - last_pending >= 1.0:
                    last_pending = mono
                    self.pending.report_once()
                t3 = time.perf_counter()
                if mono - last_summary >= 10.0:
                    last_summary = mono
                    with self.state.lock:
                        counts = (len(self.state.jobs), len(self.state.pending), len(self.state.inflight))
                    log.info("jobs %d, pending %d, bindings in flight %d, writes in flight %d, last plan "
                             "(examined, bound, waiting, unplaceable) %s", *counts, self.writer.busy_count(),
                             self.scheduler.last_plan)
                if t3 - t0 > 0.5:
                    log.info("slow control pass: reconcile %.3fs, schedule %.3fs, replicas %.3fs", t1 - t0, t2 - t1, t3 - t2)
                # A pass costs about the same for one new job as for fifty: under a stream of events,
                # let them gather for a moment instead of planning the whole fleet once per event.
                rest = self.args.pass_interval_s - (time.perf_counter() - t0)
                if rest > 0:
                    self.stop.wait(rest)
            except Exception:  # keep the loop alive; the next pass starts from observed state again
                log.exception("control pass failed")
                self.stop.wait(1.0)


def _no_diff_base() -> Any:
    """kopf's diff-base storage for an operator without change handlers.

    Before it calls the event watchers, kopf works out every event's change against the last
    handled state (a deep copy of the whole object, then a diff) for the benefit of change
    handlers (on.create/update/...). This operator registers none: only event watchers, which
    are given the body as it is. That work was 7 % of the operator's CPU under a stream of new
    jobs (bench/operator_bench.py, py-spy); this storage keeps nothing and builds nothing."""
    import kopf

    class NoDiffBase(kopf.DiffBaseStorage):
        def build(self, *, body: Any, extra_fields: Any = None) -> Any:
            return kopf.BodyEssence()

        def fetch(self, *, body: Any) -> None:
            return None

        def store(self, *, body: Any, patch: Any, essence: Any) -> None:
            return None

    return NoDiffBase()


def register_watches(registry: Any, state: Any, *, fleet: str | None = None) -> None:
    """kopf event watchers feeding `state`: no per-object handlers, so kopf writes nothing.
    Only `fleet`'s jobs, models and agents (no fleet: those without the fleet label)."""
    import kopf

    from stoker.api.protocol import FLEET_LABEL

    mine = {FLEET_LABEL: fleet if fleet else kopf.ABSENT}

    from stoker.api import GROUP, VERSION

    def feed(upsert: Any, delete: Any) -> Any:
        async def handler(event: dict[str, Any], **_: Any) -> None:
            obj = event.get("object")
            if not obj:
                return
            if log.isEnabledFor(logging.DEBUG):
                meta = obj.get("metadata", {})
                log.debug("watch %s %s %s/%s rv=%s", event.get("type"), obj.get("kind"), meta.get("namespace"),
                          meta.get("name"), meta.get("resourceVersion"))
            if event.get("type") == "DELETED":
                delete(obj)
            else:
                upsert(obj)
        return handler

    kopf.on.event(GROUP, VERSION, "generationjobs", registry=registry, id="jobs", labels=mine)(
        feed(state.upsert_job, state.delete_job))
    kopf.on.event(GROUP, VERSION, "cacheagents", registry=registry, id="agents", labels=mine)(
        feed(state.upsert_agent, state.delete_agent))
    kopf.on.event(GROUP, VERSION, "modelcaches", registry=registry, id="models", labels=mine)(
        feed(state.upsert_model, state.delete_model))
    kopf.on.event("coordination.k8s.io", "v1", "leases", registry=registry, id="leases")(
        feed(lambda obj: state.upsert_lease(obj, now_mono=time.monotonic()), state.delete_lease))
    kopf.on.login(registry=registry)(kopf.login_via_client)


def register_cleanup(registry: Any, op: Operator) -> None:
    import kopf

    def cleanup(**_: Any) -> None:
        # Stop acting at once: while kopf winds down, the watches go quiet and leases look stale.
        op.stop.set()
        op.state.changed.set()

    kopf.on.cleanup(registry=registry)(cleanup)


async def _run(op: Operator) -> None:
    import kopf

    from stoker.api.protocol import LEASE_LABEL

    registry = kopf.OperatorRegistry()
    register_watches(registry, op.state, fleet=op.args.fleet)
    register_cleanup(registry, op)
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    # Only the agents' (and operators') Leases: a cluster has many others (every node's, every
    # controller's), renewed every few seconds, which the API server would otherwise send here.
    settings.watching.label_selectors["coordination.k8s.io", "leases"] = LEASE_LABEL
    settings.persistence.diffbase_storage = _no_diff_base()
    stop_flag = asyncio.Event()
    loop = asyncio.get_running_loop()
    op.on_lost_callbacks.append(lambda: loop.call_soon_threadsafe(stop_flag.set))
    threads = [op.supervised("leader", op.leader.run, op.stop), op.supervised("control", op.control_loop)]
    for t in threads:
        t.start()
    kwargs: dict[str, Any] = {"namespaces": [op.args.namespace]} if op.args.namespace else {"clusterwide": True}
    if op.args.health_port:
        host = f"[{op.args.health_addr}]" if ":" in op.args.health_addr else op.args.health_addr
        kwargs["liveness_endpoint"] = f"http://{host}:{op.args.health_port}/healthz"
    try:
        await kopf.operator(registry=registry, settings=settings, standalone=True, stop_flag=stop_flag, **kwargs)
    finally:
        op.stop.set()
        op.state.changed.set()
        for t in threads:
            await asyncio.to_thread(t.join, 10)
        op.writer.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.download_weight >= 1.0:
        parser.error(f"--download-weight must be >= 1 (1 = a download costs only its time), got {args.download_weight}")
    if not 0.0 <= args.pass_interval_s <= 5.0:
        parser.error(f"--pass-interval-s must be between 0 and 5 seconds, got {args.pass_interval_s}")
    if not args.peer_weight >= 1.0:
        parser.error(f"--peer-weight must be >= 1 (1 = a fetch from a peer costs only its time), got {args.peer_weight}")
    logs.configure(level=logging.DEBUG if args.verbose else logging.INFO, fmt=args.log_format,
                   component="stoker-operator")
    for noisy in ("kopf.objects", "kopf._core.engines.peering", "kopf.activities.probe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's login through the kubernetes client
    from stoker.operator import metrics

    api = make_api_client(args.kubeconfig, pool_size=max(8, args.write_threads + 4))
    op = Operator(args, api)
    metrics.watch_state(op.state)
    if args.metrics:
        metrics.serve(args.metrics_port, addr=args.metrics_addr)
    log.info("stoker-operator %s starting as %s (namespace: %s, fleet: %s, leader Lease: %s)", __version__,
             op.leader.settings.identity, args.namespace or "all", args.fleet or "objects without a fleet label",
             op.leader.settings.name)
    asyncio.run(_run(op))
    if op.fatal is not None:
        log.error("exiting: %s", op.fatal)
        return 1
    if op.lost.is_set():
        log.error("exiting: leadership lost")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
