"""The chart's ComfyUI configuration: the example values render a pod where ComfyUI has the GPU
and sees the agent's cache and model folder at the agent's paths."""

from __future__ import annotations

import pathlib
import subprocess

import pytest
import yaml

from stoker.testing.comfyui_stub import ComfyUIStub

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
EXAMPLE = REPO / "examples" / "comfyui" / "values.yaml"


def render(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", "stoker", str(CHART), *args], capture_output=True, text=True)


def agent_pod(helm: str, *args: str) -> dict:
    proc = render(helm, *args)
    assert proc.returncode == 0, proc.stderr
    deployment = next(d for d in yaml.safe_load_all(proc.stdout)
                      if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "stoker-agent")
    return deployment["spec"]["template"]["spec"]


def test_the_comfyui_example_lints_cleanly(helm: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(EXAMPLE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_with_the_comfyui_sidecar_comfyui_gets_the_gpu_and_the_agents_paths(helm: str) -> None:
    pod = agent_pod(helm, "-f", str(EXAMPLE))
    containers = {c["name"]: c for c in pod["containers"]}
    agent, comfy = containers["agent"], containers["comfyui"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert (env["STOKER_RUNNER"], env["STOKER_DEVICE"], env["STOKER_COMFYUI_LINK"]) == ("comfyui", "cpu", "symlink")
    assert env["STOKER_COMFYUI_MODELS_DIR"] == "/comfyui/models" and env["STOKER_QUEUE_SLOTS"] == "1"
    assert "nvidia.com/gpu" not in agent["resources"]["limits"]
    assert comfy["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {c: {m["mountPath"]: m for m in containers[c]["volumeMounts"]} for c in containers}
    for path in ("/var/cache/stoker", "/comfyui/models"):
        assert mounts["agent"][path]["name"] == mounts["comfyui"][path]["name"]  # the same volume, the same path
        assert mounts["comfyui"][path]["readOnly"] is True
    assert "/comfyui/output" in mounts["comfyui"]


def test_the_comfyui_gpu_is_reported_by_the_cpu_agent_from_the_values(helm: str) -> None:
    pod = agent_pod(helm, "-f", str(EXAMPLE), "--set", "agent.runner.comfyui.vramBytes=80Gi",
                    "--set", "agent.runner.comfyui.gpuModel=NVIDIA H100 80GB HBM3")
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert (env["STOKER_GPU_MODEL"], env["STOKER_GPU_VRAM_BYTES"]) == ("NVIDIA H100 80GB HBM3", "80Gi")
    unset = agent_pod(helm, "--set", "agent.runner.kind=comfyui")  # no GPU named: none reported, 0 = unknown
    env = {e["name"]: e.get("value") for e in unset["containers"][0]["env"]}
    assert "STOKER_GPU_VRAM_BYTES" not in env and "STOKER_GPU_MODEL" not in env


def test_the_default_runner_keeps_the_gpu_on_the_agent_and_reports_queue_slots(helm: str) -> None:
    pod = agent_pod(helm)
    (agent,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert (env["STOKER_RUNNER"], env["STOKER_JOB_SLOTS"], env["STOKER_QUEUE_SLOTS"]) == ("diffusers", "1", "1")
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_a_sidecar_without_an_image_is_refused_with_a_message(helm: str) -> None:
    proc = render(helm, "--set", "agent.runner.kind=comfyui", "--set", "agent.runner.comfyui.sidecar.enabled=true")
    assert proc.returncode != 0
    assert "agent.runner.comfyui.sidecar.image" in proc.stderr


def test_the_example_sidecar_turns_ready_on_its_loopback_address(helm: str, tmp_path: pathlib.Path) -> None:
    """The readiness probe the chart renders for the example succeeds against a server on 127.0.0.1
    (where the example's ComfyUI listens) and fails when nothing answers there."""
    with ComfyUIStub(tmp_path) as stub:
        pod = agent_pod(helm, "-f", str(EXAMPLE), "--set", f"agent.runner.comfyui.url={stub.url}")
        comfy = next(c for c in pod["containers"] if c["name"] == "comfyui")
        assert comfy["args"][:2] == ["--listen", "127.0.0.1"]
        command = comfy["readinessProbe"]["exec"]["command"]
        ready = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert ready.returncode == 0, ready.stderr
    not_ready = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert not_ready.returncode != 0
