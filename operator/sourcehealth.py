"""Model source health: when a ModelCache's source counts as Failed (pure, no I/O).

Agents report fetch failures in two places: CacheAgent status.modelFailures (prefetches
of held copies, and job downloads that cannot succeed) and a job's attempt failure
(a job download that failed, recorded in the job's history). One failure, even a
permanent-looking one, may be the agent's fault (its network, its disk); many
failures on many agents are the source's. The verdict:

- only failures of the current ModelCache count: one reported for an earlier ModelCache
  of the same name (another uid) or an earlier spec (another generation) blames a source
  that is gone. Failures that carry no uid and generation (job history) count only when
  they happened after the current spec took effect (`ModelIdentity.spec_since`);
- Failed when an agent reports a non-retryable failure (checksum mismatch, 404, ...)
  that it still stands by and that is younger than `permanent_max_age_s` (or that a job
  recorded within `window_s`), or when retryable failures (5xx, timeouts, refused
  connections) pile up within `window_s`: on at least `min_agents` distinct agents, or
  `min_failures` times in all (a one-agent fleet must also give up eventually);
- never Failed while some Ready agent has a copy on disk: a copy proves the bytes can
  be had (or were baked in), and jobs can run there.

Recovery: a copy appearing clears the condition at once, and so does a new ModelCache
or a changed spec. Otherwise failures age out (retryable ones after `window_s`,
permanent ones after `permanent_max_age_s`, the time after which something outside the
ModelCache, such as a Secret or the server, may have been fixed); then new jobs try
the source again, and fail it again if it is still bad. An agent that retries a held
copy refreshes its failure on every try, so a source that stays bad stays Failed.

The ModelCache's jobs then fail with ModelUnavailable instead of spending their
attempts, and the replica planner orders no new copies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "FetchFailure",
    "ModelIdentity",
    "RETRYABLE_SOURCE_REASONS",
    "SOURCE_FAILURE_REASONS",
    "SourceHealthSettings",
    "SourceVerdict",
    "TOO_LARGE",
    "plan_oversize",
    "plan_source_health",
]

RETRYABLE_SOURCE_REASONS = frozenset({"HTTPServerError", "HTTPTooManyRequests", "ConnectionFailed", "Timeout"})
"""Fetch failures the source may recover from (agent/download.py retries these)."""

SOURCE_FAILURE_REASONS = RETRYABLE_SOURCE_REASONS | frozenset({
    # Not retryable: the source or the ModelCache is wrong.
    "ChecksumMismatch", "SizeMismatch", "HTTPNotFound", "HTTPForbidden", "HTTPUnauthorized", "HTTPClientError",
    "InvalidHeader", "InvalidSafetensors", "PickleRefused", "URLNotAllowed", "TooManyRedirects", "SizeUnknown",
    # The ModelCache names a credential the fleet does not allow (for that host): the same on every agent.
    "CredentialNotAllowed", "CredentialHostNotAllowed",
})
"""Failure reasons that blame the model's source rather than the agent or the job: each is an
answer from the source itself (a status, a size, bytes that do not verify) or a refusal of
what it sent. Local faults of an agent (DiskFull, DiskError, OutOfMemory), capacity
(InsufficientCache) and anything else an agent reports are never counted."""


@dataclass(frozen=True, slots=True)
class FetchFailure:
    """One observed failure to fetch or verify a model."""

    model: str
    """Model key (e.g. "namespace/name")."""
    agent: str
    reason: str
    message: str = ""
    retryable: bool = True
    at: float = 0.0
    """When it happened, on the caller's clock."""
    standing: bool = False
    """Still in the agent's current report (status.modelFailures), not only in history."""
    model_uid: str | None = None
    """metadata.uid of the ModelCache the failure was about, when the agent said so."""
    model_generation: int | None = None
    """metadata.generation of that ModelCache, when the agent said so."""


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The current ModelCache of a model key."""

    uid: str
    generation: int
    spec_since: float | None = None
    """When its current spec took effect, on the failures' clock (None: unknown). Failures
    without a uid and generation from before this time were about an earlier source."""


@dataclass(frozen=True, slots=True)
class SourceHealthSettings:
    window_s: float = 600.0
    """Retryable failures, and failures only in job history, older than this are forgotten."""
    permanent_max_age_s: float = 3600.0
    """Non-retryable failures an agent still reports are forgotten this long after they
    happened (a Secret or the server may have been fixed since); agents that retry refresh them."""
    min_agents: int = 3
    """Distinct agents with retryable failures within the window that make the source Failed."""
    min_failures: int = 6
    """Retryable failures within the window (any agents) that make the source Failed."""


@dataclass(frozen=True, slots=True)
class SourceVerdict:
    reason: str
    """The most frequent failure reason (the latest one on a tie)."""
    message: str
    failures: int
    agents: int
    permanent: bool = False
    """Failed by a non-retryable failure (else by retryable ones piling up)."""


def plan_source_health(
    failures: Iterable[FetchFailure],
    *,
    with_copy: Collection[str],
    now: float,
    models: Mapping[str, ModelIdentity] | None = None,
    settings: SourceHealthSettings = SourceHealthSettings(),
) -> dict[str, SourceVerdict]:
    """Model key -> verdict for every model whose source counts as Failed now.

    `with_copy`: model keys that some Ready agent has on disk (never Failed).
    `models`: the current ModelCache of each key; failures of a key not in it are taken
    as they are (a model not observed yet, or deleted)."""
    models = models or {}
    by_model: dict[str, list[FetchFailure]] = {}
    for f in failures:
        if f.model in with_copy or not is_current(f, models.get(f.model)):
            continue
        max_age_s = settings.permanent_max_age_s if f.standing and not f.retryable else settings.window_s
        if now - f.at > max_age_s:
            continue
        by_model.setdefault(f.model, []).append(f)
    out: dict[str, SourceVerdict] = {}
    for model in sorted(by_model):
        fs = sorted(by_model[model], key=lambda f: (f.at, f.agent, f.reason))
        permanent = [f for f in fs if not f.retryable]
        retryable = [f for f in fs if f.retryable]
        agents = {f.agent for f in retryable}
        if permanent:
            last = permanent[-1]
            out[model] = SourceVerdict(last.reason, last.message or f"agent {last.agent} reported {last.reason}",
                                       len(fs), len({f.agent for f in fs}), permanent=True)
        elif retryable and (len(agents) >= settings.min_agents or len(retryable) >= settings.min_failures):
            counts: dict[str, int] = {}
            for f in retryable:
                counts[f.reason] = counts.get(f.reason, 0) + 1
            reason = max(counts, key=lambda r: (counts[r], max(f.at for f in retryable if f.reason == r)))
            last = retryable[-1]
            minutes = settings.window_s / 60
            out[model] = SourceVerdict(
                reason,
                f"{len(retryable)} fetch failures on {len(agents)} agent(s) in the last {minutes:.0f} min "
                f"(last on {last.agent}: {last.reason} {last.message})".strip()[:1000]
                + "; new jobs fail with ModelUnavailable until a copy appears or the failures age out",
                len(retryable), len(agents))
    return out


TOO_LARGE = "TooLarge"


def plan_oversize(
    sizes: Mapping[str, Iterable[int]], *, budgets: Iterable[int], with_copy: Collection[str] = ()
) -> dict[str, SourceVerdict]:
    """Model key -> verdict for every model larger than every agent's disk budget (pure).

    `sizes`: what is known of each model's size (its spec's sizeBytes hint, the size its
    source announced to an agent that could not hold it); the largest counts. `budgets`:
    the disk budgets of the Ready agents (none known: no verdict). A model some agent holds
    (baked in, or on a bigger disk) is never too large."""
    largest = max((b for b in budgets if b > 0), default=0)
    if largest <= 0:
        return {}
    out: dict[str, SourceVerdict] = {}
    for model in sorted(sizes):
        size = max(sizes[model], default=0)
        if size > largest and model not in with_copy:
            out[model] = SourceVerdict(
                TOO_LARGE,
                f"it is {size} bytes, more than the largest disk budget of any Ready agent ({largest} bytes); "
                "give agents a larger disk budget (agent.cache.budget) or use a smaller model",
                failures=0, agents=0, permanent=True)
    return out


def is_current(failure: FetchFailure, model: ModelIdentity | None) -> bool:
    """Whether `failure` is about `model` as it is now (not an earlier ModelCache or spec)."""
    if model is None:
        return True
    if failure.model_uid is not None and failure.model_uid != model.uid:
        return False
    if failure.model_generation is not None:
        return failure.model_generation == model.generation
    return model.spec_since is None or failure.at >= model.spec_since
