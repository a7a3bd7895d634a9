"""Synthetic and replayed workloads for the fleet simulator.

A workload is a catalog of artifacts (checkpoints and LoRAs with sizes and model
families) plus a trace of job requests (submit time, checkpoint, LoRAs). Synthetic
traces draw checkpoints from a Zipf popularity law whose ranking drifts over time
and can be disturbed by bursts (one cold model suddenly takes a share of traffic);
LoRAs are drawn with co-use (each checkpoint has a few favourite LoRAs). Everything
is a pure function of the config and its seed. Traces can also be read from and
written to CSV (`time_s,model,loras`, LoRAs separated by `;`).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import enum
import io
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "GB",
    "MB",
    "Artifact",
    "ArtifactKind",
    "Burst",
    "Catalog",
    "Family",
    "JobRequest",
    "Trace",
    "WorkloadConfig",
    "WorkloadError",
    "ZipfSampler",
    "arrival_rate_for_load",
    "build_catalog",
    "generate_trace",
    "read_trace_csv",
    "write_trace_csv",
]

GB = 10**9
MB = 10**6


class WorkloadError(Exception):
    """A workload could not be built or a trace could not be read."""


class ArtifactKind(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"


class Family(enum.StrEnum):
    SD15 = "sd15"
    SDXL = "sdxl"


@dataclass(frozen=True)
class Artifact:
    """One downloadable file: a checkpoint or a LoRA."""

    name: str
    kind: ArtifactKind
    family: Family
    size_bytes: int


@dataclass(frozen=True)
class Catalog:
    """All artifacts a workload can name, by name."""

    artifacts: tuple[Artifact, ...]
    by_name: dict[str, Artifact] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {a.name: a for a in self.artifacts})

    def __getitem__(self, name: str) -> Artifact:
        try:
            return self.by_name[name]
        except KeyError:
            raise WorkloadError(f"artifact {name!r} is not in the catalog; add it to the catalog or fix the trace") from None

    @property
    def checkpoints(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.kind is ArtifactKind.CHECKPOINT)

    @property
    def loras(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.kind is ArtifactKind.LORA)


@dataclass(frozen=True)
class JobRequest:
    """One generation request as submitted."""

    job_id: int
    submit_s: float
    model: str
    loras: tuple[str, ...] = ()

    @property
    def artifacts(self) -> tuple[str, ...]:
        return (self.model, *self.loras)


@dataclass(frozen=True)
class Trace:
    catalog: Catalog
    jobs: tuple[JobRequest, ...]
    duration_s: float
    # Times of bursts (start, end, model) for plots.
    bursts: tuple[tuple[float, float, str], ...] = ()


@dataclass(frozen=True)
class Burst:
    """From `start_s` for `duration_s`, the checkpoint of popularity rank `rank` takes `share` of traffic."""

    start_s: float
    duration_s: float
    rank: int
    share: float = 0.3


@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of a synthetic workload. Sizes follow public SD 1.5 / SDXL / LoRA files."""

    n_models: int = 1000
    zipf_exponent: float = 1.0
    sdxl_fraction: float = 0.45
    """Share of checkpoints that are SDXL (6-7 GB); the rest are SD 1.5 (2-4 GB)."""
    n_loras: int = 2000
    lora_job_fraction: float = 0.5
    """Share of jobs that use LoRAs (1 to 3 of them)."""
    lora_co_use: float = 0.8
    """Probability that a LoRA is one of the checkpoint's favourites rather than any of its family."""
    favourites_per_model: int = 4
    duration_s: float = 3600.0
    rate_per_s: float = 2.0
    drift_interval_s: float = 600.0
    """Every interval, a share of neighbouring popularity ranks swap places."""
    drift_swap_fraction: float = 0.05
    bursts: tuple[Burst, ...] = ()
    seed: int = 1


