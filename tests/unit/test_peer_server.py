"""The agent's peer server, over real HTTP on 127.0.0.1: content addressing, auth, ranges, caps."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from stoker.agent.disk_store import DiskStore, ModelSource
from stoker.agent.download import DownloadPolicy, Downloader
from stoker.agent.metrics import AgentMetrics
from stoker.agent.peer_server import PeerMetrics, PeerServer, PeerServerSettings, TokenBucket, blob_path, parse_range
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import wait_for
from stoker.testing.raw_http import raw_get

TOKEN = "peer-token-for-tests-0123456789"
DATA = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def blob(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "models" / "0123abcd.safetensors"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


class Lookups:
    """The index the server consults, recording every digest it was asked for."""

    def __init__(self, files: dict[str, pathlib.Path]) -> None:
        self.files = files
        self.asked: list[str] = []

    def __call__(self, sha256: str) -> pathlib.Path | None:
        self.asked.append(sha256)
        return self.files.get(sha256)


@pytest.fixture
def lookups(blob: pathlib.Path) -> Lookups:
    return Lookups({DIGEST: blob})


@pytest.fixture
def peer(lookups: Lookups) -> Iterator[PeerServer]:
    settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", max_uploads=2, upload_bytes_per_s=0)
    with PeerServer(settings, lookup=lookups, metrics=PeerMetrics()) as server:
        yield server


def get(server: PeerServer, path: str, *, token: str | None = TOKEN, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(server.url("127.0.0.1") + path, headers=headers, timeout=10)


class TestServing:
    def test_a_file_is_served_whole_under_its_digest(self, peer: PeerServer) -> None:
        r = get(peer, blob_path(DIGEST))
        assert r.status_code == 200
        assert r.content == DATA
        assert r.headers["etag"] == f'"{DIGEST}"' and r.headers["accept-ranges"] == "bytes"
        assert int(r.headers["content-length"]) == len(DATA)
        # Counted by the server once its last write returns, which may be just after the client has it all.
        wait_for(lambda: peer.metrics.served_bytes._value.get() == len(DATA), timeout_s=10,
                 message=lambda: f"served bytes counted: {peer.metrics.served_bytes._value.get()} of {len(DATA)}")

    def test_head_gives_the_size_without_the_body(self, peer: PeerServer) -> None:
        r = httpx.head(peer.url("127.0.0.1") + blob_path(DIGEST), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(DATA) and r.content == b""

    def test_a_digest_the_agent_does_not_hold_is_not_found(self, peer: PeerServer) -> None:
        assert get(peer, blob_path("0" * 64)).status_code == 404

    @pytest.mark.parametrize(("header", "status", "span"), [
        ("bytes=10-19", 206, (10, 19)),
        ("bytes=1048000-", 206, (1048000, len(DATA) - 1)),
        ("bytes=-5", 206, (len(DATA) - 5, len(DATA) - 1)),
        ("bytes=0-99999999", 206, (0, len(DATA) - 1)),
        ("bytes=0-1,5-9", 200, None),  # several ranges: the whole file, as RFC 9110 allows
        ("bytes=2000000-", 416, None),
    ])
    def test_a_range_resumes_a_transfer(self, peer: PeerServer, header: str, status: int, span: tuple[int, int] | None) -> None:
        r = get(peer, blob_path(DIGEST), Range=header)
        assert r.status_code == status
        if status == 206:
            assert span is not None
            assert r.content == DATA[span[0]:span[1] + 1]
            assert r.headers["content-range"] == f"bytes {span[0]}-{span[1]}/{len(DATA)}"
        elif status == 200:
            assert r.content == DATA
        else:
            assert r.headers["content-range"] == f"bytes */{len(DATA)}"

    def test_if_range_for_other_bytes_sends_the_whole_file(self, peer: PeerServer) -> None:
        r = get(peer, blob_path(DIGEST), Range="bytes=10-", **{"If-Range": '"somethingelse"'})
        assert r.status_code == 200 and r.content == DATA
        r = get(peer, blob_path(DIGEST), Range="bytes=10-", **{"If-Range": f'"{DIGEST}"'})
        assert r.status_code == 206 and r.content == DATA[10:]

    def test_an_evicted_file_is_not_found_not_an_error(self, peer: PeerServer, blob: pathlib.Path) -> None:
        blob.unlink()  # evicted after the index was read
        assert get(peer, blob_path(DIGEST)).status_code == 404

    def test_a_symlink_in_place_of_the_file_is_not_followed(self, peer: PeerServer, blob: pathlib.Path,
                                                           tmp_path: pathlib.Path) -> None:
        secret = tmp_path / "secret.txt"
        secret.write_text("not a model")
        blob.unlink()
        blob.symlink_to(secret)
        r = get(peer, blob_path(DIGEST))
        assert r.status_code == 404 and b"not a model" not in r.content


class TestRefusals:
    @pytest.mark.parametrize("token", [None, "wrong-token-but-long-enough", TOKEN + "x", TOKEN[:-1]])
    def test_a_request_without_the_fleet_credential_is_refused_and_learns_nothing(
            self, peer: PeerServer, lookups: Lookups, token: str | None) -> None:
        held = get(peer, blob_path(DIGEST), token=token)
        missing = get(peer, blob_path("1" * 64), token=token)
        assert held.status_code == missing.status_code == 401
        assert held.content == missing.content and DATA[:64] not in held.content
        assert held.headers["www-authenticate"].startswith("Bearer")
        assert lookups.asked == []  # the index was not even consulted
        assert peer.metrics.refused.labels("unauthorized")._value.get() == 2

    def test_a_token_in_another_scheme_is_refused(self, peer: PeerServer) -> None:
        r = httpx.get(peer.url("127.0.0.1") + blob_path(DIGEST), headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401

    @pytest.mark.parametrize("path", [
        "/", "/v1/blobs", "/v1/blobs/sha256/", "/v1/blobs/sha256/../../../etc/passwd",
        "/v1/blobs/sha256/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/etc/passwd",
        f"/v1/blobs/sha256/{DIGEST}/../../../etc/passwd", f"/v1/blobs/sha256/{DIGEST.upper()}",
        f"/v1/blobs/sha256/{DIGEST}?../../etc/passwd", f"/v1/blobs/sha256/{DIGEST}%00", f"/v1/blobs/sha256/{DIGEST}..",
        "/v1/blobs/sha256/" + "a" * 63 + "/", "/v1/blobs/key/team%2Fm0", "/v1/blobs/sha256/*",
    ])
    def test_a_traversal_or_listing_attempt_gets_nothing(self, peer: PeerServer, lookups: Lookups, path: str) -> None:
        status, body = raw_get(peer.url("127.0.0.1"), path, TOKEN)
        assert status == 404
        assert b"root:" not in body and DATA[:64] not in body
        assert lookups.asked == []  # only a well-formed digest ever reaches the index

    def test_a_write_method_is_not_allowed(self, peer: PeerServer) -> None:
        r = httpx.put(peer.url("127.0.0.1") + blob_path(DIGEST), content=b"x",
                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 405

    def test_more_transfers_than_the_cap_are_turned_away_to_another_holder(
            self, lookups: Lookups) -> None:
        # 1 MiB at 512 KiB/s: the first transfer takes about two seconds.
        settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", max_uploads=1, upload_bytes_per_s=512 * 1024)
        with PeerServer(settings, lookup=lookups) as server:
            first: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: first.append(get(server, blob_path(DIGEST))))
            thread.start()
            deadline = time.monotonic() + 10
            while server.metrics.uploads._value.get() < 1:
                assert time.monotonic() < deadline, "the first transfer never started"
                time.sleep(0.005)
            second = get(server, blob_path(DIGEST))
            thread.join(timeout=30)
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert first and first[0].status_code == 200 and first[0].content == DATA


class TestBandwidthCap:
    def test_the_bucket_paces_bytes_to_the_rate(self) -> None:
        clock = [0.0]
        slept: list[float] = []

        def sleep(s: float) -> None:
            slept.append(s)
            clock[0] += s

        bucket = TokenBucket(100.0, burst=10.0, clock=lambda: clock[0], sleep=sleep)
        for _ in range(20):
            bucket.take(50)  # 1,000 bytes at 100/s: about 10 s, less the burst
        assert 9.8 <= clock[0] <= 10.0
        assert all(s > 0 for s in slept)

    def test_no_cap_never_sleeps(self) -> None:
        bucket = TokenBucket(0.0, sleep=lambda s: pytest.fail("slept"))
        bucket.take(1 << 30)

    def test_a_capped_server_sends_no_faster_than_its_cap(self, lookups: Lookups) -> None:
        settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", max_uploads=2, upload_bytes_per_s=4 * 2**20)
        with PeerServer(settings, lookup=lookups) as server:
            started = time.monotonic()
            r = get(server, blob_path(DIGEST))
            r2 = get(server, blob_path(DIGEST))
            elapsed = time.monotonic() - started
        assert r.content == DATA and r2.content == DATA
        # 2 MiB at 4 MiB/s, less one slice of burst: at least a quarter of a second
        assert elapsed >= 0.2


def test_parse_range_reads_one_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=100-", 100) is False
    assert parse_range("bytes=-0", 100) is False
    assert parse_range("bytes=5-1", 100) is False
    assert parse_range("items=0-9", 100) is None


def test_settings_refuse_a_short_token_and_never_show_it() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        PeerServerSettings(token="short")
    assert TOKEN not in repr(PeerServerSettings(token=TOKEN))


def test_the_disk_tier_offers_only_complete_files_it_verified(tmp_path: pathlib.Path) -> None:
    """A finished download is offered under its digest; a partial one never is."""
    import numpy as np
    import safetensors.numpy

    data = safetensors.numpy.save({"w": np.arange(64 * 1024, dtype=np.float32)})
    digest = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        policy = DownloadPolicy(allow_http=True, trust_env=False, max_attempts=1)
        with ModelServer({"m.safetensors": data, "slow.safetensors": data}) as source, Downloader(policy) as downloader:
            store = DiskStore(cache_dir=tmp_path / "cache", budget_bytes=10 << 20, downloader=downloader,
                              metrics=AgentMetrics())
            await store.start()
            assert store.verified_path(digest) is None
            path = await store.ensure(ModelSource(key="ns/m", url=source.url("m.safetensors"), sha256=digest))
            assert store.verified_path(digest) == path
            # A download in progress (throttled) has bytes on disk but is not offered.
            source.faults.rate_bytes_per_s = 64 * 1024
            other = ModelSource(key="ns/slow", url=source.url("slow.safetensors"), sha256=digest)
            task = asyncio.ensure_future(store.ensure(other))
            deadline = time.monotonic() + 10
            while not any(p.name.endswith(".part") and p.stat().st_size > 0 for p in store.models_dir.iterdir()):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert store.verified_path(digest) == path  # still only the complete file
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    asyncio.run(main())


def test_connections_beyond_the_cap_are_closed_at_once(lookups: Lookups) -> None:
    import socket

    from stoker.agent import peer_server

    settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1")
    with PeerServer(settings, lookup=lookups) as server:
        server._httpd._connections = threading.BoundedSemaphore(2)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]  # say nothing, hold threads
        deadline = time.monotonic() + 10
        while server._httpd._connections._value > 0:  # both accepted, each holding its thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(5)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.recv(100) == b""  # closed without an answer
        for s in (*idle, extra):
            s.close()
        deadline = time.monotonic() + 10
        while True:  # once the idle ones are gone, requests are served again
            try:
                if get(server, blob_path(DIGEST)).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert peer_server._Server.MAX_CONNECTIONS == 64


def test_an_empty_peer_credential_setting_turns_the_peer_tier_off(tmp_path: pathlib.Path, monkeypatch) -> None:
    from stoker.agent.peer_server import PeerCredentialError, read_token
    from stoker.agent.settings import AgentSettings

    monkeypatch.setenv("STOKER_PEER_TOKEN_FILE", "")
    assert AgentSettings.load(cache_dir=tmp_path / "cache").peer_token_file is None
    assert read_token(None) is None and read_token(tmp_path / "absent") is None
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(PeerCredentialError, match="at least 16 printable"):
        read_token(short)
    good = tmp_path / "good"
    good.write_text(TOKEN + "\n")
    assert read_token(good) == TOKEN


def test_a_slow_cap_sends_its_first_bytes_at_once(lookups: Lookups) -> None:
    settings = PeerServerSettings(token=TOKEN, addr="127.0.0.1", upload_bytes_per_s=256 * 1024)
    with PeerServer(settings, lookup=lookups) as server:
        started = time.monotonic()
        with httpx.stream("GET", server.url("127.0.0.1") + blob_path(DIGEST),
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as r:
            first = next(r.iter_raw())
            waited = time.monotonic() - started
    assert first == DATA[:len(first)]
    assert waited < 1.0  # not a whole 8 MiB slice's worth of waiting at 256 KiB/s


def test_the_raw_request_helper_sends_nothing_beyond_loopback() -> None:
    for url in ("http://10.0.0.1:8471", "https://127.0.0.1:8471", "http://127.0.0.1", "http://models.example:80"):
        with pytest.raises(ValueError, match="only to http://<loopback address>:<port>"):
            raw_get(url, "/")
