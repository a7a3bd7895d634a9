"""The user CLI without a cluster: flags to a valid job, status to progress, fleet rows, no torch on its path."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

from stoker.cli import build_parser
from stoker.client import fleet, jobs
from stoker.client.context import CliError


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_submit_flags_become_a_generation_job_with_loras_and_weights() -> None:
    args = parse("submit", "--model", "sd15", "--prompt", "a fox", "--lora", "style:0.8", "--lora", "ink",
                 "--steps", "12", "--seed", "7", "--wait", "-o", "out.png", "-n", "team-a")
    body = jobs.build_job(args)
    assert body["metadata"] == {"generateName": "sd15-"}
    assert body["spec"] == {"model": "sd15", "params": {"prompt": "a fox", "steps": 12, "seed": 7},
                            "loras": [{"name": "style", "weight": 0.8}, {"name": "ink"}]}
    assert args.namespace == "team-a" and args.output == "out.png" and args.wait


def test_a_bad_lora_weight_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parse("submit", "--model", "m", "--prompt", "p", "--lora", "style:heavy")
    assert exc.value.code == 2


def test_a_job_the_api_would_refuse_is_refused_before_it_is_sent() -> None:
    with pytest.raises(CliError) as exc:
        jobs.build_job(parse("submit", "--model", "m", "--prompt", "p", "--width", "100"))
    assert exc.value.code == 2 and "width" in str(exc.value)


@pytest.mark.parametrize(("status", "expected"), [
    ({}, ("Pending: waiting for an agent", None, None)),
    ({"phase": "Pending", "reason": "NoReadyAgent"}, ("Pending: NoReadyAgent", None, None)),
    ({"phase": "Scheduled", "stage": "Queued"}, ("Queued", None, None)),
    ({"phase": "Running", "stage": "Downloading", "progress": {"downloadedBytes": 25, "downloadBytes": 100}},
     ("Downloading", 25.0, 100.0)),
    ({"phase": "Running", "stage": "Loading"}, ("Loading", None, None)),
    ({"phase": "Running", "stage": "Generating", "progress": {"step": 7, "steps": 20}},
     ("Generating step 7/20", 7.0, 20.0)),
    ({"phase": "Succeeded"}, ("Succeeded", 1.0, 1.0)),
])
def test_the_progress_bar_follows_the_stage(status: dict, expected: tuple) -> None:
    assert jobs.describe(status) == expected


def test_follow_returns_the_finished_job_and_none_when_the_watch_ends_first() -> None:
    from rich.console import Console

    seen = [{"status": {"phase": "Running", "stage": "Generating", "progress": {"step": s, "steps": 3}}} for s in range(3)]
    done = {"status": {"phase": "Succeeded"}}
    console = Console(file=io.StringIO())
    assert jobs.follow(None, "j", timeout_s=1, console=console, events=lambda *a: iter([*seen, done])) is done  # type: ignore[arg-type]
    assert jobs.follow(None, "j", timeout_s=1, console=console, events=lambda *a: iter(seen)) is None  # type: ignore[arg-type]


def agent(name: str, **status: object) -> dict:
    return {"metadata": {"name": name}, "spec": {"cordon": name == "b"}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}], "slots": 1, **status}}


def test_top_rows_count_busy_and_queued_slots_downloads_and_hot_models() -> None:
    rows = fleet.agent_rows([
        agent("a", running=[{"name": "j1", "attempt": 1}, {"name": "j2", "attempt": 1}],
              vram={"usedBytes": 3 << 30, "budgetBytes": 8 << 30},
              downloads=[{"name": "xl", "bytesDone": 50, "bytesTotal": 200}],
              models=[{"name": "sd", "tier": "vram", "sizeBytes": 1}, {"name": "xl", "tier": "disk", "sizeBytes": 1}]),
        agent("b")])
    a, b = rows
    assert (a["busy"], a["slots"], a["queued"]) == (1, 1, 1)
    assert a["vram"] == "3.0 GiB/8.0 GiB" and a["downloads"] == [{"model": "xl", "percent": 25}] and a["hot"] == ["sd"]
    assert b["cordoned"] and b["busy"] == 0 and b["hot"] == []


def test_model_rows_show_copies_targets_and_unknown_sizes() -> None:
    rows = fleet.model_rows([{"metadata": {"name": "sd"}, "spec": {"replicas": 2, "hotReplicas": 1},
                              "status": {"copies": {"disk": 2, "vram": 1}, "desiredReplicas": 3,
                                         "demandJobsPerMinute": 4.5}}])
    assert rows[0] | {} == {"model": "sd", "kind": "checkpoint", "ready": "Unknown", "size": "unknown", "disk": 2,
                            "ram": 0, "vram": 1, "replicas": 2, "desired": 3, "hotReplicas": 1, "demand": 4.5,
                            "failed": False}


def test_the_cli_and_the_api_types_import_without_torch() -> None:
    code = ("import sys, stoker.cli, stoker.client.cli, stoker.client.jobs, stoker.client.fleet, "
            "stoker.client.results, stoker.api, stoker.api.conditions; "
            "stoker.cli.build_parser(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
