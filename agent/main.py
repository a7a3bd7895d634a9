"""`stoker-agent`: one per GPU pod. Wires the cache tiers, loader, runner and job loop to
the API server and runs them until SIGTERM.

Start-up: before anything slow (torch, the disk scan, the runner's imports) the agent
registers its CacheAgent and clears what an earlier process of the same pod reported
(models, downloads, jobs; `accepting: false`), so a restart with a wiped cache is never
mistaken for the old cache. It reports its real status before it first renews its Lease,
the operator's sign that it is Ready.

Shutdown (SIGTERM): it stops accepting at once (`accepting: false`, no free slots),
hands back the jobs that have not started generating, lets running generations finish
within `shutdown_grace_s`, reports the rest as AgentStopping (a fault of the agent, not of
the job), then releases its Lease so that the operator requeues anything left without
waiting for the Lease to expire. An idle agent exits within a few seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from stoker import kube, logs
from stoker.agent import faults, pools, reporter, status_report
from stoker.agent.reporter import LeaseKeeper, StatusWriter, register
from stoker.agent.results_dir import ResultsServer
from stoker.agent.settings import AgentSettings, SettingsError, SizeBytes
from stoker.api.cacheagent import Bandwidths, PeerEndpoint

if TYPE_CHECKING:  # torch and the modules built on it are imported once the old status is cleared
    import torch

    from stoker.agent.disk_store import DiskStore
    from stoker.agent.peer_fetch import PeerFetcher
    from stoker.agent.peer_server import PeerMetrics, PeerServer

# Without the agent's extra, fail at import as the `stoker-agent` entry point expects (it names what
# to install); the modules themselves are imported later, after the old report is cleared.
for _module in ("torch", "safetensors", "diffusers"):
    if importlib.util.find_spec(_module) is None:
        raise ModuleNotFoundError(f"No module named {_module!r}", name=_module)

log = logging.getLogger("stoker.agent")


class RunSettings(AgentSettings):
    """Everything the agent process needs: the cache settings plus the job loop's."""

    kubeconfig: str | None = None
    """Path of a kubeconfig; in a pod the service account is used."""
    results_dir: pathlib.Path = pathlib.Path("/var/lib/stoker/results")
    """Where images go for jobs without an output URL (when no results store is configured)."""
    results_max_bytes: SizeBytes = 1 * 2**30
    """The results folder is kept under this size: the oldest images go first (the newest always stays)."""
    results_max_age_s: float | None = pydantic.Field(default=24 * 3600.0, gt=0)
    """Images older than this are removed from the results folder."""
    results_serve: bool = False
    """Serve the results folder read-only at /results/<file> on results_port, for `stoker get image` through the API server's pod proxy (the chart turns it on)."""
    results_port: int = pydantic.Field(default=8081, ge=0, le=65535)
    """Port of the results endpoint (0 picks a free one)."""
    results_s3_endpoint: str | None = None
    """S3-compatible results store: base URL of the S3 API (https; http only with allow_http). Jobs without an output URL go there instead of the results folder."""
    results_s3_bucket: str | None = None
    """Bucket of the results store."""
    results_s3_region: str = "us-east-1"
    """Region the requests are signed for."""
    results_s3_prefix: str = ""
    """Key prefix of every image (images are <prefix><namespace>/<job>/<attempt>.png)."""
    results_s3_credentials_dir: pathlib.Path | None = pathlib.Path("/var/run/stoker/results-store")
    """Mounted Secret with accessKeyId and secretAccessKey (and optionally sessionToken), sent only to the endpoint's host; without it requests are unsigned."""
    device: str = "auto"
    """cuda, cuda:N, cpu, or auto (the first GPU when there is one)."""
    ram_budget_bytes: SizeBytes = 32 * 2**30
    """Pinned host memory for the RAM tier (GPU agents only)."""
    vram_budget_bytes: SizeBytes | None = None
    """Memory for loaded models; default: 80 percent of the GPU, or 8 GiB of host memory on a CPU-only agent."""
    model_not_found_grace_s: float = pydantic.Field(default=10.0, ge=0)
    """How long a job waits for its ModelCache to appear before failing with ModelNotFound."""
    runner: Literal["diffusers", "comfyui"] = "diffusers"
    """Built-in diffusers pipelines, or a ComfyUI server beside the agent."""
    torch_threads: int | None = pydantic.Field(default=None, ge=1, le=256)
    """CPU threads torch may use; set it when several agents share a CPU-only machine."""
    comfyui_url: str = "http://127.0.0.1:8188"
    """ComfyUI server URL (runner comfyui)."""
    comfyui_models_dir: pathlib.Path = pathlib.Path("/comfyui/models")
    """ComfyUI's models folder, managed by the agent (runner comfyui)."""
    comfyui_link: Literal["symlink", "copy"] = "symlink"
    """How model files enter ComfyUI's folder: symlink (ComfyUI must mount the cache volume at the agent's cache_dir path) or copy."""
    comfyui_poll_interval_s: float = pydantic.Field(default=0.2, gt=0)
    """How often the agent asks ComfyUI whether a prompt finished (runner comfyui)."""
    comfyui_timeout_s: float = pydantic.Field(default=600.0, gt=0)
    """A ComfyUI prompt not finished after this long is interrupted and the attempt fails, retryable (runner comfyui)."""
    gpu_model: str | None = None
    """GPU name to report when the runner loads the weights on a GPU the agent does not use itself (runner comfyui); default: the GPU the agent sees, else unknown."""
    log_format: Literal["text", "json"] = "text"
    """text, or json: one object per line, with the agent's name and each job's name and model as fields."""
    gpu_vram_bytes: SizeBytes | None = None
    """That GPU's memory, reported as the agent's VRAM capacity (runner comfyui); unset: the GPU the agent sees, else 0 (unknown: placement is not limited by it)."""
    shutdown_grace_s: float = pydantic.Field(default=20.0, ge=0)
    """On SIGTERM, how long running generations get to finish before they are handed back; keep it below the pod's terminationGracePeriodSeconds."""


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {name} was asked for but no CUDA device is visible; use --device cpu or auto")
    return device


