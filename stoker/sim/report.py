"""Figures, tables and plots from simulation results.

`summarize` reduces a `SimResult` to the reported figures (optionally over a
measurement window that skips the cold start); `format_table` and `markdown`
print them; `write_plots` draws latency CDFs, bytes downloaded per policy against
the bounds, and hit rate over time through a burst (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from stoker.sim.bounds import Bounds
from stoker.sim.engine import MissCause, Origin, SimResult, Tier

__all__ = [
    "Summary",
    "bounds_line",
    "causes_table",
    "format_table",
    "markdown",
    "percentile",
    "summarize",
    "write_plots",
]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class Summary:
    policy: str
    jobs: int
    finished: int
    bytes_downloaded: int
    """From model sources."""
    bytes_prefetched: int
    bytes_from_peers: int
    tier_share: dict[str, float]
    start_p50_s: float
    start_p95_s: float
    start_p99_s: float
    finish_p50_s: float
    finish_p95_s: float
    finish_p99_s: float
    gpu_busy: float
    gpu_loading: float
    jobs_lost: int
    requeues: int
    decision_us: float
    """Scheduling CPU time per binding, whole pass (views + decision)."""
    core_us: float
    """CPU time of the placement core per binding (Stoker only; nan otherwise)."""
    core_job_us: float
    """CPU time of the placement core per examined job: bound, left waiting or
    unplaceable (Stoker only; nan otherwise). Passes go through the waiting jobs
    again, so there are more examined jobs than bindings; the planner places only
    those whose inputs changed."""
    jobs_examined: int
    jobs_placed: int
    """Of the examined jobs, those placed afresh (the planner reused the others' outcomes)."""
    broken_promises: int
    pass_p99_ms: float
    decisions: int


def summarize(result: SimResult, *, window_start_s: float = 0.0) -> Summary:
    jobs = [j for j in result.jobs if j.request.submit_s >= window_start_s]
    started = [j for j in jobs if j.start_s is not None]
    finished = [j for j in jobs if j.finish_s is not None]
    tiers = {t: 0 for t in Tier.ALL}
    for j in started:
        tiers[j.tier or Tier.MISS] += 1
    n = max(1, len(started))
    # Jobs still waiting at the end count with their waiting time so far, so a
    # policy cannot look fast by never starting its slowest jobs.
    start_lat = [(j.start_s if j.start_s is not None else result.end_s) - j.request.submit_s for j in jobs]
    finish_lat = [(j.finish_s if j.finish_s is not None else result.end_s) - j.request.submit_s for j in jobs]
    stats = result.policy_stats
    core_us = stats["core_cpu_s"] / max(1, result.decisions) * 1e6 if "core_cpu_s" in stats else math.nan
    examined = int(stats.get("jobs_examined", 0))
    core_job_us = stats["core_cpu_s"] / max(1, examined) * 1e6 if "core_cpu_s" in stats else math.nan
    return Summary(
        policy=result.policy,
        jobs=len(jobs),
        finished=len(finished),
        bytes_downloaded=sum(b for t, b in result.download_log if t >= window_start_s),
        bytes_prefetched=result.bytes_prefetched if window_start_s <= 0 else -1,
        bytes_from_peers=sum(b for t, b in result.peer_log if t >= window_start_s),
        tier_share={t: c / n for t, c in tiers.items()},
        start_p50_s=percentile(start_lat, 50),
        start_p95_s=percentile(start_lat, 95),
        start_p99_s=percentile(start_lat, 99),
        finish_p50_s=percentile(finish_lat, 50),
        finish_p95_s=percentile(finish_lat, 95),
        finish_p99_s=percentile(finish_lat, 99),
        gpu_busy=result.busy_infer_s / max(1e-9, result.gpu_seconds),
        gpu_loading=result.busy_load_s / max(1e-9, result.gpu_seconds),
        jobs_lost=result.jobs_lost,
        requeues=result.requeues,
        decision_us=result.decision_cpu_s / max(1, result.decisions) * 1e6,
        core_us=core_us,
        core_job_us=core_job_us,
        jobs_examined=examined,
        jobs_placed=int(stats.get("jobs_placed", examined)),
        broken_promises=int(stats.get("broken_promises", 0)),
        pass_p99_ms=percentile(result.pass_cpu_s, 99) * 1e3,
        decisions=result.decisions,
    )


_COLUMNS = (
    ("policy", "{:<24}", lambda s, b, ref: s.policy),
    ("TB down", "{:>8}", lambda s, b, ref: f"{s.bytes_downloaded / 1e12:.2f}"),
    ("TB peer", "{:>8}", lambda s, b, ref: f"{s.bytes_from_peers / 1e12:.2f}"),
    ("x pooled", "{:>8}", lambda s, b, ref: f"{s.bytes_downloaded / b:.2f}" if b else "-"),
    ("x fewer", "{:>7}", lambda s, b, ref: f"{ref.bytes_downloaded / max(1, s.bytes_downloaded):.2f}" if ref else "-"),
    ("vram%", "{:>6}", lambda s, b, ref: f"{100 * s.tier_share[Tier.VRAM]:.0f}"),
    ("ram%", "{:>5}", lambda s, b, ref: f"{100 * s.tier_share[Tier.RAM]:.0f}"),
    ("disk%", "{:>6}", lambda s, b, ref: f"{100 * s.tier_share[Tier.DISK]:.0f}"),
    ("miss%", "{:>6}", lambda s, b, ref: f"{100 * s.tier_share[Tier.MISS]:.0f}"),
    ("start p50/p95/p99 s", "{:>21}", lambda s, b, ref: f"{s.start_p50_s:.1f}/{s.start_p95_s:.1f}/{s.start_p99_s:.1f}"),
    ("p95 x", "{:>6}", lambda s, b, ref: f"{ref.start_p95_s / max(1e-9, s.start_p95_s):.1f}" if ref else "-"),
    ("finish p50/p95/p99 s", "{:>22}", lambda s, b, ref: f"{s.finish_p50_s:.1f}/{s.finish_p95_s:.1f}/{s.finish_p99_s:.1f}"),
    ("GPU gen/load", "{:>12}", lambda s, b, ref: f"{s.gpu_busy:.2f}/{s.gpu_loading:.2f}"),
    ("lost", "{:>4}", lambda s, b, ref: str(s.jobs_lost)),
    ("requeued", "{:>8}", lambda s, b, ref: str(s.requeues)),
    ("us/binding", "{:>10}", lambda s, b, ref: f"{s.decision_us:.0f}"),
    ("core us/binding", "{:>15}", lambda s, b, ref: "-" if math.isnan(s.core_us) else f"{s.core_us:.0f}"),
    ("core us/job", "{:>11}", lambda s, b, ref: "-" if math.isnan(s.core_job_us) else f"{s.core_job_us:.0f}"),
)


def _rows(summaries: Sequence[Summary], bound_bytes: int, reference: str | None) -> list[list[str]]:
    ref = next((s for s in summaries if s.policy == reference), None)
    return [[fn(s, bound_bytes, ref) for _, _, fn in _COLUMNS] for s in summaries]


def format_table(summaries: Sequence[Summary], *, bound_bytes: int, reference: str | None = None) -> str:
    header = " ".join(fmt.format(name) for name, fmt, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for row in _rows(summaries, bound_bytes, reference):
        lines.append(" ".join(fmt.format(v) for (_, fmt, _), v in zip(_COLUMNS, row)))
    return "\n".join(lines)


def markdown(summaries: Sequence[Summary], *, bound_bytes: int, reference: str | None = None) -> str:
    names = [name for name, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for row in _rows(summaries, bound_bytes, reference):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def causes_table(results: Sequence[SimResult], *, markdown_table: bool = False) -> str:
    """TB fetched per policy and origin (model source or peer) by why the fetching agent lacked the
    file when the fetch started (see `MissCause`); peers appear only for policies that use them."""
    names = ["policy", "origin", *MissCause.ALL, "total", "of which prefetch"]
    rows: list[list[str]] = []
    for r in results:
        by_origin = [(Origin.SOURCE, r.bytes_by_cause, r.bytes_prefetched)]
        if r.bytes_from_peers or r.peer_bytes_by_cause:
            by_origin.append((Origin.PEER, r.peer_bytes_by_cause, r.peer_prefetched))
        for origin, causes, prefetched in by_origin:
            rows.append([r.policy, origin, *(f"{causes.get(c, 0) / 1e12:.2f}" for c in MissCause.ALL),
                         f"{sum(causes.values()) / 1e12:.2f}", f"{prefetched / 1e12:.2f}"])
    if markdown_table:
        lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(n), *(len(row[i]) for row in rows)) for i, n in enumerate(names)]
    lines = [" ".join(n.rjust(w) if i > 1 else n.ljust(w) for i, (n, w) in enumerate(zip(names, widths)))]
    lines += [" ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def bounds_line(bounds: Bounds, *, window: bool) -> str:
    if window:
        return (
            f"lower bounds (window): compulsory {bounds.window_compulsory_bytes / 1e12:.2f} TB, "
            f"pooled {bounds.pooled_capacity_bytes / 1e12:.1f} TB cache with optimal replacement "
            f"{bounds.window_pooled_bytes / 1e12:.2f} TB"
        )
    refs = f"with LRU {bounds.pooled_lru_bytes / 1e12:.2f} TB"
    if bounds.pooled_frequency_bytes:
        refs += (
            f", with the agents' frequency rule {bounds.pooled_frequency_bytes / 1e12:.2f} TB, optimal but losing "
            f"each interrupted agent's share of every file {bounds.pooled_lossy_bytes / 1e12:.2f} TB"
        )
    return (
        f"lower bounds (whole run): compulsory {bounds.compulsory_bytes / 1e12:.2f} TB, "
        f"pooled {bounds.pooled_capacity_bytes / 1e12:.1f} TB cache with optimal replacement "
        f"{bounds.pooled_bytes / 1e12:.2f} TB (references, not bounds: the same pooled cache {refs})"
    )


def write_plots(
    results: Sequence[SimResult],
    *,
    bounds: Bounds,
    out_dir: pathlib.Path,
    bursts: Sequence[tuple[float, float, str]] = (),
    bin_s: float = 120.0,
) -> list[pathlib.Path]:
    """Three small PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[pathlib.Path] = []
    style = dict(dpi=80)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in results:
        lat = sorted(max(0.05, (j.start_s if j.start_s is not None else r.end_s) - j.request.submit_s) for j in r.jobs)
        if lat:
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            ax.step(lat, ys, where="post", label=r.policy, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("submit → start (s, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("Start latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / "fleet_latency_cdf.png"
    fig.savefig(path, **style)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = [r.policy for r in results]
    values = [r.bytes_downloaded / 1e12 for r in results]
    ax.barh(names, values, color="#4c72b0")
    ax.axvline(bounds.pooled_bytes / 1e12, color="#c44e52", linestyle="--", label="pooled-cache optimum")
    ax.axvline(bounds.compulsory_bytes / 1e12, color="#55a868", linestyle=":", label="compulsory")
    ax.axvline(bounds.pooled_lru_bytes / 1e12, color="#8172b2", linestyle="-.", label="pooled cache, LRU (reference)")
    ax.set_xlabel("TB downloaded (whole run)")
    ax.set_title("Bytes downloaded per policy")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "fleet_bytes.png"
    fig.savefig(path, **style)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in results:
        end = max((j.request.submit_s for j in r.jobs), default=0.0)
        nbins = max(1, int(end // bin_s) + 1)
        hits = [0] * nbins
        total = [0] * nbins
        for j in r.jobs:
            if j.start_s is None:
                continue
            b = int(j.request.submit_s // bin_s)
            total[b] += 1
            hits[b] += j.tier != Tier.MISS
        xs = [(i + 0.5) * bin_s / 60 for i in range(nbins) if total[i]]
        ys = [hits[i] / total[i] for i in range(nbins) if total[i]]
        ax.plot(xs, ys, label=r.policy, linewidth=1.2)
    for start, end, model in bursts:
        ax.axvspan(start / 60, end / 60, color="grey", alpha=0.2)
        ax.text(start / 60, 1.01, f"burst: {model}", fontsize=7, va="bottom")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("submit time (min)")
    ax.set_ylabel("cache hit rate (checkpoint not downloaded)")
    ax.set_title(f"Hit rate over time ({bin_s / 60:.0f}-min bins)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / "fleet_hit_rate.png"
    fig.savefig(path, **style)
    plt.close(fig)
    paths.append(path)
    return paths
