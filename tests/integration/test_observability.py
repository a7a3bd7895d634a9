"""The observability kit checked with Prometheus's own tool: promtool accepts the chart's alert
rules and the /metrics output of a running operator and agent, the alerts fire when they should,
and the dashboard and rules name only metrics those processes export."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import urllib.request

import pytest
import yaml

from stoker import kube
from stoker.testing.operator_harness import Process, operator_process, real_agent_process, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"
DASHBOARD = CHART / "dashboards" / "stoker-fleet.json"
METRIC = re.compile(r"\bstoker_[a-z0-9_]+\b")
SERVING = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")


def rules(helm: str, *sets: str, namespace: str = "ml") -> dict:
    """The chart's PrometheusRule as a plain Prometheus rules file."""
    args = [arg for s in ("metrics.prometheusRule.enabled=true", *sets) for arg in ("--set", s)]
    out = subprocess.run([helm, "template", "stoker", str(CHART), "--namespace", namespace, *args,
                          "--show-only", "templates/prometheusrule.yaml"], check=True, capture_output=True, text=True)
    return {"groups": yaml.safe_load(out.stdout)["spec"]["groups"]}


def rule_exprs(doc: dict) -> list[str]:
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


@pytest.mark.parametrize("monitor", ["serviceMonitor", "podMonitor", None])
def test_promtool_check_rules_accepts_the_chart_rules(helm: str, promtool: str, tmp_path: pathlib.Path,
                                                       monitor: str | None) -> None:
    path = tmp_path / "stoker-rules.yaml"
    path.write_text(yaml.safe_dump(rules(helm, *([f"metrics.{monitor}.enabled=true"] if monitor else []))))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    print(f"$ promtool check rules ({monitor or 'no monitor'})\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


OP = 'namespace="ml",job="stoker-operator-metrics",pod="op-a"'
OP_LABELS = {"namespace": "ml", "job": "stoker-operator-metrics"}
SERIES = [
    # Two operator replicas: neither holds the Lease.
    (f'stoker_leader{{{OP}}}', "0x30"),
    ('stoker_leader{namespace="ml",job="stoker-operator-metrics",pod="op-b"}', "0x30"),
    # 10 agents; 5 of them stop renewing at minute 5.
    (f"stoker_agents{{{OP}}}", "10x30"),
    (f"stoker_ready_agents{{{OP}}}", "10x4 5x26"),
    # 5 jobs succeed and 2 fail every minute: 29 % failed.
    (f'stoker_jobs_finished_total{{{OP},phase="Succeeded"}}', "0+5x60"),
    (f'stoker_jobs_finished_total{{{OP},phase="Failed"}}', "0+2x60"),
    # The oldest pending job waits a minute longer every minute.
    (f"stoker_oldest_pending_job_age_seconds{{{OP}}}", "0+60x30"),
    (f"stoker_source_failed_models{{{OP}}}", "0x4 2x26"),
    ('stoker_agent_download_failures_total{namespace="ml",job="stoker-agent-metrics",pod="agent-0",'
     'reason="InsufficientCache"}', "0x4 1+1x26"),
    # Other download failures are no sign of a full cache.
    ('stoker_agent_download_failures_total{namespace="ml",job="stoker-agent-metrics",pod="agent-1",reason="Timeout"}',
     "0+1x30"),
]
# alert: (last minute it must not fire, first minute it must, its labels, its description there)
ALERTS = {
    "StokerNoLeader": ("4m", "6m", {**OP_LABELS, "severity": "critical"},
                       "No operator of stoker-operator-metrics in namespace ml has held the leader Lease for 5 "
                       "minutes, so no job is scheduled. Check the operator pods and their logs."),
    "StokerAgentsNotReady": ("14m", "16m", {**OP_LABELS, "severity": "warning"},
                             "Only 50% of the CacheAgents in namespace ml renew their Lease; jobs move off the others. "
                             "Check the agent pods (kubectl get cacheagents)."),
    "StokerJobFailureRatioHigh": ("9m", "20m", {**OP_LABELS, "severity": "warning"},
                                  "28.57% of the GenerationJobs that finished in namespace ml in the last 30 minutes "
                                  "failed. Their status.reason says why (kubectl get gj); stoker_job_failures_total "
                                  "and stoker_requeues_total count the reasons."),
    "StokerPendingJobTooOld": ("19m", "21m", {**OP_LABELS, "severity": "warning"},
                               "The oldest pending GenerationJob in namespace ml has waited 21m 0s. Too few Ready "
                               "agents, or none large enough for its models: see its Events (kubectl describe gj)."),
    "StokerModelSourceFailed": ("8m", "10m", {**OP_LABELS, "severity": "warning"},
                                "2 ModelCache(s) in namespace ml have a Failed source; their jobs fail with "
                                "ModelUnavailable. kubectl get mc shows which; their Failed condition says why."),
    "StokerAgentDiskCacheFull": ("4m", "6m", {"namespace": "ml", "pod": "agent-0", "severity": "warning"},
                                 "Agent agent-0 in namespace ml refused downloads in the last 15 minutes because its "
                                 "disk cache is full of models in use, held as replicas or baked in. Raise "
                                 "agent.cache.budget, add agents, or lower ModelCache replicas."),
}


def alert_tests(rule_doc: dict) -> dict:
    summaries = {r["alert"]: r["annotations"]["summary"] for g in rule_doc["groups"] for r in g["rules"]}
    cases = []
    for alert, (quiet, firing, labels, description) in ALERTS.items():
        cases.append({"eval_time": quiet, "alertname": alert, "exp_alerts": []})
        cases.append({"eval_time": firing, "alertname": alert, "exp_alerts": [{
            "exp_labels": labels, "exp_annotations": {"summary": summaries[alert], "description": description}}]})
    return {"rule_files": ["stoker-rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in SERIES],
        "alert_rule_test": cases}]}


