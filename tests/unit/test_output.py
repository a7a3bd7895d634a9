"""Results reach an HTTP PUT endpoint (retrying transient failures) or the results directory, safely."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import pathlib
import socket
import threading
import time
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
HTTP = output.OutputPolicy(allow_http=True, deadline_s=10.0)  # the test servers speak plain http


def test_a_put_delivers_the_png_with_its_content_type(store: _Store) -> None:
    result = output.put_image(_url(store), PNG, policy=FAST, output_policy=HTTP)
    assert store.requests == [("PUT", f"/bucket/ns/job-1.png?{SECRET}", "image/png", PNG)]
    assert result.sha256 == hashlib.sha256(PNG).hexdigest()
    assert result.size_bytes == len(PNG)
    assert result.content_type == "image/png"


def test_the_result_location_has_no_query_string(store: _Store) -> None:
    result = output.put_image(_url(store), PNG, policy=FAST, output_policy=HTTP)
    host, port = store.server_address[:2]
    assert result.location == f"http://{host}:{port}/bucket/ns/job-1.png"


def test_a_server_error_is_retried_until_the_put_succeeds(store: _Store) -> None:
    store.statuses = [500, 503]
    pauses: list[float] = []
    output.put_image(_url(store), PNG, policy=FAST, output_policy=HTTP, sleep=pauses.append)
    assert len(store.requests) == 3
    assert all(body == PNG for *_, body in store.requests)
    assert pauses == [0.01, 0.01]


def test_a_refusal_is_retried_like_any_failure_and_reported_without_the_signature(
    store: _Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.statuses = [403] * 10
    caplog.set_level(logging.DEBUG)
    with pytest.raises(output.OutputError) as caught:
        output.put_image(_url(store), PNG, policy=FAST, output_policy=HTTP, sleep=lambda _: None)
    assert len(store.requests) == FAST.attempts
    assert caught.value.retryable and caught.value.reason == "OutputFailed"
    assert "403" not in str(caught.value) and "HTTP 403" in caplog.text  # the detail goes to the agent's log only
    assert "deadbeef" not in str(caught.value) and "deadbeef" not in caplog.text


def test_persistent_server_errors_end_in_a_retryable_failure(store: _Store) -> None:
    store.statuses = [502] * 10
    with pytest.raises(output.OutputError) as caught:
        output.put_image(_url(store), PNG, policy=FAST, output_policy=HTTP, sleep=lambda _: None)
    assert len(store.requests) == FAST.attempts
    assert caught.value.retryable
    assert "deadbeef" not in str(caught.value)


def test_a_closed_port_and_a_refusal_read_the_same_to_the_job_author(store: _Store) -> None:
    """Job authors choose output URLs: what they see must not tell an open port from a closed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    store.statuses = [403] * 10
    messages = []
    for url in (_url(store), f"http://127.0.0.1:{closed}/bucket/ns/job-1.png"):
        with pytest.raises(output.OutputError) as caught:
            output.put_image(url, PNG, policy=FAST, output_policy=HTTP, sleep=lambda _: None)
        shown = str(caught.value).replace(str(closed), "PORT").replace(str(store.server_address[1]), "PORT")
        messages.append((caught.value.reason, caught.value.retryable, shown))
    assert messages[0] == messages[1]