def reported_gpu(*, uses_loaded_weights: bool, seen_model: str, seen_vram_bytes: int, vram_budget_bytes: int,
                 model_setting: str | None = None, vram_setting: int | None = None) -> tuple[str, int, int]:
    """The GPU name, its memory and the VRAM tier budget the CacheAgent reports (pure).

    A runner that uses the agent's loaded weights is limited by the agent's own VRAM budget.
    One that loads the weights itself (ComfyUI, on its own GPU) is limited by that GPU: the
    settings name it, else the GPU the agent sees, else it is unknown (0, which placement
    reads as not limiting), never the host-memory budget of an agent running on CPU.
    """
    if uses_loaded_weights:
        return seen_model, seen_vram_bytes, vram_budget_bytes
    vram = vram_setting if vram_setting is not None else seen_vram_bytes
    model = model_setting or (seen_model if seen_vram_bytes else "unknown")
    return model, vram, vram


def build_runner(settings: RunSettings, device: torch.device):  # type: ignore[no-untyped-def]
    if settings.runner == "comfyui":
        from stoker.agent.runner.comfyui import ComfyUIRunner, ComfyUISettings

        return ComfyUIRunner(ComfyUISettings(
            url=settings.comfyui_url, models_dir=settings.comfyui_models_dir, link=settings.comfyui_link,
            poll_interval_s=settings.comfyui_poll_interval_s, timeout_s=settings.comfyui_timeout_s))
    from stoker.agent.runner.diffusers_runner import DiffusersRunner

    return DiffusersRunner(device=device)


CLEARED_STATUS: dict[str, Any] = {
    "models": [], "modelsOnDisk": 0, "hotModels": 0, "downloads": [], "running": [], "slots": 0, "queueSlots": 0,
    "freeSlots": 0, "modelFailures": [], "localFaults": [], "degraded": False, "accepting": False,
}
"""What a starting agent writes over the status an earlier process of its pod left: it holds and runs
nothing that the operator may count on until it has scanned its disk and reported."""


