"""`stoker sim`: run the fleet simulation and the scheduling-time scaling benchmark.

Prints one table per run (whole run, and a measurement window that skips the
cold start), writes PNG plots into `--out` and, unless `--no-record`, the "fleet"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from stoker.sim import bounds as bounds_mod
from stoker.sim import engine, report, workload
from stoker.sim.adapter import AgentView, ArtifactInfo, JobView, PlacementSettings, plan_placement
from stoker.sim.policies import POLICIES, make_policy

__all__ = ["build", "main", "parse_args", "run_fleet", "run_scaling"]

GB = 10**9
REFERENCE = "least-conn+LRU"
WORKLOADS: dict[str, dict[str, object]] = {
    "default": dict(models=1000, loras=2000, zipf=1.0, agents=20, disk_gb=50.0, ram_gb=32.0, vram_gb=24.0,
                    families=None),
    # Thousands of checkpoints, a quarter of them 12-24 GB, a flatter popularity (a community model
    # hub rather than one product's few base models), on GPUs that hold a 24 GB checkpoint.
    "flat": dict(models=4000, loras=4000, zipf=0.8, agents=40, disk_gb=50.0, ram_gb=64.0, vram_gb=48.0,
                 families=workload.FLAT_FAMILIES),
}
_FAMILY_NAMES = {workload.Family.SD15: "SD 1.5", workload.Family.SDXL: "SDXL", workload.Family.SD3: "SD3",
                 workload.Family.FLUX: "FLUX"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stoker sim", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Replaying your own workload: --catalog FILE --trace FILE\n\n"
        + workload.CATALOG_HELP + "\n\n" + workload.TRACE_HELP
        + "\n\nWith --catalog alone, a synthetic Zipf trace is drawn over your checkpoints (file order is not "
        "popularity order: the ranking is shuffled by --seed).",
    )
    p.add_argument("--duration-s", type=float, default=7200.0, help="simulated submit window (default 2 h)")
    p.add_argument("--warmup-s", type=float, default=1800.0, help="jobs submitted earlier are left out of the window table")
    p.add_argument("--load", type=float, default=0.7, help="inference work offered / GPU capacity (default 0.7)")
    p.add_argument(
        "--workload", choices=sorted(WORKLOADS), default="default",
        help="synthetic workload and fleet: default (1,000 SD 1.5/SDXL checkpoints, 20 agents with 24 GB GPUs) or "
        "flat (4,000 checkpoints up to 24 GB, SD3 and FLUX among them, flatter popularity, 40 agents with 48 GB GPUs); "
        "the options below override its values",
    )
    p.add_argument("--models", type=int, default=None, help="checkpoints in the synthetic catalog")
    p.add_argument("--loras", type=int, default=None)
    p.add_argument("--zipf", type=float, default=None, help="popularity exponent")
    p.add_argument("--agents", type=int, default=None)
    p.add_argument("--disk-gb", type=float, default=None)
    p.add_argument("--ram-gb", type=float, default=None)
    p.add_argument("--vram-gb", type=float, default=None)
    p.add_argument("--download-mbps", type=float, default=400.0, help="MB/s per agent")
    p.add_argument(
        "--slots", type=int, default=3,
        help="jobs an agent accepts at once under late binding (one on the GPU, the rest staging)",
    )
    p.add_argument(
        "--max-hot-wait-s", type=float, default=None,
        help="override PlacementSettings.max_hot_wait_age_s for the Stoker policies (default: the operator's)",
    )
    p.add_argument(
        "--download-weight", type=float, default=None,
        help="override PlacementSettings.download_weight for the Stoker policies (default: the operator's)",
    )
    p.add_argument(
        "--peer-weight", type=float, default=None,
        help="override PlacementSettings.peer_weight for the Stoker policies (default: the operator's)",
    )
    p.add_argument("--peer-mbps", type=float, default=1250.0, help="MB/s an agent fetches from another (default 10 Gbit/s)")
    p.add_argument("--peer-upload-mbps", type=float, default=1000.0,
                   help="MB/s an agent serves to others, all transfers together (its upload cap)")
    p.add_argument("--peer-upload-slots", type=int, default=2, help="transfers an agent serves at once")
    p.add_argument("--interruptions", type=float, default=1.0, help="per agent-hour")
    p.add_argument("--baked", type=int, default=1, help="most popular checkpoints baked into the image")
    p.add_argument("--no-burst", action="store_true", help="no burst (by default a rank-300 model takes 30%% of traffic for 10 min mid-run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {','.join(POLICIES)}")
    p.add_argument("--catalog", type=pathlib.Path,
                   help="your own model list (CSV: name,kind,size[,family,inference_s]; see below) instead of the synthetic one")
    p.add_argument("--trace", type=pathlib.Path,
                   help="replay a CSV request log (time_s,model,loras; see below) over --catalog, or the synthetic catalog")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/plots"))
    p.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--section", default=None,
                   help="BENCHMARKS.md section to write (default: fleet, or fleet-<workload>; a replay of "
                   "--catalog/--trace writes none unless named here)")
    p.add_argument("--scaling", action="store_true", help="only measure decision time as agents and pending jobs grow")
    p.add_argument("--scaling-budget-s", type=float, default=120.0, help="stop the scaling grid after this long")
    p.add_argument("--no-explain", action="store_true",
                   help="skip the extra run of `stoker` without interruptions that explains the byte figures")
    return p


def build(args: argparse.Namespace) -> tuple[workload.Trace, engine.FleetConfig]:
    bursts = () if args.no_burst else (workload.Burst(start_s=args.duration_s * 0.6, duration_s=600.0, rank=300, share=0.3),)
    config = workload.WorkloadConfig(
        n_models=args.models, n_loras=args.loras, zipf_exponent=args.zipf, duration_s=args.duration_s,
        bursts=bursts, seed=args.seed, families=WORKLOADS[args.workload]["families"],  # type: ignore[arg-type]
    )
    if args.catalog:
        catalog = workload.read_catalog_csv(_read_lines(args.catalog, "catalog"), source=str(args.catalog))
    else:
        catalog = workload.build_catalog(config)
    if args.trace:
        trace = workload.read_trace_csv(_read_lines(args.trace, "trace"), catalog=catalog, source=str(args.trace))
    else:
        defaults = engine.FleetConfig()
        rate = workload.arrival_rate_for_load(
            config, catalog, load=args.load, gpus=args.agents, inference_s=dict(defaults.inference_s),
            lora_apply_s=defaults.lora_apply_s,
        )
        trace = workload.generate_trace(dataclasses.replace(config, rate_per_s=rate), catalog)
    # Bake the most requested checkpoints of the first minutes into the image, as an
    # operator would bake the base model everyone uses.
    counts: dict[str, int] = {}
    for job in trace.jobs[: max(1, len(trace.jobs) // 20)]:
        counts[job.model] = counts.get(job.model, 0) + 1
    baked = tuple(k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: args.baked])
    fleet = engine.FleetConfig(
        n_agents=args.agents,
        disk_bytes=int(args.disk_gb * GB),
        ram_bytes=int(args.ram_gb * GB),
        vram_bytes=int(args.vram_gb * GB),
        download_bytes_per_s=args.download_mbps * 1e6,
        peer_bytes_per_s=args.peer_mbps * 1e6,
        peer_upload_bytes_per_s=args.peer_upload_mbps * 1e6,
        peer_upload_slots=args.peer_upload_slots,
        slots=args.slots,
        prefetch_depth=max(2, args.slots),
        interruptions_per_agent_hour=args.interruptions,
        baked=baked,
        seed=args.seed,
    )
    return trace, fleet


def _offered_load(trace: workload.Trace, fleet: engine.FleetConfig) -> float:
    """Generation seconds the trace asks for / GPU seconds of the fleet over the trace."""
    cat = trace.catalog
    work_s = sum(
        (cat[j.model].inference_s or fleet.inference_s[cat[j.model].family]) + fleet.lora_apply_s * len(j.loras)
        for j in trace.jobs
    )
    return work_s / max(1e-9, fleet.n_agents * max(1.0, trace.duration_s))


def _read_lines(path: pathlib.Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise workload.WorkloadError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise workload.WorkloadError(f"the {what} file {path} is not UTF-8 text; save it as a CSV in UTF-8") from None


def argv_text(args: argparse.Namespace) -> list[str]:
    """The options that differ from the defaults, to print the command that reproduces a run."""
    defaults = vars(parse_args(["--workload", args.workload]))
    out: list[str] = ["--workload", args.workload] if args.workload != "default" else []
    for key, value in vars(args).items():
        if value != defaults.get(key) and key not in {"out"}:
            flag = "--" + key.replace("_", "-")
            out += [flag] if value is True else [flag, str(value)]
    return out


def _verdict(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    if ok:
        return "met"
    return f"missed by {target / value:.2f}x" if at_least else f"missed by {value / target:.2f}x"


PEER_TARGETS = {"default": 10.0, "flat": 5.0}
"""Fewer source bytes than least-connection + LRU asked of the peer tier, per synthetic workload."""


def peer_target_lines(summaries: Sequence[report.Summary], bnds: bounds_mod.Bounds, *, target: float | None) -> list[str]:
    """The peer tier against its targets: source bytes against least-connection + LRU (and what
    the pooled-cache optimum allows at most), p95 submit->start against today's `stoker`, jobs lost."""
    ref = next((s for s in summaries if s.policy == REFERENCE), None)
    peers = next((s for s in summaries if s.policy == "stoker+peers"), None)
    if ref is None or peers is None:
        return []
    base = next((s for s in summaries if s.policy == "stoker"), None)
    fewer = ref.bytes_downloaded / max(1, peers.bytes_downloaded)
    ceiling = ref.bytes_downloaded / max(1, bnds.pooled_bytes)
    text = (f"- `stoker+peers`: {fewer:.2f}x fewer bytes from sources than `{REFERENCE}`"
            + (f" (>= {target:g}x: {_verdict(fewer, target, at_least=True)})" if target is not None else "")
            + f"; no policy can do better than {ceiling:.2f}x here: one pooled cache of the whole fleet's disk "
            f"with optimal replacement (it knows every future request) still downloads "
            f"{bnds.pooled_bytes / 1e12:.2f} TB"
            + (f", so {target:g}x is out of reach on this workload" if target is not None and ceiling < target else "")
            + f". {peers.bytes_from_peers / 1e12:.2f} TB came from peers.")
    if base is not None:
        text += (f" p95 submit->start {peers.start_p95_s:.1f} s against {base.start_p95_s:.1f} s for `stoker` "
                 f"(no worse: {'met' if peers.start_p95_s <= base.start_p95_s else f'missed by {peers.start_p95_s / max(1e-9, base.start_p95_s):.2f}x'}); "
                 f"{base.bytes_downloaded / max(1, peers.bytes_downloaded):.2f}x fewer source bytes than `stoker`.")
    text += f" {peers.jobs_lost} jobs lost (0: {'met' if peers.jobs_lost == 0 else 'missed'})."
    return [text]


