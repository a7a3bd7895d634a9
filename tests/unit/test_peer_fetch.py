"""Fetching from peers over real HTTP on 127.0.0.1: verification, failover, resume, fan-out waits."""

from __future__ import annotations

import hashlib
import pathlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stoker.agent.download import DownloadPolicy, DownloadProgress, DownloadRequest, Downloader, partial_paths
from stoker.agent.peer_fetch import PeerCandidate, PeerDirectory, PeerFetcher, peer_download_policy, valid_peer_url
from stoker.agent.peer_server import PeerMetrics, PeerServer, PeerServerSettings
from stoker.testing.operator_harness import wait_for

TOKEN = "fleet-peer-token-0123456789abcdef"
DATA = bytes((i * 7) % 251 for i in range(3 << 20))  # 3 MiB
DIGEST = hashlib.sha256(DATA).hexdigest()


def wait_served(server: PeerServer, expected: int) -> None:
    """The server counts what it sent once its last write returns, which may be just after the client has it all."""
    wait_for(lambda: server.metrics.served_bytes._value.get() == expected, timeout_s=10,
             message=lambda: f"served bytes counted: {server.metrics.served_bytes._value.get()} of {expected}")


def serve(tmp_path: pathlib.Path, name: str, content: bytes, *, rate: float = 0) -> PeerServer:
    path = tmp_path / name / "blob"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", max_uploads=2, upload_bytes_per_s=rate)
    return PeerServer(settings, lookup=lambda sha: path if sha == DIGEST else None).start()


class Fleet:
    """What the API server would say: the ModelCache's holders and each CacheAgent's status."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.gets: list[tuple[str, str]] = []

    def hold(self, name: str, url: str, *, digest: str = DIGEST, ready: bool = True) -> None:
        self.agents[name] = {"status": {
            "peer": {"url": url}, "models": [{"name": "sd", "tier": "disk", "sha256": digest}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    def fetching(self, name: str, url: str, bytes_done: int) -> None:
        self.agents[name] = {"status": {
            "peer": {"url": url}, "models": [], "downloads": [{"name": "sd", "bytesDone": bytes_done}],
            "conditions": [{"type": "Ready", "status": "True"}]}}

    def get(self, kind: str, name: str) -> dict[str, Any]:
        self.gets.append((kind, name))
        if kind == "ModelCache":
            return {"status": {"agents": [
                {"agent": a, "tier": "downloading" if body["status"].get("downloads") else "disk"}
                for a, body in self.agents.items()]}}
        return self.agents[name]


@pytest.fixture
def downloader() -> Iterator[Downloader]:
    with Downloader(peer_download_policy()) as d:
        yield d


def request(tmp_path: pathlib.Path) -> DownloadRequest:
    dest = tmp_path / "me" / "models" / "sd.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    return DownloadRequest(url="https://hub.example/sd.safetensors", dest=dest, sha256=DIGEST, size_bytes=len(DATA),
                           require_size=True, resume_key="ns/sd-identity")


def fetcher(fleet: Fleet, downloader: Downloader, **kw: Any) -> tuple[PeerFetcher, list[tuple[str, str, str]]]:
    reports: list[tuple[str, str, str]] = []
    f = PeerFetcher(PeerDirectory(fleet.get, self_name="me", cache_s=0.0), downloader, token=TOKEN, self_name="me",
                    metrics=PeerMetrics(), report_bad_peer=lambda *a: reports.append(a), poll_s=0.05, **kw)
    return f, reports


def test_a_model_comes_from_a_holder_verified_and_renamed_into_place(tmp_path: pathlib.Path, downloader: Downloader) -> None:
    fleet = Fleet()
    with serve(tmp_path, "a", DATA) as a:
        fleet.hold("agent-a", a.url("127.0.0.1"))
        f, reports = fetcher(fleet, downloader)
        req = request(tmp_path)
        result = f.fetch(req, model="sd", sha256=DIGEST, progress=DownloadProgress())
    assert result is not None and result.sha256 == DIGEST
    assert req.dest.read_bytes() == DATA and not partial_paths(req.dest)[0].exists()
    wait_served(a, len(DATA))
    assert f.metrics.fetched_bytes._value.get() == len(DATA)
    assert reports == []


def test_a_holder_serving_wrong_bytes_is_detected_reported_and_bypassed(tmp_path: pathlib.Path,
                                                                        downloader: Downloader) -> None:
    fleet = Fleet()
    damaged = bytearray(DATA)
    damaged[1000:1010] = b"\x00" * 10
    with serve(tmp_path, "bad", bytes(damaged)) as bad, serve(tmp_path, "good", DATA) as good:
        fleet.hold("agent-bad", bad.url("127.0.0.1"))
        f, reports = fetcher(fleet, downloader)
        req = request(tmp_path)
        first = f.fetch(req, model="sd", sha256=DIGEST, progress=DownloadProgress())
        assert first is None  # the only holder lied: the caller goes to the source
        assert [r[0] for r in reports] == ["agent-bad"] and "do not match sha256" in reports[0][2]
        assert not req.dest.exists() and not partial_paths(req.dest)[0].exists()
        fleet.hold("agent-good", good.url("127.0.0.1"))
        second = f.fetch(req, model="sd", sha256=DIGEST, progress=DownloadProgress())
    assert second is not None and req.dest.read_bytes() == DATA
    wait_served(bad, len(DATA))  # served once, then bypassed
    assert f.metrics.fetch_failures.labels("checksum_mismatch")._value.get() == 1
    assert len(reports) == 1


class CutAfter:
    """A TCP proxy that resets the connection once `limit` response bytes went through (a holder killed mid-transfer)."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port, self.limit = upstream_port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        conn.settimeout(10)
        up.settimeout(10)
        up.sendall(conn.recv(65536))
        sent = 0
        while sent < self.limit:
            chunk = up.recv(min(65536, self.limit - sent))
            if not chunk:
                break
            conn.sendall(chunk)
            sent += len(chunk)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        up.close()

    def close(self) -> None:
        self.listener.close()