def test_promtool_test_rules_shows_each_alert_firing_when_it_should_and_not_before(
        helm: str, promtool: str, tmp_path: pathlib.Path) -> None:
    rule_doc = rules(helm, "metrics.serviceMonitor.enabled=true")
    assert set(ALERTS) == {r["alert"] for g in rule_doc["groups"] for r in g["rules"]}, "an alert without a test"
    (tmp_path / "stoker-rules.yaml").write_text(yaml.safe_dump(rule_doc))
    (tmp_path / "stoker-rules.test.yaml").write_text(yaml.safe_dump(alert_tests(rule_doc), sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", "stoker-rules.test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True)
    print(f"$ promtool test rules\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exported(text: str) -> set[str]:
    """Every sample name the exposition can carry, from its # TYPE lines (labelled metrics that
    have no series yet included)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        names |= {"counter": {f"{base}_total", f"{base}_created"},
                  "histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"},
                  }.get(kind, {base})
    return names


def scrape_port(proc: Process) -> int:
    match = wait_for(lambda: SERVING.search(proc.log_path.read_text()), timeout_s=120,
                     message=lambda: "the metrics endpoint\n" + proc.tail())
    return int(match.group(1))


def test_live_metrics_pass_promtool_and_carry_every_metric_the_dashboard_and_rules_name(
        helm: str, promtool: str, control_plane, namespace: str, api_client, tmp_path: pathlib.Path) -> None:
    objects = kube.Objects(api_client, namespace)
    # --metrics-port 0 (in both harnesses): each process picks a free port and logs it.
    op = operator_process(control_plane.kubeconfig, namespace, tmp_path / "operator.log").start()
    agent = real_agent_process(control_plane.kubeconfig, objects, "agent-metrics", tmp_path).start()
    try:
        texts = {}
        for name, proc in (("operator", op), ("agent", agent)):
            port = scrape_port(proc)
            wait_for(lambda: "stoker_leader 1.0" in urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode() or name == "agent", timeout_s=60,
                message="the operator to lead")
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            texts[name] = text
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            families = len(re.findall(r"^# TYPE stoker_", text, flags=re.M))
            print(f"$ curl -s http://127.0.0.1:{port}/metrics | promtool check metrics   # {name}, "
                  f"{families} stoker_ families\n{check.stdout}{check.stderr}(exit {check.returncode})")
            assert check.returncode == 0, check.stdout + check.stderr
            assert re.search(rf'^stoker_build_info{{component="{name}",python="[0-9.]+",version="[^"]+"}} 1\.0$',
                             text, flags=re.M), text[:2000]
        names = exported(texts["operator"]) | exported(texts["agent"])
        dashboard = json.loads(DASHBOARD.read_text())
        used = {"dashboard": {m for p in dashboard["panels"] for t in p.get("targets", [])
                              for m in METRIC.findall(t["expr"])},
                "rules": {m for e in rule_exprs(rules(helm)) for m in METRIC.findall(e)}}
        for where, metrics in used.items():
            assert metrics, where
            assert metrics <= names, f"the {where} names metrics no process exports: {sorted(metrics - names)}"
        # Labels only from fixed sets: no agent-written reason reaches a label unmapped.
        assert "stoker_agent_job_cache_tier" not in texts["agent"]
    finally:
        agent.stop()
        op.stop()