def targets_lines(summaries: Sequence[report.Summary], bnds: bounds_mod.Bounds) -> list[str]:
    """Issue targets against least-connection + LRU, for each Stoker variant (whole run)."""
    ref = next((s for s in summaries if s.policy == REFERENCE), None)
    if ref is None:
        return []
    lines = ["Against the targets (whole run; target in brackets):", ""]
    for s in summaries:
        if not s.policy.startswith("stoker") or s.policy == "stoker+peers":
            continue
        fewer = ref.bytes_downloaded / max(1, s.bytes_downloaded)
        p95 = ref.start_p95_s / max(1e-9, s.start_p95_s)
        pooled = s.bytes_downloaded / max(1, bnds.pooled_bytes)
        lossy = f"; {s.bytes_downloaded / bnds.pooled_lossy_bytes:.2f}x the pooled optimum that loses each interrupted agent's share" if bnds.pooled_lossy_bytes else ""
        lines.append(
            f"- `{s.policy}`: {fewer:.2f}x fewer bytes (>= 3x: {_verdict(fewer, 3.0, at_least=True)}; 3x means "
            f"<= {ref.bytes_downloaded / 3e12:.2f} TB), "
            f"{p95:.1f}x lower p95 submit->start (>= 3x: {_verdict(p95, 3.0, at_least=True)}), "
            f"{pooled:.2f}x the pooled-cache bound (<= 1.5x: {_verdict(pooled, 1.5, at_least=False)}{lossy}), "
            f"{s.jobs_lost} jobs lost (0: {'met' if s.jobs_lost == 0 else 'missed'})."
        )
    return lines


