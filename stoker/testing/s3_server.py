"""A real S3-compatible server on 127.0.0.1 for tests: versitygw over a POSIX folder.

The binary comes from `hack/build-versitygw.sh` ($STOKER_VERSITYGW when set up by
hack/setup.sh). It serves the S3 API with one root access key and refuses unsigned or
wrongly signed requests, like any S3 endpoint.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[2]


def versitygw_binary() -> str:
    path = os.environ.get("STOKER_VERSITYGW")
    if path and os.access(path, os.X_OK):
        return path
    out = subprocess.run(["bash", str(REPO / "hack" / "build-versitygw.sh")], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return out.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """`with S3Server(tmp_path) as s3:` -> s3.endpoint, s3.access_key, s3.secret_key."""

    def __init__(self, workdir: pathlib.Path, *, access_key: str = "stoker-test", secret_key: str = "stoker-test-secret-0123") -> None:
        self.root = workdir / "s3-root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "versitygw.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        env = {**os.environ, "ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([versitygw_binary(), "--port", f"127.0.0.1:{self.port}", "posix",
                                          str(self.root)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.endpoint, timeout=1.0)
                return self
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"versitygw did not start: {self.log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