def test_a_refused_connection_is_retried_and_reported_without_the_query(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    pauses: list[float] = []
    with pytest.raises(output.OutputError) as caught:
        output.put_image(f"http://127.0.0.1:{port}/b/k.png?{SECRET}", PNG, policy=FAST, output_policy=HTTP, sleep=pauses.append)
    assert caught.value.retryable
    assert len(pauses) == FAST.attempts - 1
    assert "deadbeef" not in str(caught.value) and "deadbeef" not in caplog.text


@pytest.mark.parametrize(("url", "reason", "says"), [
    ("file:///etc/passwd", "InvalidOutputURL", "must use https"),
    ("http://store.example/k.png", "OutputURLNotAllowed", "plain http"),
    ("https://xn--a.example/k.png", "InvalidOutputURL", "not a valid URL"),
    ("https://\u2603.example/k.png", "InvalidOutputURL", "not a valid URL"),
    ("https://store.example:99999/k.png", "InvalidOutputURL", "port 99999"),
    ("https://store.example:0/k.png", "InvalidOutputURL", "port 0"),
    ("https://user:pw@store.example/k.png", "InvalidOutputURL", "user name or password"),
    ("https://a..example/k.png", "InvalidOutputURL", "invalid host name"),
    ("https:///k.png", "InvalidOutputURL", "no host"),
    ("https://store.example/k .png", "InvalidOutputURL", "whitespace"),
    ("https://elsewhere.example/k.png", "OutputURLNotAllowed", "not among the hosts"),
])
def test_an_unusable_or_unallowed_output_url_is_refused_before_any_request(url: str, reason: str, says: str) -> None:
    policy = output.OutputPolicy(allowed_hosts=frozenset({"store.example", "a..example", ".xn--a.example"}))
    with pytest.raises(output.OutputError) as caught:
        output.check_output_url(url, policy)
    assert (caught.value.reason, caught.value.retryable) == (reason, False)
    assert says in str(caught.value) and "pw" not in str(caught.value)


def test_a_url_on_an_allowed_host_passes() -> None:
    policy = output.OutputPolicy(allowed_hosts=frozenset({".store.example"}))
    assert output.check_output_url("https://eu.store.example/b/k.png?sig=1", policy).host == "eu.store.example"


class _Trickle(http.server.ThreadingHTTPServer):
    """Reads the PUT, then answers one header byte every `gap_s`, or a redirect, or a huge body at full speed."""

    def __init__(self, *, gap_s: float = 0.0, body_bytes: int = 0, redirect_to: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _TrickleHandler)
        self.daemon_threads = True
        self.gap_s, self.body_bytes, self.redirect_to = gap_s, body_bytes, redirect_to
        self.sent_body = 0
        self.paths: list[str] = []


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    server: _Trickle

    def do_PUT(self) -> None:  # noqa: N802
        self.server.paths.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        srv = self.server
        try:
            if srv.redirect_to is not None:
                self.wfile.write(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {srv.redirect_to}\r\n"
                                 "Content-Length: 0\r\n\r\n".encode())
            elif srv.gap_s:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    threading.Event().wait(srv.gap_s)  # the trickle is the fault being simulated
            else:
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {srv.body_bytes}\r\n\r\n".encode())
                block = b"\0" * (1 << 20)
                while srv.sent_body < srv.body_bytes:
                    self.wfile.write(block)
                    srv.sent_body += len(block)
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(server: http.server.HTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_trickling_its_answer_is_cut_off_at_the_deadline() -> None:
    server = _Trickle(gap_s=0.5)  # each byte well within the per-read timeout, the whole answer never
    policy = output.OutputPolicy(allow_http=True, deadline_s=2.0)
    with _serving(server) as base:
        started = time.monotonic()
        with pytest.raises(output.OutputError) as caught:
            output.put_image(f"{base}/k.png", PNG, policy=FAST, output_policy=policy)
        elapsed = time.monotonic() - started
    assert caught.value.retryable and caught.value.reason == "OutputFailed"
    assert 1.5 < elapsed < 5.0, elapsed


def test_a_huge_answer_body_is_never_read() -> None:
    server = _Trickle(body_bytes=1 << 30)
    with _serving(server) as base:
        result = output.put_image(f"{base}/k.png", PNG, policy=FAST, output_policy=HTTP)
    assert result.size_bytes == len(PNG)
    assert server.sent_body < 64 << 20  # the server gave up writing long before a gigabyte


def test_a_redirect_is_not_followed() -> None:
    target = _Trickle()
    with _serving(target) as elsewhere:
        server = _Trickle(redirect_to=f"{elsewhere}/stolen.png")
        with _serving(server) as base:
            with pytest.raises(output.OutputError):
                output.put_image(f"{base}/k.png", PNG, policy=FAST, output_policy=HTTP, sleep=lambda _: None)
    assert len(server.paths) == FAST.attempts and target.paths == []

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


def test_long_names_that_share_a_prefix_get_files_of_their_own() -> None:
    a, b = "x" * 120 + "-a", "x" * 120 + "-b"
    assert output.result_filename(namespace="ns", name=a, attempt=1) != output.result_filename(namespace="ns", name=b, attempt=1)


@given(parts=st.lists(st.tuples(st.text(max_size=300), st.text(max_size=300)), min_size=2, max_size=2, unique=True))
def test_different_namespaces_or_names_never_share_a_result_file(parts: list[tuple[str, str]]) -> None:
    (ns1, n1), (ns2, n2) = parts
    assert output.result_filename(namespace=ns1, name=n1, attempt=1) != output.result_filename(namespace=ns2, name=n2, attempt=1)


@given(namespace=st.text(max_size=300), name=st.text(max_size=300), attempt=st.integers(0, 10**6))
def test_result_file_names_are_always_one_plain_path_component(namespace: str, name: str, attempt: int) -> None:
    filename = output.result_filename(namespace=namespace, name=name, attempt=attempt)
    assert "/" not in filename and "\\" not in filename and "\x00" not in filename
    assert not filename.startswith(".")
    assert filename.endswith(f"__{attempt}.png")
    assert len(filename.encode()) < 255