def explain_lines(
    results: Sequence[engine.SimResult], summaries: Sequence[report.Summary], bnds: bounds_mod.Bounds,
    calm: engine.SimResult | None,
) -> list[str]:
    """Why the byte targets are missed (when they are) and what would close the gap, from this run's figures."""
    ref = next((s for s in summaries if s.policy == REFERENCE), None)
    main = next((r for r in results if r.policy == "stoker"), None)
    if ref is None or main is None:
        return []
    tb = 1e12
    c = main.bytes_by_cause
    need = ref.bytes_downloaded / 3
    gap = main.bytes_downloaded - need
    lines = [
        "Where `stoker`'s bytes go, and what bounds them: "
        f"{c.get('first', 0) / tb:.2f} TB first requests (compulsory), {c.get('evicted', 0) / tb:.2f} TB again after "
        f"every copy was evicted, {c.get('interrupted', 0) / tb:.2f} TB again after the last copy vanished with an "
        f"interrupted agent, {c.get('duplicate', 0) / tb:.2f} TB duplicates. One pooled cache of the whole fleet's disk "
        f"evicting by the agents' own rule and never interrupted downloads {bnds.pooled_frequency_bytes / tb:.2f} TB "
        f"({bnds.pooled_frequency_bytes / max(1, bnds.pooled_bytes):.2f}x the optimum)"
        + (": even perfectly pooled, the agents' rule does not reach 1.5x the offline optimum on this trace, so "
           "that target is out of reach for this replacement rule. " if bnds.pooled_frequency_bytes > 1.5 * bnds.pooled_bytes else ". ")
        + f"Losing each interrupted agent's share of the cache costs even the optimum "
        f"{(bnds.pooled_lossy_bytes - bnds.pooled_bytes) / tb:.2f} TB; against that reference `stoker` is at "
        f"{main.bytes_downloaded / max(1, bnds.pooled_lossy_bytes):.2f}x.",
    ]
    if gap > 0:
        text = (
            f"The 3x target needs {gap / tb:.2f} TB less ({need / tb:.2f} TB). "
        )
        if calm is not None:
            text += (
                f"The same policy on the same trace without interruptions downloads {calm.bytes_downloaded / tb:.2f} TB "
                f"({'below' if calm.bytes_downloaded <= need else 'still above'} that)"
                + (f", so interruptions account for {(main.bytes_downloaded - calm.bytes_downloaded) / tb:.2f} TB. "
                   if calm.bytes_downloaded < main.bytes_downloaded else "; interruptions do not explain the gap. ")
            )
        text += (
            "What would close it: fewer interruptions or replacement pods that keep their disk (a node-local volume), "
            "more disk per agent, or a rule that beats frequency ranking (it would need knowledge of future demand); "
            "more waiting for busy holders (a higher `download_weight`) removes the remaining duplicates at the "
            "cost of start latency."
        )
        lines += ["", text]
    pooled_need = 1.5 * bnds.pooled_bytes
    if main.bytes_downloaded > pooled_need:
        text = (
            f"The 1.5x-the-bound target needs {(main.bytes_downloaded - pooled_need) / tb:.2f} TB less "
            f"({pooled_need / tb:.2f} TB). The bound is an offline optimum (it knows every future request) of one "
            f"pooled cache that is never interrupted; the agents' rule under the same ideal conditions already takes "
            f"{bnds.pooled_frequency_bytes / tb:.2f} TB, "
            + (f"leaving {(pooled_need - bnds.pooled_frequency_bytes) / tb:.2f} TB " if pooled_need > bnds.pooled_frequency_bytes
               else "more than the target allows, and nothing ")
            + "for what a real fleet adds (a cache split into one disk per agent, duplicates of hot models, and "
            "interruptions"
            + (f", which alone cost {(main.bytes_downloaded - calm.bytes_downloaded) / tb:.2f} TB here)"
               if calm is not None and calm.bytes_downloaded < main.bytes_downloaded else ")")
            + ". Closing it needs both a replacement rule nearer the offline optimum than frequency ranking and "
            "interruptions that do not lose the disk; against the optimum that loses each interrupted agent's share, "
            f"`stoker` is at {main.bytes_downloaded / max(1, bnds.pooled_lossy_bytes):.2f}x."
        )
        lines += ["", text]
    return lines