def test_a_holder_lost_mid_transfer_is_resumed_from_another_without_fetching_again(tmp_path: pathlib.Path,
                                                                                   downloader: Downloader) -> None:
    fleet = Fleet()
    with serve(tmp_path, "a", DATA) as a, serve(tmp_path, "b", DATA) as b:
        cut = CutAfter(a.port, 1 << 20)  # agent-a dies after about 1 MiB of the body
        fleet.hold("agent-a", f"http://127.0.0.1:{cut.port}")
        f, _ = fetcher(fleet, downloader)
        req = request(tmp_path)
        progress = DownloadProgress()
        first = f.fetch(req, model="sd", sha256=DIGEST, progress=progress)
        assert first is None
        kept = partial_paths(req.dest)[0].stat().st_size
        assert 0 < kept <= 1 << 20  # the bytes that arrived are kept for a resume
        fleet.hold("agent-b", b.url("127.0.0.1"))
        result = f.fetch(req, model="sd", sha256=DIGEST, progress=DownloadProgress())
        cut.close()
    assert result is not None and req.dest.read_bytes() == DATA
    assert result.resumed_bytes == kept
    wait_served(b, len(DATA) - kept)  # only the rest came from agent-b


def test_with_no_holder_the_caller_goes_to_the_source_at_once(tmp_path: pathlib.Path, downloader: Downloader) -> None:
    f, _ = fetcher(Fleet(), downloader)
    started = time.monotonic()
    assert f.fetch(request(tmp_path), model="sd", sha256=DIGEST, progress=DownloadProgress()) is None
    assert time.monotonic() - started < 1.0


def test_a_copy_being_fetched_elsewhere_is_waited_for_instead_of_hitting_the_source(
        tmp_path: pathlib.Path, downloader: Downloader) -> None:
    fleet = Fleet()
    with serve(tmp_path, "a", DATA) as a:
        url = a.url("127.0.0.1")
        fleet.fetching("agent-a", url, bytes_done=0)
        f, _ = fetcher(fleet, downloader)
        req = request(tmp_path)
        results: list[Any] = []
        thread = threading.Thread(target=lambda: results.append(
            f.fetch(req, model="sd", sha256=DIGEST, progress=DownloadProgress())))
        thread.start()
        for done in (1 << 20, 2 << 20):
            time.sleep(0.2)
            assert thread.is_alive(), "it should wait while agent-a's copy makes progress"
            fleet.fetching("agent-a", url, bytes_done=done)
        fleet.hold("agent-a", url)  # agent-a's copy is complete and verified
        thread.join(timeout=20)
    assert results and results[0] is not None and req.dest.read_bytes() == DATA


