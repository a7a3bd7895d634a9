"""Metric labels come from fixed sets, and the dashboard names only metrics the code exports."""

from __future__ import annotations

import ast
import json
import pathlib
import re

from prometheus_client import CollectorRegistry

from stoker import metrics as shared
from stoker.agent.download import DownloadFailure
from stoker.agent.metrics import AgentMetrics
from stoker.agent.runner.base import Reason as RunnerReason
from stoker.operator import jobstate
from stoker.operator import metrics as operator_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "stoker" / "dashboards" / "stoker-fleet.json"
METRIC = re.compile(r"\bstoker_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose, labelled families without children included."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def code_reasons() -> set[str]:
    """Reason strings the agent and operator write: the first argument of failures they raise
    (JobFailed("ModelNotFound", ...), DiskStoreError("SourceChanged", ...), ...) and the values of
    their reason enums."""
    found = {str(v) for enum in (DownloadFailure, RunnerReason, jobstate.Reason) for v in enum}
    for path in [*(REPO / "agent").rglob("*.py"), *(REPO / "operator").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            first = node.args[0]
            if name.endswith(("Error", "Failed")) and isinstance(first, ast.Constant) and isinstance(first.value, str) \
                    and re.fullmatch(r"[A-Z][A-Za-z]+", first.value):
                found.add(first.value)
    return found


def test_every_reason_the_code_writes_is_a_known_label_value() -> None:
    missing = code_reasons() - shared.FAILURE_REASONS
    assert not missing, f"add these to stoker.metrics.FAILURE_REASONS, or their failures count as 'other': {missing}"


def test_free_text_reasons_become_other() -> None:
    assert shared.reason_label("InsufficientVRAM") == "InsufficientVRAM"
    assert shared.reason_label(DownloadFailure.TIMEOUT) == "Timeout"
    for text in ("my custom node exploded", "InsufficientVRAM ", "", None, "x" * 10_000):
        assert shared.reason_label(text) == shared.OTHER


def test_a_download_failure_with_an_unknown_reason_is_counted_as_other() -> None:
    metrics = AgentMetrics()
    metrics.count_download_failure("Something new from a plugin")
    metrics.count_download_failure(DownloadFailure.CHECKSUM_MISMATCH)
    assert metrics.value("stoker_agent_download_failures_total", {"reason": "other"}) == 1
    assert metrics.value("stoker_agent_download_failures_total", {"reason": "ChecksumMismatch"}) == 1


def test_both_components_publish_build_info() -> None:
    from stoker import __version__

    agent = AgentMetrics()
    for registry, component in ((agent.registry, "agent"), (operator_metrics.REGISTRY, "operator")):
        [sample] = [s for f in registry.collect() if f.name == "stoker_build_info" for s in f.samples]
        assert sample.value == 1 and sample.labels["component"] == component
        assert sample.labels["version"] == __version__


def test_the_job_tier_is_counted_once_not_in_a_per_job_duplicate() -> None:
    assert not any("job_cache_tier" in name for name in exported_names(AgentMetrics().registry))


def test_the_dashboard_names_only_metrics_the_code_exports() -> None:
    exported = exported_names(AgentMetrics().registry) | exported_names(operator_metrics.REGISTRY)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    named = {m for expr in exprs for m in METRIC.findall(expr)}
    assert named, "no metric found in the dashboard"
    assert named <= exported, f"the dashboard uses metrics nobody exports: {sorted(named - exported)}"
    for variable in dashboard["templating"]["list"]:
        assert set(METRIC.findall(json.dumps(variable))) <= exported


def test_jobs_by_phase_and_the_oldest_pending_age_are_read_from_the_state_at_scrape_time() -> None:
    from stoker.operator.state import State

    state = State()
    for name, phase, created in (("a", "Pending", "2020-01-01T00:00:00Z"), ("b", "Pending", "2030-01-01T00:00:00Z"),
                                 ("c", "Succeeded", "2020-01-01T00:00:00Z")):
        state.upsert_job({"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                          "metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "1",
                                       "creationTimestamp": created},
                          "spec": {"model": "m", "params": {"prompt": "p"}}, "status": {"phase": phase}})
    operator_metrics.watch_state(state)
    try:
        reg = operator_metrics.REGISTRY
        assert reg.get_sample_value("stoker_jobs", {"phase": "Pending"}) == 2
        assert reg.get_sample_value("stoker_jobs", {"phase": "Succeeded"}) == 1
        assert reg.get_sample_value("stoker_jobs", {"phase": "Running"}) == 0
        assert reg.get_sample_value("stoker_oldest_pending_job_age_seconds") > 5 * 365 * 86400
    finally:
        operator_metrics.watch_state(None)


def test_a_job_is_counted_as_finished_once_when_it_is_seen_to_finish() -> None:
    from stoker.operator.state import State

    def body(phase: str, rv: str) -> dict:
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
                "metadata": {"name": "j", "namespace": "ns", "uid": "u", "resourceVersion": rv,
                             "creationTimestamp": "2020-01-01T00:00:00Z"},
                "spec": {"model": "m", "params": {"prompt": "p"}}, "status": {"phase": phase}}

    reg = operator_metrics.REGISTRY
    before = reg.get_sample_value("stoker_jobs_finished_total", {"phase": "Failed"}) or 0
    state = State()
    state.upsert_job(body("Running", "1"))
    state.upsert_job(body("Failed", "2"))
    state.upsert_job(body("Failed", "3"))  # a later write to a finished job is no second finish
    assert reg.get_sample_value("stoker_jobs_finished_total", {"phase": "Failed"}) == before + 1
    already = State()
    already.upsert_job(body("Failed", "4"))  # finished before this operator saw it: not counted here
    assert reg.get_sample_value("stoker_jobs_finished_total", {"phase": "Failed"}) == before + 1
