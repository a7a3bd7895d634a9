"""The README's main-job command: `stoker demo` brings up its own control plane, the operator and
two agents, serves a small model, runs the jobs and prints where each ran and where the time went."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from PIL import Image

BIN = pathlib.Path(sys.executable).parent


def test_the_demo_runs_every_job_to_a_png_and_prints_the_summary(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "agent-0.log").write_text("a log from an earlier run\n")
    proc = subprocess.run([str(BIN / "stoker"), "demo", "--jobs", "3", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 of 3 jobs succeeded" in proc.stdout
    # Metrics are on: the URLs are printed, and the summary comes from the processes' /metrics.
    assert "operator http://127.0.0.1:" in proc.stdout and "agent-1 http://127.0.0.1:" in proc.stdout
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("metrics: jobs bound"))
    bound = re.search(r"at binding: (.*?);", summary).group(1)
    assert sum(int(part.split()[1]) for part in bound.split(", ")) == 3, summary
    header = next(line for line in proc.stdout.splitlines() if line.startswith("JOB "))
    for column in ("AGENT", "HIT", "DOWNLOAD s", "WAIT s", "LOAD s", "BUILD s", "INFER s", "TOTAL s"):
        assert column in header, column
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("demo-")]
    assert [row[0] for row in rows] == ["demo-0", "demo-1", "demo-2"]
    for row in rows:
        assert row[1] == "Succeeded" and row[2] in ("agent-0", "agent-1") and row[3] in ("vram", "ram", "disk", "miss")
        with Image.open(row[-1]) as image:
            assert image.size == (128, 128)
    # Each run writes fresh logs, and the agents stop before the control plane does.
    log = (out / "agent-0.log").read_text()
    assert "an earlier run" not in log and "Connection refused" not in log