def test_a_copy_that_stops_making_progress_is_not_waited_for(tmp_path: pathlib.Path, downloader: Downloader) -> None:
    fleet = Fleet()
    fleet.fetching("agent-a", "http://127.0.0.1:9", bytes_done=100)
    f, _ = fetcher(fleet, downloader, stall_s=0.3)
    started = time.monotonic()
    assert f.fetch(request(tmp_path), model="sd", sha256=DIGEST, progress=DownloadProgress()) is None
    assert 0.3 <= time.monotonic() - started < 5


def test_the_directory_lists_only_ready_holders_with_the_same_digest_and_a_pod_address() -> None:
    fleet = Fleet()
    fleet.hold("agent-a", "http://10.0.0.5:8471")
    fleet.hold("agent-old", "http://10.0.0.6:8471", digest="0" * 64)  # another file under that name
    fleet.hold("agent-down", "http://10.0.0.7:8471", ready=False)
    fleet.hold("agent-evil", "http://hub.example.com:8471")  # a status pointing elsewhere
    fleet.hold("me", "http://10.0.0.9:8471")
    fleet.fetching("agent-b", "http://10.0.0.8:8471", bytes_done=42)
    found = PeerDirectory(fleet.get, self_name="me").candidates("sd", DIGEST)
    assert found == [PeerCandidate("agent-a", "http://10.0.0.5:8471", True),
                     PeerCandidate("agent-b", "http://10.0.0.8:8471", False, 42)]


def test_a_popular_models_many_holders_cost_a_few_reads_and_agents_spread_over_them() -> None:
    fleet = Fleet()
    for i in range(40):
        fleet.hold(f"agent-{i:02d}", f"http://10.0.1.{i}:8471")
    picks = set()
    for me in ("x1", "x2", "x3", "x4"):
        fleet.gets.clear()
        found = PeerDirectory(fleet.get, self_name=me, max_holders=6).candidates("sd", DIGEST)
        assert len(found) == 6 and len(fleet.gets) == 1 + 6
        picks.update(c.agent for c in found)
    assert len(picks) > 6  # different agents look at different holders


@pytest.mark.parametrize(("url", "ok"), [
    ("http://10.1.2.3:8471", True), ("http://[fd00::5]:8471", True), ("http://127.0.0.1:1", True),
    ("https://10.1.2.3:8471", False), ("http://agent-a.svc:8471", False), ("http://10.1.2.3", False),
    ("http://10.1.2.3:8471/v1/blobs", False), ("http://10.1.2.3:8471/?x=1", False), ("not a url", False),
])
def test_a_peer_url_must_be_an_address_on_the_pod_network(url: str, ok: bool) -> None:
    assert valid_peer_url(url) is ok


def test_the_peer_download_policy_follows_no_redirect_and_tries_each_holder_once() -> None:
    """The fleet credential goes to peer endpoints only, and the next holder is the retry."""
    policy = peer_download_policy()
    assert policy.max_redirects == 0 and policy.max_attempts == 1 and not policy.trust_env
    assert DownloadPolicy().max_redirects > 0  # the source's policy is a different one


