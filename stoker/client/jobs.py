"""`stoker submit` and `stoker get image`: create a GenerationJob, follow it, bring the image back (I/O)."""

from __future__ import annotations

import argparse
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from stoker.api import API_VERSION, GROUP, VERSION
from stoker.api.generationjob import GenerationJobSpec
from stoker.client import results
from stoker.client.context import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, CliError, Cluster, explain

TERMINAL = ("Succeeded", "Failed")


def parse_lora(text: str) -> dict[str, Any]:
    """NAME or NAME:WEIGHT -> a LoRA reference."""
    name, _, weight = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME or NAME:WEIGHT")
    try:
        return {"name": name, "weight": float(weight)} if weight else {"name": name}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: the weight must be a number, like style:0.8") from None


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationJob the flags describe, validated with the API types before it is sent."""
    params: dict[str, Any] = {"prompt": args.prompt}
    for flag, key in (("negative_prompt", "negativePrompt"), ("steps", "steps"), ("cfg_scale", "cfgScale"),
                      ("width", "width"), ("height", "height"), ("seed", "seed"), ("sampler", "sampler"),
                      ("scheduler", "scheduler")):
        if getattr(args, flag) is not None:
            params[key] = getattr(args, flag)
    spec: dict[str, Any] = {"model": args.model, "params": params}
    if args.lora:
        spec["loras"] = args.lora
    if getattr(args, "output_url", None):
        spec["output"] = {"url": args.output_url}
    for flag, key in (("vae", "vae"), ("priority", "priority"), ("timeout", "timeoutSeconds"),
                      ("ttl", "ttlSecondsAfterFinished")):
        if getattr(args, flag) is not None:
            spec[key] = getattr(args, flag)
    try:
        GenerationJobSpec.model_validate(spec)
    except Exception as exc:  # pydantic's message names the field and the rule
        raise CliError(f"invalid job: {exc}", code=2) from None
    meta: dict[str, Any] = {"name": args.name} if args.name else {"generateName": f"{args.model[:40]}-"}
    return {"apiVersion": API_VERSION, "kind": "GenerationJob", "metadata": meta, "spec": spec}


def submit(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    body = build_job(args)
    try:
        job = cluster.objects.create("GenerationJob", body)
    except ApiException as exc:
        raise explain(exc, f"GenerationJob {body['metadata'].get('name') or 'for ' + args.model}") from None
    name = job["metadata"]["name"]
    if not args.wait:
        print(f"generationjob.stoker.dev/{name} created")
        return EXIT_OK
    console.print(f"generationjob.stoker.dev/[bold]{name}[/] created in {cluster.namespace}", highlight=False)
    final = follow(cluster, name, timeout_s=args.wait_timeout, console=console, quiet=args.quiet)
    if final is None:
        console.print(f"[yellow]still not finished after {args.wait_timeout:.0f}s[/]; `stoker get image {name}` "
                      "fetches the image once it is", highlight=False)
        return EXIT_TIMEOUT
    return finish(cluster, final, out=args.output, console=console)


def finish(cluster: Cluster, job: dict[str, Any], *, out: str | None, console: Console) -> int:
    """Report how `job` ended; fetch its image into `out` if it succeeded."""
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    if status.get("phase") != "Succeeded":
        console.print(f"[red]job {name} failed[/]: {status.get('reason', 'Failed')}: {status.get('message', '')}",
                      highlight=False)
        return EXIT_FAILED
    timings = status.get("timings") or {}
    console.print(f"job {name} succeeded on {status.get('agent') or '?'} (checkpoint from {status.get('cacheHit')}; "
                  f"{_timing_line(timings)})", highlight=False)
    if out:
        data = results.fetch_image(cluster, job)
        path = pathlib.Path(out)
        path.write_bytes(data)
        console.print(f"wrote {path} ({len(data)} bytes, sha256 {status['result']['sha256'][:12]}...)", highlight=False)
    return EXIT_OK


def _timing_line(timings: dict[str, Any]) -> str:
    parts = [(k, timings.get(f"{k}Seconds")) for k in ("queued", "download", "load", "inference", "upload", "total")]
    return ", ".join(f"{k} {v:.1f}s" for k, v in parts if isinstance(v, (int, float)))


def describe(status: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(what the job is doing, done, total) for the progress bar, from its status. Pure."""
    phase = status.get("phase") or "Pending"
    if phase in TERMINAL:
        return phase, 1.0, 1.0
    progress = status.get("progress") or {}
    stage = status.get("stage")
    if phase == "Pending":
        reason = status.get("reason")
        return (f"Pending: {reason}" if reason else "Pending: waiting for an agent"), None, None
    if stage == "Downloading" and progress.get("downloadBytes"):
        return "Downloading", float(progress.get("downloadedBytes") or 0), float(progress["downloadBytes"])
    if stage == "Generating" and progress.get("steps"):
        return f"Generating step {progress.get('step', 0)}/{progress['steps']}", float(progress.get("step") or 0), \
            float(progress["steps"])
    return stage or phase, None, None


def _events(cluster: Cluster, name: str, timeout_s: float, stop: threading.Event) -> Iterator[dict[str, Any]]:
    """The job as it changes: a watch on it alone, re-established until `timeout_s` or `stop`."""
    deadline = time.monotonic() + timeout_s
    custom = cluster.objects.custom
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        w = watch.Watch()
        try:
            for event in w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace,
                                  "generationjobs", field_selector=f"metadata.name={name}",
                                  timeout_seconds=max(1, int(min(left, 60)))):
                if event["type"] == "DELETED":
                    raise CliError(f"job {cluster.namespace}/{name} was deleted")
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield event["object"]
        except ApiException as exc:
            if exc.status != 410:
                raise explain(exc, f"watching GenerationJob {name}") from None


def follow(cluster: Cluster, name: str, *, timeout_s: float, console: Console, quiet: bool = False,
           events: Callable[..., Iterator[dict[str, Any]]] = _events) -> dict[str, Any] | None:
    """Show a progress bar until the job finishes; the finished job, or None on timeout."""
    stop = threading.Event()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=quiet) as bar:
        task = bar.add_task("Pending", total=None)
        last_stage = None
        try:
            for job in events(cluster, name, timeout_s, stop):
                status = job.get("status") or {}
                what, done, total = describe(status)
                stage = (status.get("phase"), status.get("stage"))
                if stage != last_stage and not quiet:
                    bar.reset(task, total=total, completed=done or 0, description=what)
                    last_stage = stage
                else:
                    bar.update(task, total=total, completed=done or 0, description=what)
                if status.get("phase") in TERMINAL:
                    return job
        finally:
            stop.set()
    return None


def get_image(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    try:
        job = cluster.objects.get("GenerationJob", args.job)
    except ApiException as exc:
        raise explain(exc, f"GenerationJob {cluster.namespace}/{args.job}") from None
    data = results.fetch_image(cluster, job)
    out = pathlib.Path(args.output or f"{args.job}.png")
    out.write_bytes(data)
    console.print(f"wrote {out} ({len(data)} bytes)", highlight=False)
    return EXIT_OK