def _settings(args: argparse.Namespace) -> PlacementSettings | None:
    overrides = {name: value for name, value in (("max_hot_wait_age_s", args.max_hot_wait_s),
                                                 ("download_weight", args.download_weight),
                                                 ("peer_weight", args.peer_weight)) if value is not None}
    return PlacementSettings(**overrides) if overrides else None


def _load() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def decision_time_at(n_agents: int, *, seed: int, n_jobs: int = 1000, passes: int = 3) -> tuple[float, int, int]:
    """Median CPU seconds of one placement pass on a synthetic fleet, with the bindings and
    examined jobs of that pass (as in `run_scaling`, but with 10 % of the agents free)."""
    jobs, agents, artifacts = _scaling_inputs(n_agents, n_jobs, seed=seed, free_share=0.1)
    times = []
    plan = None
    for _ in range(passes):
        started = time.thread_time()
        plan = plan_placement(jobs, agents, artifacts, now=60.0)
        times.append(time.thread_time() - started)
    assert plan is not None
    return statistics.median(times), len(plan.bindings), plan.jobs_examined


def run_fleet(args: argparse.Namespace, out: TextIO = sys.stdout) -> str:
    load_before = _load()
    trace, fleet = build(args)
    sizes = {a.name: a.size_bytes for a in trace.catalog.artifacts}
    window_from = next((i for i, j in enumerate(trace.jobs) if j.submit_s >= args.warmup_s), len(trace.jobs))
    end_s = trace.duration_s + 3600.0
    interruptions = sorted(t for times in engine.interruption_schedule(fleet, until_s=end_s).values() for t in times)
    bnds = bounds_mod.compute_bounds(
        [j.artifacts for j in trace.jobs], sizes,
        capacity_bytes=fleet.disk_bytes * fleet.n_agents, baked=fleet.baked, window_from_job=window_from,
        times=[j.submit_s for j in trace.jobs], interruptions=interruptions, agents=fleet.n_agents,
    )
    setup = (
        f"{len(trace.jobs)} jobs over {trace.duration_s / 60:.0f} simulated min "
        f"({len(trace.jobs) / max(1, trace.duration_s):.2f}/s, {_offered_load(trace, fleet):.0%} inference load), "
        + (f"{len(trace.catalog.checkpoints)} checkpoints + {len(trace.catalog.loras)} LoRAs"
           + (f" from {args.catalog.name}" if args.catalog else "")
           + ("" if args.trace else f", Zipf {args.zipf}")
           + (f", replaying {args.trace.name}" if args.trace else "") + ", ")
        + f"{fleet.n_agents} agents x "
        f"{fleet.disk_bytes / GB:.0f} GB disk / {fleet.ram_bytes / GB:.0f} GB RAM / {fleet.vram_bytes / GB:.0f} GB VRAM, "
        f"download {fleet.download_bytes_per_s / 1e6:.0f} MB/s, disk->GPU {fleet.disk_to_gpu_bytes_per_s / 1e9:.0f} GB/s, "
        f"RAM->GPU {fleet.ram_to_gpu_bytes_per_s / 1e9:.0f} GB/s, generation "
        + " / ".join(f"{fleet.inference_s[f]:g} s ({_FAMILY_NAMES[f]})" for f in workload.Family
                     if any(a.family is f for a in trace.catalog.checkpoints))
        + (" (some checkpoints set their own)" if any(a.inference_s for a in trace.catalog.checkpoints) else "")
        + f", {fleet.slots} job slots per agent "
        f"under late binding, {fleet.interruptions_per_agent_hour:g} interruption "
        f"per agent-hour (lease grace {fleet.detect_s:.0f} s, replacement after {fleet.replace_delay_s:.0f} s), "
        f"baked-in {', '.join(fleet.baked) or 'none'}, seed {args.seed}"
    )
    print(setup, file=out, flush=True)
    results: list[engine.SimResult] = []
    run_started = time.perf_counter()
    for key in [k.strip() for k in args.policies.split(",") if k.strip()]:
        started = time.perf_counter()
        result = engine.simulate(trace, fleet, lambda: make_policy(key, seed=args.seed, settings=_settings(args)))
        results.append(result)
        print(f"  {result.policy}: simulated in {time.perf_counter() - started:.1f} s", file=out, flush=True)
    calm: engine.SimResult | None = None
    if not args.no_explain and any(r.policy == "stoker" for r in results) and fleet.interruptions_per_agent_hour > 0:
        started = time.perf_counter()
        calm_fleet = dataclasses.replace(fleet, interruptions_per_agent_hour=0.0)
        calm = engine.simulate(trace, calm_fleet, lambda: make_policy("stoker", seed=args.seed, settings=_settings(args)))
        print(f"  stoker without interruptions: simulated in {time.perf_counter() - started:.1f} s", file=out, flush=True)
    wall_s = time.perf_counter() - run_started
    pass_s, pass_bound, pass_examined = decision_time_at(1000, seed=args.seed)
    load_after = _load()
    whole = [report.summarize(r) for r in results]
    window = [report.summarize(r, window_start_s=args.warmup_s) for r in results]
    text_whole = report.format_table(whole, bound_bytes=bnds.pooled_bytes, reference=REFERENCE)
    text_window = report.format_table(window, bound_bytes=bnds.window_pooled_bytes, reference=REFERENCE)
    print("\nWhole run (cold start included)", file=out)
    print(report.bounds_line(bnds, window=False), file=out)
    print(text_whole, file=out)
    print(f"\nWindow: jobs submitted after {args.warmup_s / 60:.0f} min", file=out)
    print(report.bounds_line(bnds, window=True), file=out)
    print(text_window, file=out)
    print("\nTB fetched by origin and cause (whole run): first request, another agent had it, every copy evicted, "
          "last copy lost to an interruption", file=out)
    print(report.causes_table(results), file=out, flush=True)
    paths = report.write_plots(results, bounds=bnds, out_dir=args.out, bursts=trace.bursts)
    print("\nplots: " + ", ".join(str(p) for p in paths), file=out)
    md = [
        "## Fleet simulation (`stoker sim`)" if record_section(args) in (None, "fleet")
        else f"## Fleet simulation, {args.workload} workload (`stoker sim --workload {args.workload}`)",
        "",
        "Simulated fleet driven by the operator's real placement planner (`stoker.operator.planner.Planner` over "
        "`stoker.operator.placement`, with memory between passes and promises to waiting jobs), "
        "`stoker.operator.replicas.plan_replicas` and the agent's `DiskCacheState` / `plan_eviction`. "
        "Each agent has one GPU: placement sees one generation slot and the other job slots as queue slots, whose "
        "downloads overlap the running job. The Stoker policies' agents evict disk by use frequency (the agent's "
        "rank, half-life 2 h); placement reads each agent's ranks (as the operator reads CacheAgent "
        "`models[].rank`), values victims by their recent uses and by whether another agent holds a copy, and "
        "agents start a newly fetched model from the operator's fleet-wide rank of it (ModelCache `useRank`, "
        "every job counted once at its creation; the simulated agent reads the rank counted so far when its "
        "download ends, a real one the published value when its download starts, up to a minute of rank "
        "behind). `stoker-lastused` is the variant "
        "without either: placement sees only each model's last use and new copies rank as one-offs (agents and "
        "an operator that report no ranks). The baselines' nodes evict by plain LRU. Stoker's placement download "
        "weight is "
        f"{(_settings(args) or PlacementSettings()).download_weight:g} (a second of downloading costs as much "
        "as that many seconds of waiting). "
        "`stoker+peers` is `stoker` with the peer tier: its agents fetch a model from a live agent that holds "
        f"a verified copy, or is fetching one (then once it is complete), at {fleet.peer_bytes_per_s / 1e6:.0f} MB/s "
        f"within the holder's upload cap of {fleet.peer_upload_bytes_per_s / 1e6:.0f} MB/s over "
        f"{fleet.peer_upload_slots} transfers at once, and go to the source only when no agent can serve it; a "
        "holder lost mid-transfer leaves only its missing bytes to another peer or the source; its placement "
        "prices a fetch from a peer at that rate without the download weight "
        f"(peer weight {(_settings(args) or PlacementSettings()).peer_weight:g}). "
        "`TB down` counts bytes from model sources, `TB peer` bytes between agents. "
        "`x pooled`: bytes / pooled-cache lower bound; `x fewer` and `p95 x`: least-connection+LRU / policy. "
        "Latencies of jobs not started by the end count as their wait so far. `us/binding`: CPU time of the "
        "scheduling passes (building views and deciding) per binding; `core us/binding` and `core us/job`: CPU "
        "time of the placement planner alone per binding and per examined job. Placement sees each agent as it "
        "last reported (a new view when the agent's state changes, as the operator builds one per CacheAgent "
        "change).",
        "",
        f"Command: `{' '.join(['.venv/bin/stoker sim', *argv_text(args)])}` ({wall_s / 60:.1f} min wall for all runs).",
        "",
        f"Machine: {_machine()}. 1-minute load average {load_before} when the run started and {load_after} at the end"
        + (" (other work shared the cores: wall times and CPU times per decision are inflated by that contention)."
           if max(_float(load_before), _float(load_after)) > (os.cpu_count() or 1) * 0.75 else "."),
        "",
        f"Setup: {setup}.",
        "",
        *targets_lines(whole, bnds),
        *peer_target_lines(whole, bnds, target=None if args.catalog or args.trace else PEER_TARGETS.get(args.workload)),
        *decision_lines(whole, pass_s=pass_s, bound=pass_bound, examined=pass_examined),
        "",
        *explain_lines(results, whole, bnds, calm),
        "",
        "Whole run (cold start included); " + report.bounds_line(bnds, window=False) + ":",
        "",
        report.markdown(whole, bound_bytes=bnds.pooled_bytes, reference=REFERENCE),
        "",
        f"Window (jobs submitted after {args.warmup_s / 60:.0f} min); " + report.bounds_line(bnds, window=True) + ":",
        "",
        report.markdown(window, bound_bytes=bnds.window_pooled_bytes, reference=REFERENCE),
        "",
        "TB fetched by origin (`source`: the model's URL; `peer`: another agent) and cause (whole run): "
        "`first` request for the file, `duplicate` (another live agent had it "
        "or was fetching it), `evicted` (every copy had been evicted), `interrupted` (the last copy vanished with "
        "an interrupted agent):",
        "",
        report.causes_table(results, markdown_table=True),
        "",
        "Plots: " + ", ".join(f"`{p.name}`" for p in paths) + f" in `{args.out}`.",
    ]
    return "\n".join(md)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def decision_lines(summaries: Sequence[report.Summary], *, pass_s: float, bound: int, examined: int) -> list[str]:
    """The decision-time target (< 1 ms at 1,000 agents), per binding and per examined job."""
    main = next((s for s in summaries if s.policy == "stoker"), None)
    per_binding = pass_s / max(1, bound) * 1e6
    per_job = pass_s / max(1, examined) * 1e6
    lines = [
        f"- Decision time at 1,000 agents (synthetic pass: 1,000 pending jobs, 10 % of the agents with a free slot; "
        f"CPU time of `plan_placement`): {pass_s * 1e3:.1f} ms per pass, {per_binding:.0f} us per binding "
        f"({bound} bound), {per_job:.0f} us per examined job ({examined} examined) (< 1 ms: "
        f"{'met' if per_binding < 1000 else f'missed by {per_binding / 1000:.1f}x'} per binding)."
    ]
    if main is not None and not math.isnan(main.core_us):
        lines.append(
            f"- Decision time in this run (`stoker`): {main.core_us:.0f} us of placement planner CPU per binding "
            f"(<= 500 us: {'met' if main.core_us <= 500 else f'missed by {main.core_us / 500:.1f}x'}), "
            f"{main.core_job_us:.0f} us per examined job. Passes went through {main.jobs_examined} pending jobs for "
            f"{main.decisions} bindings ({main.jobs_examined / max(1, main.decisions):.0f} per binding: jobs waiting "
            f"for a busy holder come up on every pass); the planner placed {main.jobs_placed} of them afresh "
            f"({main.jobs_placed / max(1, main.decisions):.1f} per binding) and reused the outcome of the others, "
            f"whose inputs had not changed. {main.broken_promises} placements counted a broken promise."
        )
    return lines


