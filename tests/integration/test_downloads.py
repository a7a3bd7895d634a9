"""Downloads against a real HTTP server on 127.0.0.1 with injected faults, into real files."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest

from stoker.agent.download import (
    Credentials,
    DownloadError,
    DownloadFailure,
    DownloadPolicy,
    DownloadProgress,
    DownloadRequest,
    Downloader,
    partial_paths,
    quiet_http_client_logs,
)
from stoker.testing.model_server import ModelServer

SIZE = 3 * 2**20 + 123
DATA = os.urandom(SIZE)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer({"model.safetensors": DATA}) as srv:
        yield srv


@pytest.fixture
def downloader() -> Iterator[Downloader]:
    policy = DownloadPolicy(allow_http=True, backoff_initial_s=0.001, backoff_max_s=0.01, trust_env=False, max_attempts=4)
    with Downloader(policy) as d:
        yield d


def request(server: ModelServer, tmp_path: pathlib.Path, **kwargs: object) -> DownloadRequest:
    return DownloadRequest(url=server.url("model.safetensors"), dest=tmp_path / "model.bin", **kwargs)  # type: ignore[arg-type]


def wait_for(predicate: object, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def leftovers(tmp_path: pathlib.Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "model.bin")


class TestSuccessfulDownloads:
    def test_a_file_is_verified_and_renamed_into_place_with_nothing_left_over(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        result = downloader.download(request(server, tmp_path, sha256=SHA, size_bytes=SIZE))
        assert (tmp_path / "model.bin").read_bytes() == DATA
        assert (result.sha256, result.size_bytes, result.attempts) == (SHA, SIZE, 1)
        assert leftovers(tmp_path) == []

    def test_the_digest_is_computed_even_when_none_is_expected(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        assert downloader.download(request(server, tmp_path)).sha256 == SHA

    def test_the_size_callback_runs_before_any_byte_is_written(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        seen: list[tuple[int, bool]] = []
        part = partial_paths(tmp_path / "model.bin")[0]
        downloader.download(request(server, tmp_path), on_total=lambda n: seen.append((n, part.exists())))
        assert seen == [(SIZE, False)]

    def test_an_exception_from_the_size_callback_aborts_the_download(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        def refuse(_: int) -> None:
            raise RuntimeError("no room")

        with pytest.raises(RuntimeError, match="no room"):
            downloader.download(request(server, tmp_path), on_total=refuse)
        assert not (tmp_path / "model.bin").exists()

    def test_progress_and_bandwidth_are_readable_while_it_runs(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.rate_bytes_per_s = 4 * 2**20
        progress = DownloadProgress()
        thread = threading.Thread(target=downloader.download, args=(request(server, tmp_path),), kwargs={"progress": progress})
        thread.start()
        wait_for(lambda: 0 < progress.bytes_done < SIZE and progress.bandwidth_bytes_per_s > 0)
        assert progress.total_bytes == SIZE
        assert 0 < (progress.fraction or 0) < 1
        thread.join(timeout=30)
        assert progress.finished and progress.bytes_done == SIZE

    def test_a_body_without_content_length_is_accepted_when_the_size_hint_matches(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.send_content_length = False
        result = downloader.download(request(server, tmp_path, size_bytes=SIZE, sha256=SHA, require_size=True))
        assert result.size_bytes == SIZE


class TestResume:
    def test_a_dropped_connection_resumes_with_a_range_request(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.drop_after_bytes = 1_000_000
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.attempts == 2 and 0 < result.resumed_bytes <= 1_000_000
        # the reset may discard bytes still in flight, so the resume point is at most the drop point
        (resumed,) = server.range_requests()
        assert resumed == f"bytes={result.resumed_bytes}-"
        assert (tmp_path / "model.bin").read_bytes() == DATA

    def test_without_range_support_the_download_restarts_from_zero(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.drop_after_bytes = 1_000_000
        server.faults.range_support = False
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.attempts == 2 and result.resumed_bytes == 0
        assert (tmp_path / "model.bin").read_bytes() == DATA

    def test_several_drops_in_a_row_still_complete(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.drop_after_bytes = 700_000
        server.faults.drop_count = 3
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.attempts == 4 and result.sha256 == SHA

    def test_a_cancelled_download_keeps_its_partial_file_and_the_next_call_resumes_it(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.rate_bytes_per_s = 2 * 2**20
        cancel = threading.Event()
        progress = DownloadProgress()
        errors: list[DownloadError] = []

        def run() -> None:
            try:
                downloader.download(request(server, tmp_path, sha256=SHA), progress=progress, cancel=cancel)
            except DownloadError as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: progress.bytes_done > 200_000)
        cancel.set()
        thread.join(timeout=30)
        assert [e.reason for e in errors] == [DownloadFailure.CANCELLED]
        part = partial_paths(tmp_path / "model.bin")[0]
        kept = part.stat().st_size
        assert kept > 0

        server.faults.rate_bytes_per_s = None
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.resumed_bytes == kept
        assert server.range_requests()[-1] == f"bytes={kept}-"
        assert (tmp_path / "model.bin").read_bytes() == DATA

    def test_a_partial_file_for_another_source_is_discarded(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        part, sidecar = partial_paths(tmp_path / "model.bin")
        part.write_bytes(b"x" * 1000)
        sidecar.write_text('{"resume_key": "https://elsewhere/other", "sha256": null, "validator": null, "total_bytes": null}')
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.resumed_bytes == 0 and server.range_requests() == []


class TestRetries:
    def test_server_errors_are_retried_until_the_server_recovers(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.fail_count = 2
        result = downloader.download(request(server, tmp_path, sha256=SHA))
        assert result.attempts == 3 and server.request_count("model.safetensors") == 3

    def test_persistent_server_errors_give_up_after_the_attempt_limit(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.fail_count = 100
        server.faults.fail_status = 503
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.HTTP_SERVER_ERROR
        assert info.value.retryable and info.value.attempts == 4 and info.value.status_code == 503

    @pytest.mark.parametrize(
        ("status", "reason"),
        [
            (404, DownloadFailure.HTTP_NOT_FOUND),
            (403, DownloadFailure.HTTP_FORBIDDEN),
            (400, DownloadFailure.HTTP_CLIENT_ERROR),
        ],
    )
    def test_client_errors_are_not_retried(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path, status: int, reason: DownloadFailure
    ) -> None:
        server.faults.status_override = status
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path))
        assert info.value.reason == reason and not info.value.retryable
        assert server.request_count() == 1
        assert list(tmp_path.iterdir()) == []

    def test_a_missing_file_reports_not_found(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        with pytest.raises(DownloadError) as info:
            downloader.download(DownloadRequest(url=server.url("nope.safetensors"), dest=tmp_path / "x"))
        assert info.value.reason == DownloadFailure.HTTP_NOT_FOUND
        assert "spec.source.url" in str(info.value)

    def test_a_stalled_server_times_out_and_is_retried(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        server.faults.rate_bytes_per_s = 1000  # 16 KiB chunks, so a read waits about 16 s
        policy = DownloadPolicy(allow_http=True, read_timeout_s=0.2, max_attempts=2, backoff_initial_s=0.001, trust_env=False)
        with Downloader(policy) as d, pytest.raises(DownloadError) as info:
            d.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.TIMEOUT and info.value.attempts == 2


class TestVerification:
    def test_wrong_bytes_fail_the_checksum_and_are_removed(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.corrupt = True
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, sha256=SHA))
        assert info.value.reason == DownloadFailure.CHECKSUM_MISMATCH
        assert list(tmp_path.iterdir()) == []

    def test_a_size_hint_that_disagrees_with_the_server_fails_before_downloading(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, size_bytes=SIZE + 1))
        assert info.value.reason == DownloadFailure.SIZE_MISMATCH
        assert list(tmp_path.iterdir()) == []

    def test_a_short_close_delimited_body_fails_the_size_check(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.send_content_length = False
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, size_bytes=SIZE + 10))
        assert info.value.reason == DownloadFailure.SIZE_MISMATCH

    def test_an_unknown_size_is_refused_when_space_must_be_reserved(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        server.faults.send_content_length = False
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, require_size=True))
        assert info.value.reason == DownloadFailure.SIZE_UNKNOWN


class TestSecurity:
    def test_plain_http_is_refused_by_default(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        with Downloader(DownloadPolicy(trust_env=False)) as d, pytest.raises(DownloadError) as info:
            d.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.URL_NOT_ALLOWED
        assert server.request_count() == 0

    def test_hosts_outside_the_allowlist_are_refused(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        policy = DownloadPolicy(allow_http=True, allowed_hosts=frozenset({".models.example.com"}), trust_env=False)
        with Downloader(policy) as d, pytest.raises(DownloadError) as info:
            d.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.URL_NOT_ALLOWED and "allowlist" in str(info.value)
        allowed = DownloadPolicy(allow_http=True, allowed_hosts=frozenset({"127.0.0.1"}), trust_env=False)
        with Downloader(allowed) as d:
            assert d.download(request(server, tmp_path)).sha256 == SHA

    def test_a_bearer_token_is_sent_and_never_shown(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        token = "s3cr3t-token-value"
        server.faults.required_token = token
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, credentials=Credentials.bearer("wrong-token")))
        assert info.value.reason == DownloadFailure.HTTP_UNAUTHORIZED
        assert "wrong-token" not in str(info.value)
        creds = Credentials.for_header("Authorization", token + "\n")
        assert token not in repr(creds) and token not in repr(request(server, tmp_path, credentials=creds))
        assert downloader.download(request(server, tmp_path, credentials=creds)).sha256 == SHA

    def test_a_header_value_http_refuses_fails_at_once_without_quoting_the_credential(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Credentials refuse such values; this is the last line of defence if one gets through.
        quiet_http_client_logs()  # as the agent does at start
        caplog.set_level(logging.DEBUG)
        creds = object.__new__(Credentials)
        object.__setattr__(creds, "header_name", "Authorization")
        object.__setattr__(creds, "header_value", "Bearer SECRET-VALUE\nline2")
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path, credentials=creds))
        assert info.value.reason == DownloadFailure.INVALID_REQUEST and not info.value.retryable
        assert "SECRET-VALUE" not in str(info.value) and "secretRef" in str(info.value)
        assert not any("SECRET-VALUE" in r.getMessage() for r in caplog.records)
        assert server.request_count() == 0

    def test_query_strings_are_removed_from_error_messages(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        url = server.url("missing.safetensors") + "?X-Amz-Signature=abcdef123"
        with pytest.raises(DownloadError) as info:
            downloader.download(DownloadRequest(url=url, dest=tmp_path / "x"))
        assert "abcdef123" not in str(info.value) and "missing.safetensors" in str(info.value)
        assert "abcdef123" not in repr(DownloadRequest(url=url, dest=tmp_path / "x"))


class TestRedirects:
    def test_redirects_are_followed_without_forwarding_credentials_to_another_origin(
        self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path
    ) -> None:
        with ModelServer({"mirror.safetensors": DATA}) as mirror:
            mirror.faults.required_token = "origin-token"
            server.faults.redirects["model.safetensors"] = mirror.url("mirror.safetensors")
            with pytest.raises(DownloadError) as info:
                downloader.download(request(server, tmp_path, credentials=Credentials.bearer("origin-token")))
            assert info.value.reason == DownloadFailure.HTTP_UNAUTHORIZED
            assert [r.authorized for r in mirror.requests] == [False]
            mirror.faults.required_token = None
            assert downloader.download(request(server, tmp_path, sha256=SHA)).sha256 == SHA

    def test_a_redirect_to_a_host_outside_the_allowlist_is_refused(self, server: ModelServer, tmp_path: pathlib.Path) -> None:
        server.faults.redirects["model.safetensors"] = "http://localhost:1/elsewhere.safetensors"
        policy = DownloadPolicy(allow_http=True, allowed_hosts=frozenset({"127.0.0.1"}), trust_env=False)
        with Downloader(policy) as d, pytest.raises(DownloadError) as info:
            d.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.URL_NOT_ALLOWED

    def test_a_redirect_loop_stops(self, server: ModelServer, downloader: Downloader, tmp_path: pathlib.Path) -> None:
        server.faults.redirects["model.safetensors"] = server.url("model.safetensors")
        with pytest.raises(DownloadError) as info:
            downloader.download(request(server, tmp_path))
        assert info.value.reason == DownloadFailure.TOO_MANY_REDIRECTS
