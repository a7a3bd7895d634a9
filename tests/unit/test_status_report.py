"""The CacheAgent status built from tier snapshots: each model once, at its fastest tier."""

from __future__ import annotations

from stoker.agent import status_report as sr
from stoker.api.cacheagent import Bandwidths, ModelFailure, RunningJob

IDENTITY = sr.Identity(pod="p", node="n", zone="z", gpu_model="H100", vram_bytes=80 * 2**30)


def disk(*entries: sr.DiskEntryView, downloads: tuple[sr.DownloadView, ...] = ()) -> sr.DiskView:
    return sr.DiskView(budget_bytes=1000, used_bytes=sum(e.size_bytes for e in entries if not e.preloaded),
                       reserved_bytes=0, entries=entries, downloads=downloads)


def tier(*entries: sr.TierEntryView, budget: int = 500) -> sr.TierView:
    return sr.TierView(budget_bytes=budget, used_bytes=sum(e.size_bytes for e in entries), reserved_bytes=0, entries=entries)


def build(**kw):  # type: ignore[no-untyped-def]
    args = dict(identity=IDENTITY, disk=disk(), ram=tier(), vram=tier(), slots=2, running=[], failures=[],
                bandwidth=Bandwidths(), observed_generation=3)
    args.update(kw)
    return sr.build_status(**args)


def test_a_model_on_disk_and_in_vram_is_reported_once_at_vram_keeping_disk_flags() -> None:
    status = build(disk=disk(sr.DiskEntryView("ns/a", 100, 10.0, preloaded=False, held=True),
                             sr.DiskEntryView("ns/b", 200, 20.0, preloaded=True, held=False)),
                   vram=tier(sr.TierEntryView("ns/a", 90, 30.0)))
    models = {m.name: m for m in status.models}
    assert set(models) == {"a", "b"}
    assert models["a"].tier == "vram" and models["a"].held and models["a"].size_bytes == 100
    assert models["a"].last_used == "1970-01-01T00:00:30Z"
    assert models["b"].tier == "disk" and models["b"].preloaded
    assert status.models_on_disk == 2 and status.hot_models == 1


def test_each_model_carries_its_disk_rank_at_whatever_tier_it_is_reported() -> None:
    status = build(disk=disk(sr.DiskEntryView("ns/a", 100, 10.0, preloaded=False, held=False, rank_s=1.8e9 + 1 / 3),
                             sr.DiskEntryView("ns/b", 200, 20.0, preloaded=True, held=False)),
                   ram=tier(sr.TierEntryView("ns/a", 90, 30.0)))
    wire = {m["name"]: m for m in status.wire()["models"]}
    assert wire["a"]["tier"] == "ram" and wire["a"]["rank"] == round(1.8e9 + 1 / 3, 3)
    assert "rank" not in wire["b"], "a baked-in model is never evicted: no rank"


def test_free_slots_count_running_jobs_and_never_go_negative() -> None:
    running = [RunningJob(name=f"j{i}", attempt=1) for i in range(3)]
    assert build(running=running[:1]).free_slots == 1
    assert build(running=running).free_slots == 0


def test_downloads_failures_and_generation_are_carried_through() -> None:
    status = build(disk=disk(downloads=(sr.DownloadView("ns/c", 5, 50),)),
                   failures=[ModelFailure(name="c", reason="ChecksumMismatch")])
    wire = status.wire()
    assert wire["downloads"] == [{"name": "c", "bytesDone": 5, "bytesTotal": 50}]
    assert wire["modelFailures"][0]["reason"] == "ChecksumMismatch"
    assert wire["observedGeneration"] == 3
    assert wire["gpu"] == {"model": "H100", "vramBytes": 80 * 2**30}


def test_measured_bandwidths_are_reported_as_given() -> None:
    wire = build(bandwidth=Bandwidths(download_bps=5e8, disk_to_gpu_bps=2e9, ram_to_gpu_bps=2.5e10, peer_bps=1e9)).wire()
    assert wire["bandwidth"] == {"downloadBps": 5e8, "diskToGpuBps": 2e9, "ramToGpuBps": 2.5e10, "peerBps": 1e9}


def test_the_peer_endpoint_and_each_copys_digest_are_reported() -> None:
    from stoker.api.cacheagent import PeerEndpoint

    digest = "ab" * 32
    disk = sr.DiskView(budget_bytes=10, used_bytes=4, reserved_bytes=0, downloads=(), entries=(
        sr.DiskEntryView(key="ns/a", size_bytes=4, last_used=1.0, preloaded=False, held=False, sha256=digest),
        sr.DiskEntryView(key="ns/base", size_bytes=9, last_used=1.0, preloaded=True, held=False,
                                    sha256="cd" * 32)))
    wire = build(disk=disk, peer=PeerEndpoint(url="http://10.0.0.7:8471", max_uploads=2)).wire()
    assert wire["peer"] == {"url": "http://10.0.0.7:8471", "maxUploads": 2}
    by_name = {m["name"]: m for m in wire["models"]}
    assert by_name["a"]["sha256"] == digest
    assert "sha256" not in by_name["base"]  # baked-in files are not offered to peers
    assert "peer" not in build().wire()


def test_a_failure_message_longer_than_the_crd_allows_is_cut_to_fit_not_refused() -> None:
    failure = ModelFailure(name="c", reason="HTTPServerError", message="x" * 5000)
    assert len(failure.message) == 1024 and failure.message.endswith("...")
    assert len(build(failures=[failure]).wire()["modelFailures"][0]["message"]) == 1024