def _scaling_inputs(
    n_agents: int, n_jobs: int, *, seed: int, free_share: float | None = None
) -> tuple[list[JobView], list[AgentView], dict[str, ArtifactInfo]]:
    rng = random.Random(f"scaling-{seed}-{n_agents}-{n_jobs}")
    config = workload.WorkloadConfig(n_models=1000, n_loras=2000, seed=seed)
    catalog = workload.build_catalog(config)
    ckpts = catalog.checkpoints
    zipf = workload.ZipfSampler(len(ckpts), 1.0)
    loras = catalog.loras
    agents = []
    for i in range(n_agents):
        disk = frozenset(ckpts[zipf.sample(rng)].name for _ in range(12))
        on_disk = sorted(disk)
        vram = frozenset(on_disk[:2])
        ram = frozenset(on_disk[:4])
        if free_share is None:
            busy = rng.random() < 0.5
            free, remaining = (1, (rng.uniform(1, 10),)) if busy else (2, ())
        else:
            free = 1 if rng.random() < free_share else 0
            remaining = tuple(rng.uniform(1, 10) for _ in range(2 - free))
        agents.append(
            AgentView(
                name=f"agent-{i:05d}", node=f"node-{i:05d}", zone=f"zone-{i % 3}", slots=2,
                free_slots=free, running_remaining_s=remaining,
                vram_capacity_bytes=20 * GB, vram_free_bytes=6 * GB, ram_capacity_bytes=32 * GB,
                ram_free_bytes=8 * GB, disk_capacity_bytes=50 * GB, disk_free_bytes=5 * GB,
                vram=vram, ram=ram, disk=disk, download_bps=400e6, disk_to_gpu_bps=2e9, ram_to_gpu_bps=20e9,
            )
        )
    jobs = []
    for j in range(n_jobs):
        model = ckpts[zipf.sample(rng)].name
        picked = tuple({loras[rng.randrange(len(loras))].name for _ in range(rng.choice((0, 0, 1, 2)))})
        jobs.append(JobView(key=f"ns/job-{j:06d}", model=model, loras=picked, created_at=rng.uniform(0, 60), expected_run_s=6.0))
    artifacts = {a.name: ArtifactInfo(a.name, a.size_bytes) for a in catalog.artifacts}
    return jobs, agents, artifacts