class ZipfSampler:
    """Draws ranks 0..n-1 with probability proportional to 1 / (rank + 1) ** exponent."""

    def __init__(self, n: int, exponent: float) -> None:
        if n < 1:
            raise WorkloadError(f"a Zipf sampler needs at least one item, got n={n}")
        weights = [1.0 / (r + 1) ** exponent for r in range(n)]
        self.cumulative = list(itertools.accumulate(weights))
        self.total = self.cumulative[-1]
        self.probabilities = tuple(w / self.total for w in weights)

    def sample(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cumulative, rng.random() * self.total), len(self.cumulative) - 1)


def _uniform_int(rng: random.Random, low: float, high: float) -> int:
    return int(rng.uniform(low, high))


def build_catalog(config: WorkloadConfig) -> Catalog:
    """Checkpoints `m0000`.. (popularity order at t=0 is a shuffle of them) and LoRAs `l0000`..."""
    rng = random.Random(f"catalog-{config.seed}")
    artifacts: list[Artifact] = []
    for i in range(config.n_models):
        if rng.random() < config.sdxl_fraction:
            artifacts.append(Artifact(f"m{i:04d}", ArtifactKind.CHECKPOINT, Family.SDXL, _uniform_int(rng, 6.46 * GB, 6.94 * GB)))
        else:
            # Pruned fp16 files are about 2 GB, full fp32 ones about 4.2 GB.
            size = 2.13 * GB if rng.random() < 0.5 else rng.uniform(2.0 * GB, 4.27 * GB)
            artifacts.append(Artifact(f"m{i:04d}", ArtifactKind.CHECKPOINT, Family.SD15, int(size)))
    for i in range(config.n_loras):
        family = Family.SDXL if rng.random() < config.sdxl_fraction else Family.SD15
        # Log-uniform between 10 MB and 400 MB.
        size = int(math.exp(rng.uniform(math.log(10 * MB), math.log(400 * MB))))
        artifacts.append(Artifact(f"l{i:04d}", ArtifactKind.LORA, family, size))
    return Catalog(tuple(artifacts))


def arrival_rate_for_load(
    config: WorkloadConfig,
    catalog: Catalog,
    *,
    load: float,
    gpus: int,
    inference_s: dict[Family, float],
    lora_apply_s: float = 0.0,
) -> float:
    """Jobs per second that keep `load` of `gpus` busy with generation alone.

    Measured on the config's own trace (the same draws, so the same popularity-weighted
    family mix and LoRA count), not on the catalog average: with Zipf traffic a few
    top models decide the mix.
    """
    sample = generate_trace(dataclasses.replace(config, rate_per_s=1.0, duration_s=max(config.duration_s, 3600.0)), catalog)
    if not sample.jobs:
        raise WorkloadError("cannot calibrate the arrival rate: the sample trace is empty")
    work_s = sum(inference_s[catalog[j.model].family] + lora_apply_s * len(j.loras) for j in sample.jobs)
    return load * gpus / (work_s / len(sample.jobs))


