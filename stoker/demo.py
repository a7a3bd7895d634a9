"""`stoker demo`: the main job, locally, on real parts.

Starts etcd + kube-apiserver on 127.0.0.1, installs the CRDs, serves a small generated
Stable Diffusion 1.5-architecture checkpoint (random weights) and a LoRA over HTTP,
starts the operator and N agent processes, submits GenerationJobs, waits for them and
prints where each ran, which cache tier it hit and where the time went. The PNGs land
in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import pathlib
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from typing import Any

from kubernetes import client

from stoker import crdgen, kube
from stoker.testing import controlplane, tiny_models
from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import Process, wait_for

log = logging.getLogger(__name__)
NAMESPACE = "stoker-demo"
BIN = pathlib.Path(sys.executable).parent
PROMPTS = ["a lighthouse on a cliff at dawn", "a red fox in the snow", "a city of glass at night",
           "an astronaut riding a horse", "a bowl of ramen, studio light", "a forest of paper lanterns"]


def _model_cache(name: str, kind: str, url: str, data: pathlib.Path, replicas: int) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
            "spec": {"kind": kind, "replicas": replicas, "source": {
                "url": url, "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "sizeBytes": data.stat().st_size}}}


def _job(i: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "tiny-sd15", "params": {
        "prompt": PROMPTS[i % len(PROMPTS)], "steps": 8, "width": 128, "height": 128, "seed": 1000 + i,
        "sampler": "euler_a"}}
    if i % 2:
        spec["loras"] = [{"name": "tiny-style", "weight": 0.8}]
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob", "metadata": {"name": f"demo-{i}"}, "spec": spec}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """Samples of one /metrics endpoint, by name with labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _metrics_summary(ports: dict[str, int]) -> str:
    """A few fleet figures as the operator's and agents' /metrics report them."""
    op = _scrape(ports["operator"])
    agents = [_scrape(port) for name, port in ports.items() if name != "operator"]
    tiers = {k.split('"')[1]: v for k, v in op.items() if k.startswith("stoker_bindings_total{")}
    downloaded = sum(a.get("stoker_agent_downloaded_bytes_total", 0.0) for a in agents)
    hits = sum(v for a in agents for k, v in a.items() if k.startswith("stoker_agent_cache_hits_total{"))
    misses = sum(v for a in agents for k, v in a.items() if k.startswith("stoker_agent_cache_misses_total{"))
    bound = ", ".join(f"{tier} {int(n)}" for tier, n in sorted(tiers.items()) if n) or "none"
    return (f"metrics: jobs bound, by their checkpoint's tier at binding: {bound}; "
            f"downloaded {downloaded / 2**20:.1f} MiB; cache hits {int(hits)}, misses {int(misses)}")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.log"), *out.glob(f"{NAMESPACE}__*.png")]:  # this run's logs and images only
        stale.unlink()
    work = pathlib.Path(tempfile.mkdtemp(prefix="stoker-demo-"))
    crd_dir = work / "crds"
    crd_dir.mkdir()
    for name, text in crdgen.render_crds().items():
        (crd_dir / name).write_text(text)
    print("building a small SD 1.5-architecture checkpoint and a LoRA (random weights)...", flush=True)
    ckpt = tiny_models.write_tiny_sd15(work / "tiny-sd15.safetensors", seed=0)
    lora = tiny_models.write_tiny_lora(work / "tiny-style.safetensors", seed=1)
    procs: list[Process] = []
    try:
        with contextlib.ExitStack() as stack:
            cp = stack.enter_context(controlplane.run_control_plane(workdir=work / "control-plane", crd_dir=crd_dir))
            models = stack.enter_context(
                ModelServer({"tiny-sd15.safetensors": ckpt, "tiny-style.safetensors": lora}))
            # The processes stop before the control plane and the model server go (so they end quietly).
            stack.callback(lambda: [proc.stop() for proc in reversed(procs)])
            print(f"control plane up at {cp.server}; kubeconfig {cp.kubeconfig}", flush=True)
            api = kube.api_client(str(cp.kubeconfig))
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
            objects = kube.Objects(api, NAMESPACE)
            objects.create("ModelCache", _model_cache("tiny-sd15", "checkpoint", models.url("tiny-sd15.safetensors"), ckpt, 1))
            objects.create("ModelCache", _model_cache("tiny-style", "lora", models.url("tiny-style.safetensors"), lora, 0))

            ports = {name: _free_port() for name in ("operator", *(f"agent-{i}" for i in range(args.agents)))}
            procs.append(Process([str(BIN / "stoker-operator"), "--kubeconfig", str(cp.kubeconfig), "--namespace",
                                  NAMESPACE, "--metrics-port", str(ports["operator"]), "--lease-grace-s", "10"],
                                 out / "operator.log").start())
            for i in range(args.agents):
                name = f"agent-{i}"
                # No kubelet runs here: the Pod object stands for the agent's pod (owner of its CacheAgent).
                core.create_namespaced_pod(NAMESPACE, client.V1Pod(
                    metadata=client.V1ObjectMeta(name=name),
                    spec=client.V1PodSpec(node_name=f"node-{i}", containers=[client.V1Container(name="agent", image="stoker")])))
                procs.append(Process([
                    str(BIN / "stoker-agent"), "--kubeconfig", str(cp.kubeconfig), "--namespace", NAMESPACE,
                    "--pod-name", name, "--node-name", f"node-{i}", "--zone", f"zone-{i % 2}",
                    "--cache-dir", str(work / name / "cache"), "--results-dir", str(out), "--allow-http",
                    "--metrics-port", str(ports[name]), "--device", "cpu", "--vram-budget-bytes", "1GiB",
                    "--torch-threads", "1",
                ], out / f"{name}.log").start())
            print(f"started the operator and {args.agents} agents; waiting for them to report...", flush=True)
            print("metrics: " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in ports.items()),
                  flush=True)
            wait_for(lambda: sum(1 for ca in objects.list("CacheAgent")["items"] if ca.get("status", {}).get("slots"))
                     == args.agents, timeout_s=180, message="agents to register")
            t0 = time.monotonic()
            for i in range(args.jobs):
                objects.create("GenerationJob", _job(i))
            print(f"submitted {args.jobs} GenerationJobs", flush=True)

            def done() -> list[dict[str, Any]] | None:
                jobs = objects.list("GenerationJob")["items"]
                return jobs if all(j.get("status", {}).get("phase") in ("Succeeded", "Failed") for j in jobs) else None

            jobs = wait_for(done, timeout_s=600, interval_s=0.5, message="jobs to finish")
            elapsed = time.monotonic() - t0
            timing_keys = ("queuedSeconds", "downloadSeconds", "slotWaitSeconds", "loadSeconds", "buildSeconds",
                           "inferenceSeconds", "totalSeconds")
            rows = [["JOB", "PHASE", "AGENT", "HIT", "QUEUED s", "DOWNLOAD s", "WAIT s", "LOAD s", "BUILD s", "INFER s",
                     "TOTAL s", "IMAGE"]]
            failed = 0
            for j in sorted(jobs, key=lambda j: int(j["metadata"]["name"].split("-")[1])):
                s = j["status"]
                t = s.get("timings", {})
                failed += s["phase"] != "Succeeded"
                rows.append([j["metadata"]["name"], s["phase"], s.get("agent") or "-", s.get("cacheHit") or "-",
                             *(f"{t[k]:.2f}" if k in t else "-" for k in timing_keys),
                             s.get("result", {}).get("location") or s.get("reason", "-")])
            print()
            print(_table(rows))
            print(f"\n{len(jobs) - failed} of {len(jobs)} jobs succeeded in {elapsed:.1f}s; images and logs in {out}")
            print(_metrics_summary(ports))
            if args.keep:
                print(f"control plane kept running: KUBECONFIG={cp.kubeconfig} kubectl -n {NAMESPACE} get stoker; Ctrl-C to stop")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return 1 if failed else 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