SCALING_GRID = tuple((a, 1000) for a in (10, 100, 1000, 10000)) + tuple((1000, p) for p in (10, 100, 10000, 100000))


def run_scaling(
    *, budget_s: float = 120.0, seed: int = 1, grid: Sequence[tuple[int, int]] = SCALING_GRID, out: TextIO = sys.stdout
) -> str:
    """Time one placement pass as agents grow (1,000 pending) and as pending jobs grow (1,000 agents)."""
    rows: list[tuple[int, int, int, int, float]] = []
    deadline = time.perf_counter() + budget_s
    print(f"{'agents':>7} {'pending':>8} {'bound':>6} {'examined':>9} {'ms/pass':>9} {'us/binding':>11} {'us/job':>8}", file=out)
    for n_agents, n_jobs in grid:
        if time.perf_counter() > deadline:
            print(f"{n_agents:>7} {n_jobs:>8}  skipped (scaling budget used)", file=out)
            continue
        jobs, agents, artifacts = _scaling_inputs(n_agents, n_jobs, seed=seed)
        times = []
        bound = examined = 0
        for _ in range(3):
            started = time.thread_time()
            plan = plan_placement(jobs, agents, artifacts, now=60.0)
            times.append(time.thread_time() - started)
            bound, examined = len(plan.bindings), plan.jobs_examined
            if time.perf_counter() > deadline:
                break
        per_pass = statistics.median(times)
        rows.append((n_agents, n_jobs, bound, examined, per_pass))
        print(f"{n_agents:>7} {n_jobs:>8} {bound:>6} {examined:>9} {per_pass * 1e3:>9.1f} "
              f"{per_pass / max(1, bound) * 1e6:>11.1f} {per_pass / max(1, examined) * 1e6:>8.1f}", file=out, flush=True)
    md = [
        "### Placement pass time (`stoker sim --scaling`)",
        "",
        f"Machine: {_machine()}.",
        "",
        f"1-minute load average {_load()} at the end of the grid.",
        "",
        "One `plan_placement` call (median of 3, CPU time, one thread) on synthetic views: each agent has 2 slots "
        "(half of the agents with one busy), 12 checkpoints on disk, 4 in RAM, 2 in VRAM; jobs follow Zipf 1.0 over "
        "1,000 checkpoints with 0-2 LoRAs; the artifact map holds all 3,000 artifacts. Examined jobs are the ones "
        "the pass decided on (bound, left waiting for a busy holder, or unplaceable).",
        "",
        "| agents | pending jobs | bindings | examined | ms per pass | µs per binding | µs per examined job |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {a} | {p} | {b} | {e} | {t * 1e3:.1f} | {t / max(1, b) * 1e6:.1f} | {t / max(1, e) * 1e6:.1f} |"
        for a, p, b, e, t in rows
    ]
    return "\n".join(md)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]  # `stoker sim -- --option ...` passes the separator through
    parsed = _parser().parse_args(args)
    for key, value in WORKLOADS[parsed.workload].items():
        if key != "families" and getattr(parsed, key) is None:
            setattr(parsed, key, value)  # the workload's value where no option overrides it
    return parsed


