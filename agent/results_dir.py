"""The pod-local results folder: a size limit with clean-up, and a read-only endpoint for fetching (I/O).

Images of jobs without an output URL or a configured store are written into the results
folder (`output.write_result`). The folder lives as long as the pod (an emptyDir), so it is
kept small: after every write, files older than `max_age_s` go, then the oldest until the
folder fits `max_bytes` (the newest file always stays). `plan_cleanup` is the pure choice.

`ResultsServer` serves `GET /results/<file>` for files in the folder, nothing else (names are
checked against the pattern results are written with: no paths, no dot files), so that
`stoker get image` can fetch an image through the API server's pod proxy
(`pods/<pod>:<port>/proxy/results/<file>`, which needs `get` on `pods/proxy`). It listens
only when a port is configured; the CacheAgent reports the port as status.resultsPort.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import os
import pathlib
import re
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

_RESULT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,250}\.png$")


@dataclasses.dataclass(frozen=True, slots=True)
class ResultFile:
    name: str
    size_bytes: int
    mtime: float


def plan_cleanup(files: Sequence[ResultFile], *, max_bytes: int, max_age_s: float | None, now: float) -> list[str]:
    """Names to delete: those older than `max_age_s`, then the oldest until the rest fit
    `max_bytes`; the newest file is always kept (it was just written for a job). Pure."""
    newest_first = sorted(files, key=lambda f: (-f.mtime, f.name))
    doomed: list[str] = []
    kept_bytes = 0
    for i, f in enumerate(newest_first):
        too_old = max_age_s is not None and now - f.mtime > max_age_s
        if i > 0 and (too_old or kept_bytes + f.size_bytes > max_bytes):
            doomed.append(f.name)
            continue
        kept_bytes += f.size_bytes
    return doomed


def clean(results_dir: pathlib.Path, *, max_bytes: int, max_age_s: float | None, now: float | None = None) -> list[str]:
    """Apply `plan_cleanup` to the folder; returns the names deleted (missing folder: nothing)."""
    files = []
    try:
        entries = list(os.scandir(results_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and _RESULT_NAME.match(entry.name):
            st = entry.stat(follow_symlinks=False)
            files.append(ResultFile(entry.name, st.st_size, st.st_mtime))
    doomed = plan_cleanup(files, max_bytes=max_bytes, max_age_s=max_age_s, now=time.time() if now is None else now)
    for name in doomed:
        try:
            os.unlink(results_dir / name)
        except FileNotFoundError:
            pass
    if doomed:
        log.info("results folder: removed %d old image(s) to stay within %d bytes", len(doomed), max_bytes)
    return doomed


class ResultsServer:
    """A read-only HTTP endpoint for the results folder (see the module docstring)."""

    def __init__(self, results_dir: pathlib.Path, *, port: int, addr: str = "0.0.0.0") -> None:
        folder = results_dir

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("results endpoint: " + format, *args)

            def do_GET(self) -> None:
                prefix = "/results/"
                name = self.path.split("?", 1)[0][len(prefix):] if self.path.startswith(prefix) else ""
                path = folder / name
                if not _RESULT_NAME.match(name) or not path.is_file():
                    self.send_error(404, "no such result")
                    return
                try:
                    data = path.read_bytes()
                except OSError:
                    self.send_error(404, "no such result")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer((addr, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="stoker-results", daemon=True)

    def start(self) -> ResultsServer:
        self._thread.start()
        log.info("serving the results folder on port %d", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
