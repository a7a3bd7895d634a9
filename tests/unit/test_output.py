"""Results reach an HTTP PUT endpoint (retrying transient failures) or the results directory, safely."""

from __future__ import annotations

import hashlib
import http.server
import logging
import pathlib
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.agent import output

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
SECRET = "X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIDEXAMPLE"


class _Store(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.requests: list[tuple[str, str, str, bytes]] = []  # method, path, content type, body


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Store

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append(("PUT", self.path, self.headers.get("Content-Type", ""), body))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def store() -> Iterator[_Store]:
    server = _Store()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _url(store: _Store) -> str:
    host, port = store.server_address[:2]
    return f"http://{host}:{port}/bucket/ns/job-1.png?{SECRET}"


FAST = output.RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.01, timeout_s=5.0)


def test_a_put_delivers_the_png_with_its_content_type(store: _Store) -> None:
    result = output.put_image(_url(store), PNG, policy=FAST)
    assert store.requests == [("PUT", f"/bucket/ns/job-1.png?{SECRET}", "image/png", PNG)]
    assert result.sha256 == hashlib.sha256(PNG).hexdigest()
    assert result.size_bytes == len(PNG)
    assert result.content_type == "image/png"


def test_the_result_location_has_no_query_string(store: _Store) -> None:
    result = output.put_image(_url(store), PNG, policy=FAST)
    host, port = store.server_address[:2]
    assert result.location == f"http://{host}:{port}/bucket/ns/job-1.png"


def test_a_server_error_is_retried_until_the_put_succeeds(store: _Store) -> None:
    store.statuses = [500, 503]
    pauses: list[float] = []
    output.put_image(_url(store), PNG, policy=FAST, sleep=pauses.append)
    assert len(store.requests) == 3
    assert all(body == PNG for *_, body in store.requests)
    assert pauses == [0.01, 0.01]


def test_a_forbidden_answer_fails_at_once_without_leaking_the_signature(
    store: _Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.statuses = [403]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(output.OutputError) as caught:
        output.put_image(_url(store), PNG, policy=FAST, sleep=lambda _: None)
    assert len(store.requests) == 1
    assert not caught.value.retryable
    assert "403" in str(caught.value)
    assert "deadbeef" not in str(caught.value) and "deadbeef" not in caplog.text


def test_persistent_server_errors_end_in_a_retryable_failure(store: _Store) -> None:
    store.statuses = [502] * 10
    with pytest.raises(output.OutputError) as caught:
        output.put_image(_url(store), PNG, policy=FAST, sleep=lambda _: None)
    assert len(store.requests) == FAST.attempts
    assert caught.value.retryable
    assert "deadbeef" not in str(caught.value)


def test_a_refused_connection_is_retried_and_reported_without_the_query(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    pauses: list[float] = []
    with pytest.raises(output.OutputError) as caught:
        output.put_image(f"http://127.0.0.1:{port}/b/k.png?{SECRET}", PNG, policy=FAST, sleep=pauses.append)
    assert caught.value.retryable
    assert len(pauses) == FAST.attempts - 1
    assert "deadbeef" not in str(caught.value) and "deadbeef" not in caplog.text


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(output.OutputError) as caught:
        output.put_image("file:///etc/passwd", PNG, policy=FAST)
    assert not caught.value.retryable


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = output.RetryPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_redaction_removes_credentials_query_and_fragment() -> None:
    assert output.redact_url("https://user:pw@store.example:9000/b/k.png?sig=1#frag") == (
        "https://store.example:9000/b/k.png")


def test_a_result_file_is_written_whole_under_the_results_directory(tmp_path: pathlib.Path) -> None:
    result = output.write_result(tmp_path, PNG, namespace="team-a", name="job-1", attempt=2)
    path = pathlib.Path(result.location)
    assert path.parent == tmp_path.resolve()
    assert path.name == "team-a__job-1__2.png"
    assert path.read_bytes() == PNG
    assert result.sha256 == hashlib.sha256(PNG).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_hostile_names_cannot_leave_the_results_directory(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "results"
    result = output.write_result(results, PNG, namespace="../..", name="../../etc/passwd", attempt=1)
    assert pathlib.Path(result.location).parent == results.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


@given(namespace=st.text(max_size=300), name=st.text(max_size=300), attempt=st.integers(0, 10**6))
def test_result_file_names_are_always_one_plain_path_component(namespace: str, name: str, attempt: int) -> None:
    filename = output.result_filename(namespace=namespace, name=name, attempt=attempt)
    assert "/" not in filename and "\\" not in filename and "\x00" not in filename
    assert not filename.startswith(".")
    assert filename.endswith(f"__{attempt}.png")
    assert len(filename.encode()) < 255


def test_every_attempt_of_a_job_writes_the_same_file_so_a_killed_attempt_leaves_no_second_result(tmp_path) -> None:
    first = output.write_result(tmp_path, PNG + b"1", namespace="ns", name="job", attempt=1, job_uid="uid-1")
    second = output.write_result(tmp_path, PNG + b"2", namespace="ns", name="job", attempt=2, job_uid="uid-1")
    assert first.location == second.location and [p.name for p in tmp_path.iterdir()] == ["ns__job__uid-1.png"]
    assert pathlib.Path(second.location).read_bytes() == PNG + b"2"
    other = output.write_result(tmp_path, PNG, namespace="ns", name="job", attempt=1, job_uid="uid-2")
    assert other.location != second.location, "a new job of the same name keeps its own file"


def test_a_job_uid_cannot_steer_the_file_out_of_the_results_folder(tmp_path) -> None:
    result = output.write_result(tmp_path / "r", PNG, namespace="ns", name="j", attempt=1, job_uid="../../x")
    assert pathlib.Path(result.location).parent == (tmp_path / "r").resolve()
