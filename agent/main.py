"""`stoker-agent`: one per GPU pod. Wires the cache tiers, loader, runner and job loop to
the API server and runs them until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import signal
import sys
from collections.abc import Sequence
from typing import Literal

import pydantic
import torch

from stoker import kube, logs
from stoker.agent import credentials, status_report
from stoker.agent.disk_store import DiskStore
from stoker.agent.download import Downloader, quiet_http_client_logs
from stoker.agent.health import Health
from stoker.agent.health import serve as serve_health
from stoker.agent.hot_holds import HotHolds
from stoker.agent.jobs import JobSettings, JobWorker, model_source
from stoker.agent.loader import Loader
from stoker.agent.metrics import AgentMetrics, InstrumentedWeights, LoadRates
from stoker.agent.orders import OrderFollower
from stoker.agent.peer_fetch import PeerDirectory, PeerFetcher, peer_download_policy
from stoker.agent.peer_server import (PeerCredentialError, PeerMetrics, PeerServer, PeerServerSettings,
                                      advertised_host, read_token)
from stoker.agent.reporter import LeaseKeeper, StatusWriter, register
from stoker.agent.results_dir import ResultsServer
from stoker.agent.settings import AgentSettings, SettingsError, SizeBytes
from stoker.agent.weights import Weights
from stoker.api.cacheagent import Bandwidths, PeerEndpoint

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


def pick_device(name: str) -> torch.device:
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


async def run_agent(settings: RunSettings, stop: asyncio.Event) -> None:
    name = settings.effective_agent_name
    if not name:
        raise SettingsError("the agent needs a name: set --pod-name / STOKER_POD_NAME (the chart does) or --agent-name")
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
    api = kube.api_client(settings.kubeconfig)
    objects = kube.Objects(api, settings.namespace)
    metrics = AgentMetrics()
    metrics.job_slots.set(settings.job_slots)
    if settings.metrics_enabled:
        metrics.serve(port=settings.metrics_port, addr=settings.metrics_addr)
    # Answers from the start: the startup probe waits on /readyz while the disk cache is scanned.
    health = Health(stale_after_s=settings.lease_duration_s, failing_renewals_limit_s=settings.liveness_failing_renewals_s)
    if settings.health_port is not None:
        serve_health(health, port=settings.health_port, addr=settings.health_addr)

    runner = build_runner(settings, device)
    # Seconds of imports, done while the disk cache is scanned, before the agent says it is ready.
    preparing = asyncio.ensure_future(asyncio.to_thread(getattr(runner, "prepare", lambda: None)))
    downloader = Downloader(settings.download_policy())
    store = DiskStore.from_settings(settings, metrics=metrics, downloader=downloader)
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
    peer_metrics = PeerMetrics(metrics.registry)
    peer, peer_endpoint = start_peer_server(settings, store, peer_metrics)
    if peer is not None and settings.peer_fetch:
        store.peers = peer_fetcher(settings, objects, name=name, token=peer.settings.token, metrics=peer_metrics)
        store.duplicate_discount_s = settings.peer_duplicate_discount_s
    credentials.configure(credentials.CredentialResolver(
        secrets_dir=settings.secrets_dir, api_secrets=frozenset(settings.api_secrets or ())))
    await preparing
    uses_weights = getattr(runner, "uses_loaded_weights", True)
    gpu_model, gpu_vram, reported_vram_budget = reported_gpu(
        uses_loaded_weights=uses_weights, seen_model=gpu_model, seen_vram_bytes=vram_total,
        vram_budget_bytes=vram_budget, model_setting=settings.gpu_model, vram_setting=settings.gpu_vram_bytes)

    await asyncio.to_thread(register, objects, name=name, pod_name=settings.pod_name or name, fleet=settings.fleet)
    identity = status_report.Identity(pod=settings.pod_name or name, node=settings.node_name or "",
                                      zone=settings.zone or "", gpu_model=gpu_model, vram_bytes=gpu_vram)
    writer: StatusWriter
    worker = JobWorker(objects=objects, settings=JobSettings(
        agent=name, namespace=settings.namespace, slots=settings.job_slots, queue_slots=settings.queue_slots,
        results_dir=settings.results_dir, results_max_bytes=settings.results_max_bytes,
        results_max_age_s=settings.results_max_age_s,
        model_not_found_grace_s=settings.model_not_found_grace_s),
        store=store, weights=metered_weights, runner=runner, metrics=metrics.jobs, on_change=lambda: writer.kick(),
        results_store=results_store)
    if hasattr(runner, "forget"):  # modules built on evicted weights must not keep them alive
        weights.on_evict.append(lambda key: runner.forget(worker.artifact_sha.get(key, "")))
    hot = HotHolds(metered_weights)
    orders = OrderFollower(objects=objects, name=name, store=store,
                           resolve=lambda mc: model_source(objects, mc), failures=worker.model_failures,
                           on_change=lambda: writer.kick(), hot=hot)

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
            observed_generation=orders.observed_generation, hot=orders.hot_models(),
            results_port=results_server.port if results_server is not None else None, peer=peer_endpoint)

    writer = StatusWriter(objects, name=name, build=build, min_interval_s=settings.status_min_interval_s,
                          on_missing=lambda: register(objects, name=name, pod_name=settings.pod_name or name,
                                                      fleet=settings.fleet))
    lease = LeaseKeeper(api, namespace=settings.namespace, name=name, duration_s=int(settings.lease_duration_s),
                        renew_s=settings.lease_renew_interval_s, on_attempt=lambda ok: health.renewal(ok=ok))
    await asyncio.to_thread(lease.renew_once)
    health.renewal(ok=True)
    await writer.write_if_changed()
    health.started()
    stop_task = asyncio.ensure_future(stop.wait())
    stop_task.add_done_callback(lambda _: health.stopping())
    log.info("agent %s/%s ready on %s (%s), disk budget %d bytes, %d slot(s)",
             settings.namespace, name, device, gpu_model, settings.disk_budget_bytes, settings.job_slots)
    try:
        await asyncio.gather(lease.run(stop), writer.run(stop), worker.run(stop), orders.run(stop))
    finally:
        stop_task.cancel()
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


def start_peer_server(settings: AgentSettings, store: DiskStore,
                      metrics: PeerMetrics) -> tuple[PeerServer | None, PeerEndpoint | None]:
    """Serve this agent's verified files to the fleet when a peer credential is configured."""
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
                                                  sha256=m.sha256)
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
                   static={"agent": settings.effective_agent_name or ""})
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
