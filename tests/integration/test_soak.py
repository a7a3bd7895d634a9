"""The chaos soak's short version: real control plane, 2 operators, 4 agents, faults all along.

Runs `bench/soak.py --short` (its own control plane: it restarts kube-apiserver) and asserts
its invariants: no job lost, no duplicate result, no disk budget overrun, no partial file
reported, no secret leaked, and every failure explained by an injected fault.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_short_chaos_soak_keeps_every_invariant(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--short", "--no-write", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    print(proc.stdout[-6000:], proc.stderr[-4000:])
    assert out.exists(), f"the soak did not finish (exit {proc.returncode})"
    r = json.loads(out.read_text())
    assert r["jobs"] > 0 and r["succeeded"] > 0
    assert r["faults"].get("kube-apiserver restart") == 1 and sum(r["faults"].values()) >= 5, r["faults"]
    assert r["lost"] == [], "jobs never finished"
    assert r["duplicates"] == [] and r["result_mismatches"] == []
    assert r["overruns"] == [], "an agent's disk went over its budget"
    assert r["partial"] == [], "a copy was reported that is not a complete, verified file"
    assert r["leaks"] == [], "the model server's token appeared in logs, statuses or Events"
    assert r["unexplained"] == [], "a job failed for no fault the soak injected"
    assert r["requeue_missed"] == [], "a job stayed bound to a killed agent"
    assert proc.returncode == 0