async def run_agent(settings: RunSettings, stop: asyncio.Event) -> None:
    # The CacheAgent and the Lease are named after the pod: the chart's admission policy lets an
    # agent write only the objects named after the pod its service-account token is bound to.
    name = settings.pod_name
    if not name:
        raise SettingsError("the agent needs its pod's name: set --pod-name / STOKER_POD_NAME (the chart does)")
    # Short API calls only: downloads, deliveries, generations, watches and the Lease have threads of their own.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="api"))
    threads = pools.Pools.sized(downloads=settings.max_downloads, jobs=settings.job_slots + settings.queue_slots)
    api = kube.api_client(settings.kubeconfig)
    objects = kube.Objects(api, settings.namespace)
    await until_answered(stop, "registering the CacheAgent", lambda: asyncio.to_thread(
        register, objects, name=name, pod_name=settings.pod_name or name, fleet=settings.fleet))
    await until_answered(stop, "clearing the previous report", lambda: asyncio.to_thread(
        objects.patch_status, "CacheAgent", name, CLEARED_STATUS))

    import torch

    from stoker.agent import credentials
    from stoker.agent.disk_store import DiskStore
    from stoker.agent.download import Downloader
    from stoker.agent.health import Health
    from stoker.agent.health import serve as serve_health
    from stoker.agent.hot_holds import HotHolds
    from stoker.agent.jobs import JobSettings, JobWorker, model_source
    from stoker.agent.loader import Loader
    from stoker.agent.metrics import AgentMetrics, InstrumentedWeights, LoadRates
    from stoker.agent.orders import OrderFollower
    from stoker.agent.weights import Weights

    device = pick_device(settings.device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_model, vram_total = props.name, int(props.total_memory)
    else:
        gpu_model, vram_total = "cpu", 0
    vram_budget = settings.vram_budget_bytes or (int(vram_total * 0.8) if vram_total else 8 * 2**30)

    results_store = build_results_store(settings)
    metrics = AgentMetrics()
    metrics.job_slots.set(settings.job_slots)
    if settings.metrics_enabled:
        metrics.serve(port=settings.metrics_port, addr=settings.metrics_addr)
    # Answers from the start: the startup probe waits on /readyz while the disk cache is scanned.
    probes = Health(stale_after_s=settings.lease_duration_s, failing_renewals_limit_s=settings.liveness_failing_renewals_s)
    if settings.health_port is not None:
        serve_health(probes, port=settings.health_port, addr=settings.health_addr)

    runner = build_runner(settings, device)
    # Seconds of imports, done while the disk cache is scanned, before the agent says it is ready.
    preparing = asyncio.ensure_future(asyncio.to_thread(getattr(runner, "prepare", lambda: None)))
    downloader = Downloader(settings.download_policy())
    loop = asyncio.get_running_loop()
    # Faults are noted from worker threads too (loads): kick the status writer on the loop.
    health = faults.AgentHealth(on_change=lambda: loop.call_soon_threadsafe(kick))
    store = DiskStore.from_settings(settings, metrics=metrics, downloader=downloader, health=health,
                                    download_pool=threads.downloads)
    await store.start()
    loader = Loader()
    loader.prepare(device)  # page-lock the pinned ring now, not inside the first job's load
    weights = Weights(loader=loader, device=device, vram_budget_bytes=vram_budget, ram_budget_bytes=settings.ram_budget_bytes)
    # per-tier hits, misses, evictions and bytes, and the measured load rates the status reports
    load_rates = LoadRates(metrics)
    metered_weights = InstrumentedWeights(weights, metrics=metrics, rates=load_rates)
    metrics.watch_tier("vram", weights.vram.snapshot)
    if weights.ram is not None:
        metrics.watch_tier("ram", weights.ram.snapshot)
    weights.on_evict.append(lambda key: metrics.evictions.labels("vram").inc())
    weights.on_ram_evict.append(lambda key: metrics.evictions.labels("ram").inc())
    from stoker.agent.peer_server import PeerMetrics

    peer_metrics = PeerMetrics(metrics.registry)
    peer, peer_endpoint = start_peer_server(settings, store, peer_metrics)
    if peer is not None and settings.peer_fetch:
        store.peers = peer_fetcher(settings, objects, name=name, token=peer.settings.token, metrics=peer_metrics)
        store.duplicate_discount_s = settings.peer_duplicate_discount_s
    credentials.configure(credentials.CredentialResolver.from_grants(
        settings.credentials, secrets_dir=settings.secrets_dir, api_secrets=frozenset(settings.api_secrets or ())))
    await preparing
    uses_weights = getattr(runner, "uses_loaded_weights", True)
    gpu_model, gpu_vram, reported_vram_budget = reported_gpu(
        uses_loaded_weights=uses_weights, seen_model=gpu_model, seen_vram_bytes=vram_total,
        vram_budget_bytes=vram_budget, model_setting=settings.gpu_model, vram_setting=settings.gpu_vram_bytes)

    identity = status_report.Identity(pod=settings.pod_name or name, node=settings.node_name or "",
                                      zone=settings.zone or "", gpu_model=gpu_model, vram_bytes=gpu_vram)
    writer: StatusWriter | None = None

    def kick() -> None:
        if writer is not None:
            writer.kick()

    async def report_stopping() -> None:  # the report says accepting: false once `stop` is set
        if writer is not None:
            await writer.write_if_changed(force=True)

    worker = JobWorker(objects=objects, settings=JobSettings(
        agent=name, namespace=settings.namespace, slots=settings.job_slots, queue_slots=settings.queue_slots,
        results_dir=settings.results_dir, results_max_bytes=settings.results_max_bytes,
        results_max_age_s=settings.results_max_age_s, output_policy=settings.output_policy(),
        shutdown_grace_s=settings.shutdown_grace_s, model_not_found_grace_s=settings.model_not_found_grace_s),
        store=store, weights=metered_weights, runner=runner, metrics=metrics.jobs, on_change=kick, health=health,
        results_store=results_store, threads=threads, on_stop=lambda: report_stopping())
    if hasattr(runner, "forget"):  # modules built on evicted weights must not keep them alive
        weights.on_evict.append(lambda key: runner.forget(worker.artifact_sha.get(key, "")))
    hot = HotHolds(metered_weights)
    orders = OrderFollower(objects=objects, name=name, store=store,
                           resolve=lambda mc: model_source(objects, mc), failures=worker.model_failures,
                           on_change=kick, hot=hot)

    def vram_view() -> status_report.TierView:
        if uses_weights:
            return tier_view(weights.vram, vram_budget)
        # The runner's own GPU holds the loaded copies; the agent's tier stays empty.
        return status_report.TierView(budget_bytes=reported_vram_budget, used_bytes=0, reserved_bytes=0, entries=())

    results_server = None
    if settings.results_serve:
        results_server = ResultsServer(settings.results_dir, port=settings.results_port,
                                       addr=settings.metrics_addr).start()

    def build():  # type: ignore[no-untyped-def]
        return status_report.build_status(
            identity=identity, disk=disk_view(store), ram=tier_view(weights.ram, 0), vram=vram_view(),
            slots=settings.job_slots, queue_slots=settings.queue_slots, running=worker.running(),
            failures=list(worker.model_failures.values()),
            bandwidth=Bandwidths(download_bps=round(store.snapshot().download_bandwidth_bytes_per_s or 0),
                                 peer_bps=round(store.snapshot().peer_bandwidth_bytes_per_s or 0),
                                 disk_to_gpu_bps=round(load_rates.bps("disk")), ram_to_gpu_bps=round(load_rates.bps("ram"))),
            observed_generation=orders.observed_generation, local_faults=health.faults(),
            accepting=not stop.is_set(), hot=orders.hot_models(),
            results_port=results_server.port if results_server is not None else None, peer=peer_endpoint)

    writer = StatusWriter(objects, name=name, build=build, min_interval_s=settings.status_min_interval_s,
                          on_missing=lambda: register(objects, name=name, pod_name=settings.pod_name or name,
                                                      fleet=settings.fleet))
    # its own connections too: a renewal never waits for a connection another call holds
    lease = LeaseKeeper(kube.api_client(settings.kubeconfig), namespace=settings.namespace, name=name,
                        duration_s=int(settings.lease_duration_s), renew_s=settings.lease_renew_interval_s,
                        on_attempt=lambda ok: probes.renewal(ok=ok))
    # The real status first, then the first renewal (Ready): never Ready with an old or empty report.
    await until_answered(stop, "writing the first report", lambda: writer.write_if_changed(force=True))
    await until_answered(stop, "renewing the Lease", lambda: asyncio.to_thread(lease.renew_once))
    probes.renewal(ok=True)
    log.info("agent %s/%s ready on %s (%s), disk budget %d bytes, %d slot(s)",
             settings.namespace, name, device, gpu_model, settings.disk_budget_bytes, settings.job_slots)
    probes.started()
    drained = asyncio.Event()  # SIGTERM stops new work; the Lease and reports go on until jobs are drained

    async def jobs() -> None:
        try:
            await worker.run(stop)
        finally:
            drained.set()

    async def announce_stop() -> None:
        await stop.wait()
        probes.stopping()
        log.info("stopping: accepting no new jobs, finishing running ones within %.0fs", settings.shutdown_grace_s)
        writer.kick()

    try:
        await asyncio.gather(lease.run(drained), writer.run(drained), jobs(), orders.run(stop),
                             watch_local_faults(store, stop), announce_stop())
    finally:
        try:
            await asyncio.wait_for(writer.write_if_changed(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - the Lease release below is what the operator acts on
            log.warning("final status write failed: %s", exc)
        await asyncio.to_thread(lease.release)
        if results_server is not None:
            results_server.close()
        if peer is not None:
            peer.stop()
        if store.peers is not None:
            store.peers.downloader.close()
        await asyncio.to_thread(hot.release_all)
        await store.close()
        downloader.close()
        weights.close()
        loader.close()
        threads.shutdown()


async def until_answered(stop: asyncio.Event, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """`await call()`, retried with backoff while the API server does not answer (it may be
    restarting): an agent starting meanwhile waits for it rather than exiting."""
    delay = 0.5
    while True:
        try:
            return await call()
        except Exception as exc:
            if not kube.is_transient(exc) or stop.is_set():
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
        await reporter.wait_event(stop, delay)
        delay = min(10.0, delay * 2)


async def watch_local_faults(store: DiskStore, stop: asyncio.Event, *, interval_s: float = 5.0) -> None:
    """While the cache volume has a local fault, check every few seconds whether it works again."""
    while not stop.is_set():
        await reporter.wait_event(stop, interval_s)
        if not stop.is_set() and (store.health.has(faults.DISK_FULL) or store.health.has(faults.DISK_ERROR)):
            if await store.probe():
                log.info("the cache volume works again; local disk faults cleared")


def start_peer_server(settings: AgentSettings, store: DiskStore,
                      metrics: PeerMetrics) -> tuple[PeerServer | None, PeerEndpoint | None]:
    """Serve this agent's verified files to the fleet when a peer credential is configured."""
    from stoker.agent.peer_server import PeerCredentialError, PeerServer, PeerServerSettings, advertised_host, read_token

    try:
        token = read_token(settings.peer_token_file)
    except PeerCredentialError as exc:
        raise SettingsError(str(exc)) from None
    if token is None:
        log.info("no peer credential at %s: not serving other agents nor fetching from them", settings.peer_token_file)
        return None, None
    try:
        server = PeerServer(PeerServerSettings(
            token=token, addr=settings.peer_addr, port=settings.peer_port, max_uploads=settings.peer_max_uploads,
            upload_bytes_per_s=settings.peer_upload_bytes_per_s), lookup=store.verified_path, metrics=metrics).start()
    except OSError as exc:
        raise SettingsError(f"the peer endpoint cannot listen on {settings.peer_addr}:{settings.peer_port} "
                            f"({exc.strerror}); choose another --peer-port") from None
    host = advertised_host(advertise=settings.peer_advertise_host, listen=settings.peer_addr)
    return server, PeerEndpoint(url=server.url(host), max_uploads=settings.peer_max_uploads)


def peer_fetcher(settings: AgentSettings, objects: kube.Objects, *, name: str, token: str,
                 metrics: PeerMetrics) -> PeerFetcher:
    """Fetches from the fleet's holders before the source; a holder with wrong bytes gets a Warning Event."""
    from stoker.agent.download import Downloader
    from stoker.agent.peer_fetch import PeerDirectory, PeerFetcher, peer_download_policy


    def report(agent: str, model: str, message: str) -> None:
        try:
            body = objects.get("CacheAgent", agent)
        except Exception as exc:  # noqa: BLE001 - best effort: the log and the metric have it anyway
            log.warning("could not report peer %s for %s: %s", agent, model, exc)
            return
        objects.event(body, reason="PeerChecksumMismatch", message=message, warning=True,
                      component=f"stoker-agent/{name}")

    return PeerFetcher(PeerDirectory(objects.get, self_name=name), Downloader(peer_download_policy()), token=token,
                       self_name=name, metrics=metrics, report_bad_peer=report)


def build_results_store(settings: RunSettings):  # type: ignore[no-untyped-def]
    """The configured S3-compatible results store, or None (images go to the results folder)."""
    if not settings.results_s3_endpoint and not settings.results_s3_bucket:
        return None
    if not settings.results_s3_endpoint or not settings.results_s3_bucket:
        raise SettingsError("the results store needs both results_s3_endpoint and results_s3_bucket")
    from stoker.agent import results_store

    try:
        s3 = results_store.S3Settings(endpoint=settings.results_s3_endpoint, bucket=settings.results_s3_bucket,
                                      region=settings.results_s3_region, prefix=settings.results_s3_prefix,
                                      allow_http=settings.allow_http)
        folder = settings.results_s3_credentials_dir
        creds = (results_store.read_credentials(folder, host=s3.host)
                 if folder is not None and folder.is_dir() else None)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    log.info("images go to the results store %s/%s%s (%s)", s3.endpoint, s3.bucket,
             f"/{s3.prefix}" if s3.prefix else "", "signed" if creds else "unsigned: no credentials mounted")
    return results_store.S3ResultsStore(s3, creds)


def disk_view(store: DiskStore) -> status_report.DiskView:
    snap = store.snapshot()
    return status_report.DiskView(
        budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes, reserved_bytes=snap.reserved_bytes,
        entries=tuple(status_report.DiskEntryView(key=m.key, size_bytes=m.size_bytes, last_used=m.last_used,
                                                  preloaded=m.preloaded, held=m.held, rank_s=m.rank_s,
                                                  model_uid=m.model_uid, sha256=m.sha256)
                      for m in snap.models),
        downloads=tuple(status_report.DownloadView(key=d.key, bytes_done=d.bytes_done, total_bytes=d.total_bytes)
                        for d in snap.downloads))


def tier_view(tier, budget_bytes: int) -> status_report.TierView:  # type: ignore[no-untyped-def]
    if tier is None:
        return status_report.TierView(budget_bytes=budget_bytes, used_bytes=0, reserved_bytes=0, entries=())
    snap = tier.snapshot()
    return status_report.TierView(
        budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes, reserved_bytes=snap.reserved_bytes,
        entries=tuple(status_report.TierEntryView(key=e.key, size_bytes=e.size_bytes, last_used=e.last_used)
                      for e in snap.entries))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = RunSettings.from_args(argv)
    except SettingsError as exc:
        print(f"stoker-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(level=settings.log_level, fmt=settings.log_format, component="stoker-agent",
                   static={"agent": settings.pod_name or ""})
    from stoker.agent.download import quiet_http_client_logs

    quiet_http_client_logs()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(settings, stop)

    try:
        asyncio.run(runner())
    except SettingsError as exc:
        print(f"stoker-agent: {exc}", file=sys.stderr)
        return 2
    # Everything is stopped, reported and released. Skip the interpreter's teardown: collecting
    # torch's and diffusers' heap object by object took 5-15 s on a busy 2-core machine, time a
    # pod being stopped does not have (SIGKILL follows the grace period).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