def test_two_disk_tiers_the_second_fetches_from_the_first_and_the_source_sees_one_request(tmp_path: pathlib.Path) -> None:
    """The disk tier's own download path: peers first, verified, the source only when no peer can serve."""
    import asyncio

    import numpy as np
    import safetensors.numpy

    from stoker.agent.disk_store import DiskStore, ModelSource
    from stoker.agent.metrics import AgentMetrics
    from stoker.testing.model_server import ModelServer

    data = safetensors.numpy.save({"w": np.arange(256 * 1024, dtype=np.float32)})
    digest = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        policy = DownloadPolicy(allow_http=True, trust_env=False, max_attempts=2, backoff_initial_s=0.01)
        with ModelServer({"m.safetensors": data}) as source, Downloader(policy) as dl, \
                Downloader(peer_download_policy()) as peer_dl:
            stores = {name: DiskStore(cache_dir=tmp_path / name, budget_bytes=10 << 20, downloader=dl,
                                      metrics=AgentMetrics()) for name in ("agent-a", "agent-b")}
            for store in stores.values():
                await store.start()
            settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", upload_bytes_per_s=0)
            with PeerServer(settings, lookup=stores["agent-a"].verified_path) as server_a:
                fleet = Fleet()
                for name, store in stores.items():
                    store.peers, _ = fetcher(fleet, peer_dl)
                    store.peers.self_name = name
                    store.peers.directory.self_name = name
                # spec without a digest: the first copy's is published, and peers verify against it
                src = ModelSource(key="ns/sd", url=source.url("m.safetensors"))
                path_a = await stores["agent-a"].ensure(src)
                assert stores["agent-a"].snapshot().peer_bandwidth_bytes_per_s is None
                fleet.hold("agent-a", server_a.url("127.0.0.1"), digest=digest)
                published = ModelSource(key="ns/sd", url=source.url("m.safetensors"), published_sha256=digest)
                path_b = await stores["agent-b"].ensure(published)
                assert path_b.read_bytes() == path_a.read_bytes() == data
                assert source.request_count("m.safetensors", method="GET") == 1
                wait_served(server_a, len(data))
                assert stores["agent-b"].snapshot().peer_bandwidth_bytes_per_s
                assert stores["agent-b"].snapshot().download_bandwidth_bytes_per_s is None
                # a damaged holder: agent-c detects it, goes to the source, and records no failure of the model
                path_a.write_bytes(data[:-8] + bytes(8))
                store_c = DiskStore(cache_dir=tmp_path / "agent-c", budget_bytes=10 << 20, downloader=dl,
                                    metrics=AgentMetrics())
                await store_c.start()
                store_c.peers, reports = fetcher(fleet, peer_dl)
                assert list(fleet.agents) == ["agent-a"]  # only the damaged holder is listed
                path_c = await store_c.ensure(published)
                assert path_c.read_bytes() == data
                assert [r[0] for r in reports] == ["agent-a"]
                assert source.request_count("m.safetensors", method="GET") == 2
                assert store_c.snapshot().failures == ()
            for store in (*stores.values(), store_c):
                await store.close()

    asyncio.run(main())


def test_two_agents_starting_at_once_do_not_wait_for_each_other(tmp_path: pathlib.Path, downloader: Downloader) -> None:
    """Each sees the other's fetch at 0 bytes: the first name goes to the source at once, the other waits."""
    fleet = Fleet()
    fleet.fetching("agent-b", "http://127.0.0.1:9", bytes_done=0)
    first, _ = fetcher(fleet, downloader, start_grace_s=30.0)
    first.self_name = "agent-a"
    started = time.monotonic()
    assert first.fetch(request(tmp_path), model="sd", sha256=DIGEST, progress=DownloadProgress()) is None
    assert time.monotonic() - started < 1.0
    fleet = Fleet()
    fleet.fetching("agent-a", "http://127.0.0.1:9", bytes_done=0)
    second, _ = fetcher(fleet, downloader, start_grace_s=0.3)
    second.self_name = "agent-b"
    started = time.monotonic()
    assert second.fetch(request(tmp_path), model="sd", sha256=DIGEST, progress=DownloadProgress()) is None
    assert 0.3 <= time.monotonic() - started < 5  # it waited for agent-a's start, briefly


def test_a_holder_busy_for_too_long_is_given_up_for_the_source(tmp_path: pathlib.Path, downloader: Downloader) -> None:
    fleet = Fleet()
    with serve(tmp_path, "a", DATA, rate=256 * 1024) as a:
        fleet.hold("agent-a", a.url("127.0.0.1"))
        a._slots = threading.BoundedSemaphore(1)
        assert a.try_acquire()  # its only upload slot is taken for the whole test
        f, _ = fetcher(fleet, downloader, busy_wait_s=0.3)
        started = time.monotonic()
        assert f.fetch(request(tmp_path), model="sd", sha256=DIGEST, progress=DownloadProgress()) is None
        assert 0.3 <= time.monotonic() - started < 5
        assert f.metrics.fetch_failures.labels("busy")._value.get() >= 1
