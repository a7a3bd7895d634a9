"""A real, local Kubernetes control plane: etcd + kube-apiserver on 127.0.0.1.

Used by the integration tests (as controller-runtime's envtest) and the local demo.
No kubelet, scheduler or controller-manager: objects are stored and served, RBAC is
enforced, and agents run as local processes. Binaries come from
hack/build-control-plane.sh, built once from the Go module proxy and cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
ADMIN_USER = "stoker-admin"
NOBODY_USER = "nobody"


@dataclasses.dataclass(frozen=True)
class ServingCert:
    """The API server's serving certificate and key, and the CA that clients trust."""

    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message carries the log tail."""


@dataclasses.dataclass(frozen=True)
class ControlPlane:
    """A running control plane and how to reach it."""

    workdir: pathlib.Path
    server: str
    ca_file: pathlib.Path
    tokens: dict[str, str]
    kubeconfig: pathlib.Path

    def kubeconfig_for(self, user: str) -> pathlib.Path:
        """A kubeconfig that authenticates as `user` (a key of `tokens`)."""
        path = self.workdir / f"kubeconfig-{user}"
        if not path.exists():
            path.write_text(_kubeconfig(self.server, self.ca_file, user, self.tokens[user]))
        return path


    def kubectl(self, *args: str, user: str = ADMIN_USER, check: bool = True,
                input_text: str | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane."""
        cmd = ["kubectl", "--kubeconfig", str(self.kubeconfig_for(user)), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, input=input_text, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc


def find_binaries() -> pathlib.Path:
    """The folder holding etcd and kube-apiserver, building them when needed."""
    if env := os.environ.get("STOKER_CONTROL_PLANE_BIN"):
        return pathlib.Path(env)
    if not BUILD_SCRIPT.exists():
        raise ControlPlaneError(
            "kube-apiserver and etcd are not available: set STOKER_CONTROL_PLANE_BIN to a folder "
            "holding both, or run from a source checkout where hack/build-control-plane.sh exists")
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; see its output above")
    return pathlib.Path(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kubeconfig(server: str, ca_file: pathlib.Path, user: str, token: str) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: stoker-local
  cluster: {{server: "{server}", certificate-authority: "{ca_file}"}}
users:
- name: {user}
  user: {{token: "{token}"}}
contexts:
- name: stoker-local
  context: {{cluster: stoker-local, user: {user}, namespace: default}}
current-context: stoker-local
"""


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(server: str, ca_file: pathlib.Path, token: str, *, timeout_s: float,
                procs: Sequence[tuple[str, subprocess.Popen[bytes], pathlib.Path]]) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        for name, proc, logfile in procs:
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with code {proc.returncode}; last log lines:\n{_tail(logfile)}")
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file.exists() else None
            if ctx is not None:
                req = urllib.request.Request(f"{server}/readyz", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    tails = "\n".join(f"--- {name} ---\n{_tail(logfile)}" for name, _, logfile in procs)
    raise ControlPlaneError(f"control plane not ready after {timeout_s:.0f}s ({last}); last log lines:\n{tails}")


def _spawn(cmd: list[str], logfile: pathlib.Path) -> subprocess.Popen[bytes]:
    with logfile.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def install_crds(cp: ControlPlane, crd_dir: pathlib.Path, *, timeout_s: float = 60) -> None:
    """Apply the CRDs and wait until each is Established."""
    cp.kubectl("apply", "--server-side", "-f", str(crd_dir))
    cp.kubectl("wait", "--for=condition=Established", "--timeout", f"{int(timeout_s)}s", "-f", str(crd_dir))


@contextlib.contextmanager
def run_control_plane(*, workdir: pathlib.Path | None = None, crd_dir: pathlib.Path | None = None,
                      users: Sequence[str] = (), startup_timeout_s: float = 90,
                      extra_apiserver_args: Sequence[str] = (),
                      user_groups: Mapping[str, str] | None = None, bind_address: str = "127.0.0.1",
                      service_cidr: str = "10.0.0.0/24", serving_cert: ServingCert | None = None,
                      pod_admission: bool = False) -> Iterator[ControlPlane]:
    """Start etcd and kube-apiserver, yield the ControlPlane, stop both on exit.

    `users` are extra identities without any permissions (RBAC is enforced);
    `nobody` always exists. The admin is in group system:masters. When either server
    fails to start, `ControlPlaneError` carries the tail of its log.

    For a cluster with nodes (stoker.testing.cluster): `user_groups` gives users their
    groups (comma-separated, e.g. system:nodes), `bind_address` must be reachable from
    pods, `serving_cert` replaces the self-signed certificate, and `pod_admission` keeps
    the ServiceAccount admission plugin (pods get their tokens) and adds the Node authorizer.
    """
    bin_dir = find_binaries()
    owned = workdir is None
    work = pathlib.Path(tempfile.mkdtemp(prefix="stoker-cp-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    certs = work / "certs"
    certs.mkdir(exist_ok=True)

    tokens = {ADMIN_USER: secrets.token_hex(16), NOBODY_USER: secrets.token_hex(16)}
    tokens.update({u: secrets.token_hex(16) for u in users})
    groups = {ADMIN_USER: "system:masters", **(user_groups or {})}
    tokens.update({u: secrets.token_hex(16) for u in groups if u not in tokens})
    token_file = work / "tokens.csv"
    token_file.write_text("".join(
        f'{tok},{user},{user},"{groups[user]}"\n' if user in groups else f"{tok},{user},{user}\n"
        for user, tok in tokens.items()))
    token_file.chmod(0o600)
    sa_key = certs / "sa.key"
    subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)

    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    etcd_log, api_log = work / "etcd.log", work / "kube-apiserver.log"
    procs: list[tuple[str, subprocess.Popen[bytes], pathlib.Path]] = []
    try:
        procs.append(("etcd", _spawn([
            str(bin_dir / "etcd"), "--data-dir", str(work / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], etcd_log), etcd_log))
        procs.append(("kube-apiserver", _spawn([
            str(bin_dir / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", bind_address, "--advertise-address", bind_address,
            "--secure-port", str(api_port), "--cert-dir", str(certs),
            *(("--tls-cert-file", str(serving_cert.cert), "--tls-private-key-file", str(serving_cert.key))
              if serving_cert else ()),
            "--token-auth-file", str(token_file),
            "--authorization-mode", "Node,RBAC" if pod_admission else "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(sa_key),
            "--service-account-signing-key-file", str(sa_key),
            "--service-cluster-ip-range", service_cidr,
            *(() if pod_admission else ("--disable-admission-plugins", "ServiceAccount")),
            "--max-requests-inflight", "1000", "--max-mutating-requests-inflight", "500",
            "--v", "1", *extra_apiserver_args,
        ], api_log), api_log))
        server = f"https://{bind_address}:{api_port}"
        ca_file = serving_cert.ca if serving_cert else certs / "apiserver.crt"
        _wait_ready(server, ca_file, tokens[ADMIN_USER], timeout_s=startup_timeout_s, procs=procs)
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(_kubeconfig(server, ca_file, ADMIN_USER, tokens[ADMIN_USER]))
        cp = ControlPlane(workdir=work, server=server, ca_file=ca_file, tokens=tokens, kubeconfig=kubeconfig)
        (work / f"kubeconfig-{ADMIN_USER}").write_text(kubeconfig.read_text())
        if crd_dir is not None:
            try:
                install_crds(cp, crd_dir)
            except ControlPlaneError as exc:
                raise ControlPlaneError(f"{exc}\nkube-apiserver log:\n{_tail(api_log)}") from exc
        log.info("control plane ready at %s (kubeconfig %s)", server, kubeconfig)
        yield cp
    finally:
        for _, proc, _ in reversed(procs):
            _stop(proc)
        if owned:
            shutil.rmtree(work, ignore_errors=True)
