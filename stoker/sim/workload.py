"""Synthetic and replayed workloads for the fleet simulator.

A workload is a catalog of artifacts (checkpoints and LoRAs with sizes and model
families) plus a trace of job requests (submit time, checkpoint, LoRAs). Synthetic
traces draw checkpoints from a Zipf popularity law whose ranking drifts over time
and can be disturbed by bursts (one cold model suddenly takes a share of traffic);
LoRAs are drawn with co-use (each checkpoint has a few favourite LoRAs). Everything
is a pure function of the config and its seed.

A user's own workload is two CSV files (`stoker sim --catalog catalog.csv --trace
trace.csv`), read by `read_catalog_csv` and `read_trace_csv`; every error names the
file, the line and what to change. See `CATALOG_HELP` and `TRACE_HELP`.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import datetime as dt
import enum
import io
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stoker.units import parse_bytes

__all__ = [
    "GB",
    "MB",
    "Artifact",
    "ArtifactKind",
    "Burst",
    "CATALOG_HELP",
    "Catalog",
    "FLAT_FAMILIES",
    "Family",
    "FamilyShare",
    "JobRequest",
    "Trace",
    "WorkloadConfig",
    "WorkloadError",
    "ZipfSampler",
    "arrival_rate_for_load",
    "build_catalog",
    "generate_trace",
    "parse_size",
    "read_catalog_csv",
    "read_trace_csv",
    "TRACE_HELP",
    "write_catalog_csv",
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
    """Model architecture: it sets the generation time (`FleetConfig.inference_s`)."""

    SD15 = "sd15"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"


@dataclass(frozen=True)
class Artifact:
    """One downloadable file: a checkpoint or a LoRA."""

    name: str
    kind: ArtifactKind
    family: Family
    size_bytes: int
    inference_s: float | None = None
    """Seconds per generation with this checkpoint; None: the fleet's figure for its family."""


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
class FamilyShare:
    """A share of a synthetic catalog's checkpoints of one family, with their sizes."""

    family: Family
    share: float
    """Fraction of the checkpoints (the shares of a catalog are normalised to sum to 1)."""
    size_bytes: tuple[float, float]
    """Checkpoint sizes, uniform between these."""
    lora_bytes: tuple[float, float] = (10 * MB, 400 * MB)
    """LoRA sizes for the family, log-uniform between these."""


FLAT_FAMILIES = (
    # Pruned fp16 and full fp32 SD 1.5 files; SDXL fine-tunes; SD 3.5 Medium (5 GB) to Large
    # (16.5 GB); FLUX.1 fine-tunes from fp8 (12 GB) to bf16 (24 GB) with LoRAs up to 1.3 GB.
    FamilyShare(Family.SD15, 0.25, (2.0 * GB, 4.27 * GB)),
    FamilyShare(Family.SDXL, 0.40, (6.46 * GB, 6.94 * GB), (20 * MB, 900 * MB)),
    FamilyShare(Family.SD3, 0.15, (5.1 * GB, 16.5 * GB), (20 * MB, 900 * MB)),
    FamilyShare(Family.FLUX, 0.20, (11.9 * GB, 23.8 * GB), (20 * MB, 1300 * MB)),
)
"""A flatter, larger catalog than the project's default: a quarter of the checkpoints are 12-24 GB."""


@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of a synthetic workload. Sizes follow public SD 1.5 / SDXL / LoRA files."""

    n_models: int = 1000
    zipf_exponent: float = 1.0
    sdxl_fraction: float = 0.45
    """Share of checkpoints that are SDXL (6-7 GB); the rest are SD 1.5 (2-4 GB)."""
    families: tuple[FamilyShare, ...] | None = None
    """The catalog's family mix; None: SD 1.5 and SDXL by `sdxl_fraction`."""
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
    if config.families is not None:
        return _build_mixed_catalog(config, config.families)
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


def _build_mixed_catalog(config: WorkloadConfig, families: tuple[FamilyShare, ...]) -> Catalog:
    if not families or any(f.share < 0 for f in families) or sum(f.share for f in families) <= 0:
        raise WorkloadError("a catalog's family shares must be >= 0 and add up to more than 0")
    rng = random.Random(f"catalog-mix-{config.seed}")
    total = sum(f.share for f in families)
    cumulative = list(itertools.accumulate(f.share / total for f in families))

    def pick() -> FamilyShare:
        return families[min(bisect.bisect_left(cumulative, rng.random()), len(families) - 1)]

    width = max(4, len(str(max(config.n_models, config.n_loras) - 1)))
    artifacts: list[Artifact] = []
    for i in range(config.n_models):
        f = pick()
        artifacts.append(Artifact(f"m{i:0{width}d}", ArtifactKind.CHECKPOINT, f.family, int(rng.uniform(*f.size_bytes))))
    for i in range(config.n_loras):
        f = pick()
        low, high = f.lora_bytes
        size = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        artifacts.append(Artifact(f"l{i:0{width}d}", ArtifactKind.LORA, f.family, size))
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
    work_s = sum(_generation_s(catalog[j.model], inference_s) + lora_apply_s * len(j.loras) for j in sample.jobs)
    return load * gpus / (work_s / len(sample.jobs))


