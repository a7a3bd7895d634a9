"""`stoker top`, `stoker models`, `stoker cordon|uncordon|drain`: the fleet as users see it (I/O + pure rows)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kubernetes.client.exceptions import ApiException
from rich.console import Console
from rich.table import Table

from stoker.api.protocol import AGENT_LABEL
from stoker.client.context import EXIT_OK, EXIT_TIMEOUT, CliError, Cluster, explain
from stoker.units import format_bytes, format_usage


def _condition(obj: dict[str, Any], type_: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status"))
    return "Unknown"


def agent_rows(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per CacheAgent: readiness, GPU, VRAM, slots, downloads, hot models. Pure."""
    rows = []
    for ca in sorted(agents, key=lambda a: a["metadata"]["name"]):
        st = ca.get("status") or {}
        slots = int(st.get("slots") or 0)
        bound = len(st.get("running") or [])
        vram, disk = st.get("vram") or {}, st.get("disk") or {}
        downloads = st.get("downloads") or []
        hot = sorted(m["name"] for m in st.get("models") or [] if m.get("tier") == "vram")
        rows.append({
            "agent": ca["metadata"]["name"],
            "ready": _condition(ca, "Ready"),
            "cordoned": bool((ca.get("spec") or {}).get("cordon")),
            "gpu": (st.get("gpu") or {}).get("model") or "-",
            "vram": format_usage(int(vram.get("usedBytes") or 0), int(vram.get("budgetBytes") or 0)),
            "disk": format_usage(int(disk.get("usedBytes") or 0), int(disk.get("budgetBytes") or 0)),
            "busy": min(bound, slots), "slots": slots, "queued": max(0, bound - slots),
            "downloads": [{"model": d["name"], "percent": (round(100 * d.get("bytesDone", 0) / d["bytesTotal"])
                                                           if d.get("bytesTotal") else None)} for d in downloads],
            "hot": hot,
        })
    return rows


def model_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ModelCache: copies per tier against targets, demand, size. Pure."""
    rows = []
    for mc in sorted(models, key=lambda m: m["metadata"]["name"]):
        spec, st = mc.get("spec") or {}, mc.get("status") or {}
        copies = st.get("copies") or {}
        rows.append({
            "model": mc["metadata"]["name"], "kind": spec.get("kind", "checkpoint"), "ready": _condition(mc, "Ready"),
            "size": st.get("size") or format_bytes(st.get("sizeBytes")),
            "disk": int(copies.get("disk") or 0), "ram": int(copies.get("ram") or 0), "vram": int(copies.get("vram") or 0),
            "replicas": int(spec.get("replicas", 1)), "desired": int(st.get("desiredReplicas") or 0),
            "hotReplicas": int(spec.get("hotReplicas", 0)),
            "demand": float(st.get("demandJobsPerMinute") or 0.0),
            "failed": _condition(mc, "Failed") == "True",
        })
    return rows


def _list(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    try:
        return cluster.objects.list(kind)["items"]
    except ApiException as exc:
        raise explain(exc, f"{kind}s in {cluster.namespace}") from None


def top(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    agents = agent_rows(_list(cluster, "CacheAgent"))
    models = model_rows(_list(cluster, "ModelCache"))
    if args.output == "json":
        print(json.dumps({"agents": agents, "models": models}, indent=2))
        return EXIT_OK
    t = Table(title=f"Agents in {cluster.namespace}", title_justify="left")
    for col in ("AGENT", "READY", "GPU", "VRAM USED/BUDGET", "DISK USED/BUDGET", "SLOTS BUSY", "QUEUED",
                "DOWNLOADS", "HOT MODELS"):
        t.add_column(col, no_wrap=col not in ("HOT MODELS", "DOWNLOADS"))
    for r in agents:
        ready = r["ready"] + (" (cordoned)" if r["cordoned"] else "")
        dl = ", ".join(f"{d['model']} {d['percent']}%" if d["percent"] is not None else d["model"]
                       for d in r["downloads"]) or "-"
        t.add_row(r["agent"], ready, r["gpu"], r["vram"], r["disk"], f"{r['busy']}/{r['slots']}", str(r["queued"]),
                  dl, ", ".join(r["hot"]) or "-")
    out = Console()  # tables to stdout; `console` (stderr) is for progress and messages
    out.print(t)
    m = Table(title=f"Models in {cluster.namespace}", title_justify="left")
    for col in ("MODEL", "READY", "COPIES DISK/RAM/VRAM", "TARGET DISK/HOT", "DEMAND (JOBS/MIN)"):
        m.add_column(col, no_wrap=True)
    for r in models:
        m.add_row(r["model"], "Failed" if r["failed"] else r["ready"], f"{r['disk']}/{r['ram']}/{r['vram']}",
                  f"{r['desired'] or r['replicas']}/{r['hotReplicas']}", f"{r['demand']:.2f}")
    out.print(m)
    return EXIT_OK


def models(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    rows = model_rows(_list(cluster, "ModelCache"))
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "KIND", "READY", "SIZE", "ON DISK", "LOADED", "REPLICAS", "HOT", "DEMAND"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(r["model"], r["kind"], "Failed" if r["failed"] else r["ready"], r["size"], str(r["disk"]),
                  str(r["vram"]), f"{r['desired'] or r['replicas']}", str(r["hotReplicas"]), f"{r['demand']:.2f}")
    Console().print(t)
    return EXIT_OK


def set_cordon(cluster: Cluster, agent: str, cordon: bool) -> None:
    try:
        # spec.cordon is people's (spec.holds is the operator's): a merge patch touches only it.
        cluster.objects.patch("CacheAgent", agent, {"spec": {"cordon": cordon}})
    except ApiException as exc:
        raise explain(exc, f"CacheAgent {cluster.namespace}/{agent}") from None


def cordon(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    set_cordon(cluster, args.agent, True)
    print(f"cacheagent.stoker.dev/{args.agent} cordoned")
    return EXIT_OK


def uncordon(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    set_cordon(cluster, args.agent, False)
    print(f"cacheagent.stoker.dev/{args.agent} uncordoned")
    return EXIT_OK


def bound_jobs(cluster: Cluster, agent: str) -> list[str]:
    items = cluster.objects.list("GenerationJob", label_selector=f"{AGENT_LABEL}={agent}")["items"]
    return sorted(j["metadata"]["name"] for j in items
                  if (j.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))


def drain(cluster: Cluster, args: argparse.Namespace, console: Console) -> int:
    """Cordon, then wait until the jobs bound to the agent have finished (they are never cut short)."""
    set_cordon(cluster, args.agent, True)
    print(f"cacheagent.stoker.dev/{args.agent} cordoned")
    deadline = time.monotonic() + args.timeout
    with console.status("") as spinner:
        while True:
            left = bound_jobs(cluster, args.agent)
            if not left:
                print(f"cacheagent.stoker.dev/{args.agent} drained")
                return EXIT_OK
            if time.monotonic() >= deadline:
                raise CliError(f"{len(left)} job(s) still on {args.agent} after {args.timeout:.0f}s: "
                               f"{', '.join(left[:10])}", code=EXIT_TIMEOUT)
            spinner.update(f"waiting for {len(left)} job(s) on {args.agent}: {', '.join(left[:5])}")
            time.sleep(1.0)
