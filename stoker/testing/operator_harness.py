"""Run the operator and fake agents as processes against a local control plane (tests, benchmarks)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kubernetes import client

from stoker import kube

T = TypeVar("T")

BIN = pathlib.Path(sys.executable).parent


class WaitTimeout(AssertionError):
    """A condition polled with a deadline never held."""


def wait_for(predicate: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.1,
             message: str | Callable[[], str] = "condition") -> T:
    """Poll `predicate` until it returns something truthy; raise WaitTimeout after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - objects may not exist yet
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {text}"
                              + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval_s)


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """A child process with its output in a log file."""

    def __init__(self, cmd: Sequence[str], log_path: pathlib.Path) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.log_path.name} ---\n{_tail(self.log_path, lines)}"


def operator_process(kubeconfig: pathlib.Path, namespace: str, log_path: pathlib.Path, *,
                     identity: str = "operator", lease_grace_s: float = 3.0, leader_lease_s: float = 4.0,
                     extra: Sequence[str] = ()) -> Process:
    return Process([str(BIN / "stoker-operator"), "--kubeconfig", str(kubeconfig), "--namespace", namespace,
                    "--metrics-port", "0", "--lease-grace-s", str(lease_grace_s), "--identity", identity,
                    "--leader-lease-duration-s", str(leader_lease_s), *extra], log_path)


def fake_agent_process(kubeconfig: pathlib.Path, namespace: str, name: str, log_path: pathlib.Path,
                       *args: str) -> Process:
    return Process([sys.executable, "-P", "-m", "stoker.testing.fake_agent", "--kubeconfig", str(kubeconfig),
                    "--namespace", namespace, "--name", name, *args], log_path)


def real_agent_process(kubeconfig: pathlib.Path, objects: kube.Objects, name: str, work: pathlib.Path,
                       *extra: str) -> Process:
    """A real `stoker-agent` on the CPU, with short Lease and status intervals, and the Pod
    object that stands for its pod (there is no kubelet: the Pod owns its CacheAgent)."""
    objects.core.create_namespaced_pod(objects.namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(node_name=f"node-{name}", containers=[client.V1Container(name="agent", image="stoker")])))
    return Process([
        str(BIN / "stoker-agent"), "--kubeconfig", str(kubeconfig), "--namespace", objects.namespace,
        "--pod-name", name, "--node-name", f"node-{name}", "--cache-dir", str(work / name / "cache"),
        "--results-dir", str(work / "results"), "--allow-http", "--metrics-port", "0", "--device", "cpu",
        "--vram-budget-bytes", "1GiB", "--lease-duration-s", "6", "--lease-renew-interval-s", "1",
        "--status-min-interval-s", "0.2", "--torch-threads", "1", "--results-serve", "--results-port", "0",
        "--metrics-addr", "127.0.0.1", *extra,
    ], work / f"{name}.log")