def generate_trace(config: WorkloadConfig, catalog: Catalog | None = None) -> Trace:
    """A Poisson arrival stream of jobs following the config; same seed, same trace."""
    catalog = catalog or build_catalog(config)
    checkpoints = catalog.checkpoints
    if not checkpoints:
        raise WorkloadError("the catalog has no checkpoints")
    rng = random.Random(f"trace-{config.seed}")
    zipf = ZipfSampler(len(checkpoints), config.zipf_exponent)
    ranking = list(range(len(checkpoints)))
    rng.shuffle(ranking)  # ranking[rank] = index into checkpoints

    loras_by_family: dict[Family, list[Artifact]] = {f: [] for f in Family}
    for lora in catalog.loras:
        loras_by_family[lora.family].append(lora)
    lora_zipf = {f: ZipfSampler(len(v), 1.0) for f, v in loras_by_family.items() if v}
    favourites: dict[str, tuple[str, ...]] = {}
    for c in checkpoints:
        pool = loras_by_family[c.family]
        if pool:
            favourites[c.name] = tuple(
                pool[lora_zipf[c.family].sample(rng)].name for _ in range(config.favourites_per_model)
            )

    bursts = sorted(config.bursts, key=lambda b: b.start_s)
    burst_models = tuple(
        (b.start_s, b.start_s + b.duration_s, checkpoints[ranking[min(b.rank, len(ranking) - 1)]].name) for b in bursts
    )
    burst_shares = tuple(b.share for b in bursts)
    jobs: list[JobRequest] = []
    t = 0.0
    next_drift_s = config.drift_interval_s if config.drift_interval_s > 0 else math.inf
    job_id = 0
    while True:
        t += rng.expovariate(config.rate_per_s)
        if t >= config.duration_s:
            break
        while t >= next_drift_s:
            _drift(ranking, rng, config.drift_swap_fraction)
            next_drift_s += config.drift_interval_s
        model = None
        for (start, end, name), share in zip(burst_models, burst_shares):
            if start <= t < end and rng.random() < share:
                model = name
                break
        if model is None:
            model = checkpoints[ranking[zipf.sample(rng)]].name
        loras: tuple[str, ...] = ()
        family = catalog[model].family
        if loras_by_family[family] and rng.random() < config.lora_job_fraction:
            count = rng.choice((1, 1, 2, 3))
            picked: list[str] = []
            for _ in range(count):
                if rng.random() < config.lora_co_use and model in favourites:
                    name = rng.choice(favourites[model])
                else:
                    name = loras_by_family[family][lora_zipf[family].sample(rng)].name
                if name not in picked:
                    picked.append(name)
            loras = tuple(picked)
        jobs.append(JobRequest(job_id=job_id, submit_s=t, model=model, loras=loras))
        job_id += 1
    return Trace(catalog=catalog, jobs=tuple(jobs), duration_s=config.duration_s, bursts=burst_models)


def _drift(ranking: list[int], rng: random.Random, fraction: float) -> None:
    # Swap a rank with one a few places away: popularity moves gradually, not all at once.
    n = len(ranking)
    for _ in range(int(n * fraction)):
        i = rng.randrange(n)
        j = min(n - 1, max(0, i + rng.randint(-max(2, i // 2), max(2, i // 2))))
        ranking[i], ranking[j] = ranking[j], ranking[i]


def read_trace_csv(lines: Iterable[str], *, catalog: Catalog, duration_s: float | None = None) -> Trace:
    """Parse a `time_s,model,loras` CSV (header optional, LoRAs separated by `;`).

    Every name must be in `catalog`; rows are sorted by time.
    """
    rows: list[tuple[float, str, tuple[str, ...]]] = []
    for lineno, row in enumerate(csv.reader(lines), start=1):
        if not row or row[0].strip().startswith("#"):
            continue
        if lineno == 1 and row[0].strip().lower() in {"time", "time_s"}:
            continue
        if len(row) < 2:
            raise WorkloadError(f"trace line {lineno}: expected 'time_s,model[,loras]', got {row!r}")
        try:
            t = float(row[0])
        except ValueError:
            raise WorkloadError(f"trace line {lineno}: time {row[0]!r} is not a number of seconds") from None
        model = row[1].strip()
        loras = tuple(x.strip() for x in (row[2] if len(row) > 2 else "").split(";") if x.strip())
        for name in (model, *loras):
            catalog[name]
        if catalog[model].kind is not ArtifactKind.CHECKPOINT:
            raise WorkloadError(f"trace line {lineno}: {model!r} is a {catalog[model].kind}, not a checkpoint")
        rows.append((t, model, loras))
    rows.sort(key=lambda r: r[0])
    jobs = tuple(JobRequest(job_id=i, submit_s=t, model=m, loras=ls) for i, (t, m, ls) in enumerate(rows))
    end = duration_s if duration_s is not None else (jobs[-1].submit_s if jobs else 0.0)
    return Trace(catalog=catalog, jobs=jobs, duration_s=end)


def write_trace_csv(jobs: Sequence[JobRequest]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["time_s", "model", "loras"])
    for job in jobs:
        writer.writerow([f"{job.submit_s:.3f}", job.model, ";".join(job.loras)])
    return out.getvalue()
