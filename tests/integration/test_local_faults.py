"""A full disk is the agent's fault, never the model's: with real agents and a real full volume.

Agent A's cache directory is a small tmpfs (mounted by the test; we are root), much
smaller than the tiny SD 1.5 checkpoint, while its disk budget says there is room. The
job starts on A (B is cordoned until then): the download hits ENOSPC. The job moves to B
without using one of its attempts (it allows only one), A reports itself degraded with
DiskFull, and the ModelCache is not marked Failed. Once the volume grows, A clears the
fault and downloads again.
"""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from stoker import kube
from stoker.testing import tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import (agent_registered, checkpoint_model_cache,
                                            operator_process, real_agent_process, wait_for)


@pytest.fixture
def objects(api_client: client.ApiClient, namespace: str) -> kube.Objects:
    return kube.Objects(api_client, namespace)


@pytest.fixture
def full_volume(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    cache = tmp_path / "agent-a" / "cache"
    cache.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def job(name: str, *, steps: int = 2) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"model": "tiny-sd15", "maxAttempts": 1, "params": {
                "prompt": "a lighthouse", "steps": steps, "width": 64, "height": 64, "seed": 3}}}


def test_a_full_disk_moves_the_job_degrades_the_agent_and_never_fails_the_model(
        control_plane, objects, namespace, tmp_path, full_volume) -> None:
    checkpoint = tiny_models.write_tiny_sd15(tmp_path / "tiny-sd15.safetensors", seed=11)
    with ModelServer({"tiny-sd15.safetensors": checkpoint}) as server:
        objects.create("ModelCache", checkpoint_model_cache(server, checkpoint))
        op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log", lease_grace_s=3.0).start()
        a = real_agent_process(control_plane.kubeconfig, objects, "agent-a", tmp_path).start()
        b = real_agent_process(control_plane.kubeconfig, objects, "agent-b", tmp_path).start()

        def status(name: str) -> dict[str, Any]:
            return objects.get("GenerationJob", name).get("status") or {}

        def agent_status(name: str) -> dict[str, Any]:
            return objects.get("CacheAgent", name).get("status") or {}

        try:
            for name, proc in (("agent-a", a), ("agent-b", b)):
                wait_for(lambda name=name: agent_registered(objects, name), timeout_s=180,
                         message=lambda proc=proc: f"the agent to register\n{proc.tail()}")
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": True}})  # the job must start on A
            objects.create("GenerationJob", job("first"))
            wait_for(lambda: any(h.get("reason") == "DiskFull" for h in status("first").get("history", [])),
                     timeout_s=120, message=lambda: f"the download on agent-a to hit the full disk: {status('first')}\n"
                                                    f"{a.tail()}")
            degraded = wait_for(lambda: agent_status("agent-a").get("degraded") and agent_status("agent-a"),
                                timeout_s=30, message=lambda: f"agent-a to report itself degraded: {agent_status('agent-a')}")
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": False}})
            def finished(name: str) -> dict[str, Any] | None:
                """The job once it finished and the operator recorded its last attempt in the history."""
                st = status(name)
                history = st.get("history") or [{}]
                done = st.get("phase") in ("Succeeded", "Failed") and history[-1].get("attempt") == st.get("attempt")
                return st if done else None

            done = wait_for(lambda: finished("first"),
                            timeout_s=240, interval_s=0.5,
                            message=lambda: f"the job to finish on agent-b: {status('first')}\n{b.tail()}\n{op.tail()}")
            model = objects.get("ModelCache", "tiny-sd15")

            # The volume grows: agent-a sees it work again and takes downloads again.
            subprocess.run(["mount", "-o", "remount,size=64m", str(full_volume)], check=True)
            wait_for(lambda: not agent_status("agent-a").get("degraded"), timeout_s=60,
                     message=lambda: f"agent-a to clear its fault: {agent_status('agent-a')}")
            objects.patch("CacheAgent", "agent-b", {"spec": {"cordon": True}})
            objects.create("GenerationJob", job("second"))
            second = wait_for(lambda: status("second").get("phase") in ("Succeeded", "Failed") and status("second"),
                              timeout_s=240, interval_s=0.5,
                              message=lambda: f"the second job to finish on agent-a: {status('second')}\n{a.tail()}")
        finally:
            a.stop()
            b.stop()
            op.stop()

    assert done["phase"] == "Succeeded" and done["agent"] == "agent-b", done
    # While agent-b is cordoned, agent-a is the only agent: the job may go back to it once more before its
    # degraded report lands. Every such attempt is a fault of agent-a (none of the job's attempts used).
    *faulted, last = [(h["agent"], h["outcome"], h["reason"]) for h in done["history"]]
    assert faulted and set(faulted) == {("agent-a", "Failed", "DiskFull")}, done["history"]
    assert last == ("agent-b", "Succeeded", ""), done["history"]
    assert not done.get("reason"), "a Succeeded job carries no failure reason"
    (fault,) = degraded["localFaults"]
    assert fault["reason"] == "DiskFull" and "No space left" in fault["message"]
    assert degraded["modelFailures"] == [], "a full disk is never reported as a failure of the model"
    failed = [c for c in (model.get("status") or {}).get("conditions", []) if c["type"] == "Failed"]
    assert all(c["status"] != "True" for c in failed), f"the ModelCache was marked Failed: {failed}"
    assert second["phase"] == "Succeeded" and second["agent"] == "agent-a", second