def _generation_s(artifact: Artifact, inference_s: dict[Family, float]) -> float:
    return artifact.inference_s if artifact.inference_s is not None else inference_s[artifact.family]


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


CATALOG_HELP = """\
catalog CSV: one row per model file, with a header row naming the columns.
  name         required  the name the trace uses (a ModelCache name, for example)
  kind         required  checkpoint or lora
  size         required  bytes, or a number with a unit: 6.9GB, 2.1GiB, 144MB
  family       optional  sd15, sdxl, sd3 or flux (sets the generation time; default:
                         sdxl for checkpoints of 5 GB or more, else sd15)
  inference_s  optional  seconds per generation with this checkpoint, overriding the family's
Lines starting with # are comments.
Example:
  name,kind,size,family
  juggernaut-xl,checkpoint,6.94GB,sdxl
  detail-tweaker,lora,144MB,sd15"""

TRACE_HELP = """\
trace CSV: one row per generation request, header row optional.
  time_s   required  submit time: seconds since the start of the replay (>= 0), or an
                     RFC 3339 timestamp (2024-05-01T12:00:03Z; the replay then starts
                     at the earliest one)
  model    required  a checkpoint name from the catalog
  loras    optional  LoRA names from the catalog, separated by ;
Rows may come in any order. Lines starting with # are comments.
Example:
  time_s,model,loras
  0.0,juggernaut-xl,detail-tweaker
  1.7,dreamshaper-8,"""



def parse_size(text: str) -> int:
    """`6.9GB`, `2GiB`, `144MB` or plain bytes, as bytes; raises ValueError."""
    return parse_bytes(text)


def _rows(lines: Iterable[str]) -> Iterable[tuple[int, list[str]]]:
    """(line number, cells) of every row that is not blank or a comment."""
    for lineno, row in enumerate(csv.reader(lines), start=1):
        if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
            continue
        yield lineno, [cell.strip() for cell in row]


def read_catalog_csv(lines: Iterable[str], *, source: str = "catalog") -> Catalog:
    """Parse a catalog CSV (see `CATALOG_HELP`); raises `WorkloadError` naming the line."""
    rows = _rows(lines)
    header_row = next(iter(rows), None)
    if header_row is None:
        raise WorkloadError(f"{source}: no rows; expected a header such as 'name,kind,size' and one row per model")
    header_line, header = header_row
    columns = [c.lower() for c in header]
    known = ("name", "kind", "size", "family", "inference_s")
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise WorkloadError(
            f"{source} line {header_line}: unknown column {unknown[0]!r}; the header names columns from "
            f"{', '.join(known)} (name, kind and size are required)"
        )
    missing = [c for c in ("name", "kind", "size") if c not in columns]
    if missing:
        raise WorkloadError(
            f"{source} line {header_line}: the header has no {missing[0]!r} column; the first row must name the "
            f"columns, for example 'name,kind,size,family'"
        )
    if len(set(columns)) != len(columns):
        raise WorkloadError(f"{source} line {header_line}: a column is named twice in the header")
    col = {c: i for i, c in enumerate(columns)}
    artifacts: list[Artifact] = []
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{source} line {lineno}"
        if len(row) > len(columns):
            raise WorkloadError(f"{where}: {len(row)} cells but the header names {len(columns)} columns")
        cell = {c: (row[i] if i < len(row) else "") for c, i in col.items()}
        name = cell["name"]
        if not name:
            raise WorkloadError(f"{where}: the name is empty")
        if ";" in name:
            raise WorkloadError(f"{where}: the name {name!r} contains ';', which separates LoRAs in a trace")
        if name in first_line:
            raise WorkloadError(f"{where}: {name!r} is already listed on line {first_line[name]}; give each model one row")
        try:
            kind = ArtifactKind(cell["kind"].lower())
        except ValueError:
            raise WorkloadError(
                f"{where}: kind {cell['kind']!r} of {name!r} is not checkpoint or lora (the simulator replays "
                f"checkpoints with LoRAs; leave other files out)"
            ) from None
        try:
            size = parse_size(cell["size"])
        except ValueError as exc:
            raise WorkloadError(f"{where}: size of {name!r}: {exc}") from None
        if size <= 0:
            raise WorkloadError(f"{where}: size of {name!r} must be more than 0 bytes")
        family_text = cell.get("family", "").lower()
        if family_text:
            try:
                family = Family(family_text)
            except ValueError:
                raise WorkloadError(
                    f"{where}: family {cell['family']!r} of {name!r} is not one of {', '.join(f.value for f in Family)}"
                ) from None
        else:
            family = Family.SDXL if kind is ArtifactKind.CHECKPOINT and size >= 5 * GB else Family.SD15
        inference_s: float | None = None
        if cell.get("inference_s", ""):
            try:
                inference_s = float(cell["inference_s"])
            except ValueError:
                inference_s = math.nan
            if not (math.isfinite(inference_s) and inference_s > 0):
                raise WorkloadError(
                    f"{where}: inference_s of {name!r} is {cell['inference_s']!r}; give seconds per generation (> 0)"
                )
            if kind is not ArtifactKind.CHECKPOINT:
                raise WorkloadError(f"{where}: inference_s is given for the LoRA {name!r}; only checkpoints take it")
        first_line[name] = lineno
        artifacts.append(Artifact(name, kind, family, size, inference_s))
    if not any(a.kind is ArtifactKind.CHECKPOINT for a in artifacts):
        raise WorkloadError(f"{source}: no checkpoint rows; a trace needs at least one checkpoint to replay")
    return Catalog(tuple(artifacts))