def _machine() -> str:
    writer = _section_writer()
    if writer is None:
        return "unknown"
    from bench.report import describe_machine

    return describe_machine()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections: list[str] = []
    if args.scaling:
        sections.append(run_scaling(budget_s=args.scaling_budget_s, seed=args.seed))
    else:
        try:
            sections.append(run_fleet(args))
        except workload.WorkloadError as exc:
            print(f"stoker sim: {exc}", file=sys.stderr)
            return 2
    if not args.no_record:
        write_section = _section_writer()
        if write_section is None:
            print("BENCHMARKS.md not written: run from a source checkout (bench/ not found)", file=sys.stderr)
        else:
            name = record_section(args)
            if name is not None:
                write_section(name, "\n".join(sections))
    return 0


def record_section(args: argparse.Namespace) -> str | None:
    """The BENCHMARKS.md section a run writes: a replay of the user's own files writes none unless named."""
    if args.section:
        return str(args.section)
    if args.scaling:
        return "fleet-scaling"
    if args.catalog or args.trace:
        return None
    return "fleet" if args.workload == "default" else f"fleet-{args.workload}"


def _section_writer() -> Callable[[str, str], None] | None:
    """bench.report.write_section from the source checkout this package lives in, if any."""
    try:
        from bench.report import write_section
    except ImportError:
        root = pathlib.Path(__file__).resolve().parents[2]
        if not (root / "bench" / "report.py").is_file():
            return None
        # Appended, not prepended: the checkout's operator/ folder must not shadow the
        # standard library's operator module (already imported by now anyway).
        sys.path.append(str(root))
        from bench.report import write_section
    return write_section
