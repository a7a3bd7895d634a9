"""Model source health: when a ModelCache's source counts as Failed (pure, no I/O).

Agents report fetch failures in two places: CacheAgent status.modelFailures (prefetches
of held copies, and job downloads that cannot succeed) and a job's attempt failure
(a job download that failed, recorded in the job's history). One failure, even a
permanent-looking one, may be the agent's fault (its network, its disk); many
failures on many agents are the source's. The verdict:

- Failed when an agent reports a non-retryable failure (checksum mismatch, 404, ...)
  that it still stands by (or that a job recorded within `window_s`), or when retryable failures (5xx, timeouts, refused
  connections) pile up within `window_s`: on at least `min_agents` distinct agents, or
  `min_failures` times in all (a one-agent fleet must also give up eventually);
- never Failed while some Ready agent has a copy on disk: a copy proves the bytes can
  be had (or were baked in), and jobs can run there. This is also the recovery path:
  once a copy appears the condition clears; retryable failures also age out of the
  window, after which new jobs try again.

The ModelCache's jobs then fail with ModelUnavailable instead of spending their
attempts, and the replica planner orders no new copies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

__all__ = [
    "FetchFailure",
    "RETRYABLE_SOURCE_REASONS",
    "SOURCE_FAILURE_REASONS",
    "SourceHealthSettings",
    "SourceVerdict",
    "plan_source_health",
]

RETRYABLE_SOURCE_REASONS = frozenset({"HTTPServerError", "HTTPTooManyRequests", "ConnectionFailed", "Timeout"})
"""Fetch failures the source may recover from (agent/download.py retries these)."""

SOURCE_FAILURE_REASONS = RETRYABLE_SOURCE_REASONS | frozenset({
    # Not retryable: the source or the ModelCache is wrong.
    "ChecksumMismatch", "SizeMismatch", "HTTPNotFound", "HTTPForbidden", "HTTPUnauthorized", "HTTPClientError",
    "InvalidHeader", "PickleRefused", "URLNotAllowed", "TooManyRedirects", "SizeUnknown",
})
"""Attempt-failure reasons that blame the model's source rather than the agent or the job."""


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


@dataclass(frozen=True, slots=True)
class SourceHealthSettings:
    window_s: float = 600.0
    """Retryable failures older than this are forgotten."""
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


def plan_source_health(
    failures: Iterable[FetchFailure],
    *,
    with_copy: Collection[str],
    now: float,
    settings: SourceHealthSettings = SourceHealthSettings(),
) -> dict[str, SourceVerdict]:
    """Model key -> verdict for every model whose source counts as Failed now.

    `with_copy`: model keys that some Ready agent has on disk (never Failed)."""
    by_model: dict[str, list[FetchFailure]] = {}
    for f in failures:
        if f.model in with_copy:
            continue
        if f.retryable or not f.standing:
            if now - f.at > settings.window_s:
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
                                       len(fs), len({f.agent for f in fs}))
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