def write_catalog_csv(catalog: Catalog) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "kind", "size", "family", "inference_s"])
    for a in catalog.artifacts:
        writer.writerow([a.name, a.kind.value, a.size_bytes, a.family.value, "" if a.inference_s is None else f"{a.inference_s:g}"])
    return out.getvalue()


def _parse_time(text: str) -> tuple[float, bool]:
    """(seconds, whether it was a timestamp)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"time {text!r} is not a finite number of seconds")
        return value, False
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"time {text!r} is neither seconds nor an RFC 3339 timestamp (2024-05-01T12:00:03Z)"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp(), True


def read_trace_csv(
    lines: Iterable[str], *, catalog: Catalog, duration_s: float | None = None, source: str = "trace"
) -> Trace:
    """Parse a trace CSV (see `TRACE_HELP`); raises `WorkloadError` naming the line.

    Every name must be in `catalog`; rows are sorted by time. A trace of timestamps is
    shifted so that its earliest request is at 0.
    """
    rows: list[tuple[float, int, str, tuple[str, ...]]] = []
    stamped: tuple[bool, int] | None = None
    for lineno, row in _rows(lines):
        where = f"{source} line {lineno}"
        if not rows and row[0].lower() in {"time", "time_s", "timestamp"}:
            continue  # the header
        if len(row) < 2 or not row[1]:
            raise WorkloadError(f"{where}: expected 'time_s,model[,loras]', got {','.join(row)!r}")
        if len(row) > 3:
            raise WorkloadError(
                f"{where}: {len(row)} cells; expected 'time_s,model,loras' with LoRAs separated by ';', not ','"
            )
        try:
            t, is_stamp = _parse_time(row[0])
        except ValueError as exc:
            raise WorkloadError(f"{where}: {exc}") from None
        if not is_stamp and t < 0:
            raise WorkloadError(f"{where}: time {row[0]!r} is negative; seconds count from the start of the replay")
        if stamped is None:
            stamped = (is_stamp, lineno)
        elif stamped[0] != is_stamp:
            raise WorkloadError(
                f"{where}: the time is {'a timestamp' if is_stamp else 'in seconds'} but line {stamped[1]} gave "
                f"{'seconds' if is_stamp else 'a timestamp'}; use one form for the whole trace"
            )
        model = row[1]
        loras = tuple(x.strip() for x in (row[2] if len(row) > 2 else "").split(";") if x.strip())
        for name in (model, *loras):
            if name not in catalog.by_name:
                raise WorkloadError(
                    f"{where}: {name!r} is not in the catalog; add a row for it to the catalog or fix the name"
                )
        if catalog[model].kind is not ArtifactKind.CHECKPOINT:
            raise WorkloadError(f"{where}: {model!r} is a {catalog[model].kind}, not a checkpoint; the model column names the checkpoint")
        for name in loras:
            if catalog[name].kind is not ArtifactKind.LORA:
                raise WorkloadError(f"{where}: {name!r} in the loras column is a {catalog[name].kind}, not a LoRA")
        if len(set(loras)) != len(loras):
            raise WorkloadError(f"{where}: a LoRA is named twice in {row[2]!r}")
        rows.append((t, lineno, model, loras))
    if not rows:
        raise WorkloadError(f"{source}: no requests; expected rows of 'time_s,model[,loras]'")
    rows.sort(key=lambda r: (r[0], r[1]))
    origin = rows[0][0] if stamped is not None and stamped[0] else 0.0
    jobs = tuple(
        JobRequest(job_id=i, submit_s=t - origin, model=m, loras=ls) for i, (t, _, m, ls) in enumerate(rows)
    )
    end = duration_s if duration_s is not None else jobs[-1].submit_s
    return Trace(catalog=catalog, jobs=jobs, duration_s=end)


def write_trace_csv(jobs: Sequence[JobRequest]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["time_s", "model", "loras"])
    for job in jobs:
        writer.writerow([f"{job.submit_s:.3f}", job.model, ";".join(job.loras)])
    return out.getvalue()
