"""bench/gpu_check.sh: its dry run produces every stage and figure; its report judges the targets."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LOADERS = [
    "stoker (mmap) [default]", "stoker (read)", "stoker (read, O_DIRECT)", "safetensors load_file",
    "safetensors safe_open, tensor by tensor", "safetensors load_file to CPU, then .to(device)", "runai-model-streamer",
    "fastsafetensors (no GDS)", "raw pread, 1 thread (ceiling)", "raw mmap + MADV_POPULATE_READ, 16 threads (ceiling)",
]  # fmt: skip
GPU_TARGETS = ["ram_tier_vs_pinned", "page_cache_vs_pinned", "warm_vs_others", "cold_vs_raw", "cold_vs_others", "cuda_tests"]


@pytest.fixture
def check(monkeypatch):
    # Appended, not prepended: the repository's operator/ must not shadow the standard library.
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])
    return importlib.import_module("bench.gpu_check")


# ----------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], pathlib.Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "STOKER_PYTHON")}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=720)  # fmt: skip
    return done, out


@pytest.mark.timeout(900)
class TestDryRun:
    def test_every_stage_runs_and_the_summary_comes_last(self, dry_run):
        done, out = dry_run
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for stage in ("setup", "probe", "tests", "loader", "runner"):
            assert re.search(rf"^gpu-check: {stage} +ok ", done.stdout, re.M), done.stdout
        assert "## GPU figures: dry run on the CPU (no GPU)" in done.stdout
        assert done.stdout.rstrip().splitlines()[-1].startswith("gpu-check: ")

    def test_the_output_folder_holds_json_markdown_and_one_log_per_stage(self, dry_run):
        _, out = dry_run
        names = sorted(p.name for p in out.iterdir())
        assert names == ["gpu-check.json", "gpu-check.md", "loader.log", "runner.log", "setup.log", "tests.log"]
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)  # what a device machine sends back

    def test_the_json_has_every_stage_and_figure(self, dry_run):
        _, out = dry_run
        result = json.loads((out / "gpu-check.json").read_text())
        assert result["schema"] == "stoker.gpu-check/1" and result["mode"] == "dry-run" and result["gpu"] is None
        assert [(s["name"], s["status"]) for s in result["stages"]] == [
            (n, "ok") for n in ("setup", "probe", "tests", "loader", "runner")]
        assert all(s["seconds"] >= 0 and s["timeout_s"] > 0 for s in result["stages"])
        machine = result["machine"]
        assert machine["cuda_available"] is False and machine["missing"] == [] and machine["torch"]

        tests = result["tests"]  # the CUDA tests were collected and skipped, none silently lost
        assert tests["total"] >= 20 and tests["skipped"] == tests["total"] and tests["failed"] == tests["errors"] == 0
        assert "tests/unit/test_loader.py" in result["test_files"]

        loader = result["loader"]
        assert loader["complete"] and loader["file"]["bytes"] > 10**7
        rows = {r["name"]: r for r in loader["loaders"]}
        for name in LOADERS:
            assert rows[name]["error"] is None and rows[name]["warm_error"] is None, rows[name]
            assert rows[name]["warm_gbps"] > 0 and rows[name]["cold_gbps"] > 0, name
        assert loader["ceilings"]["raw_read_cold_gbps"] > 0
        assert loader["ceilings"]["pinned_h2d_gbps"] is None  # no GPU: measured only with --device cuda

        runner = result["runner"]
        assert runner["complete"] and runner["architecture"] == "tiny"
        assert [m["family"] for m in runner["models"]] == ["sd15", "sdxl"]
        for model in runner["models"]:
            assert model["error"] is None and model["params"] > 10**6 and model["file_bytes"] > 10**6
            assert model["write_s"] > 0 and model["load_s"] > 0 and model["build_s"] > 0 and model["load_gbps"] > 0
            assert sorted(i["width"] for i in model["images"]) == [64, 96]
            for image in model["images"]:
                assert image["error"] is None and image["skipped"] is None and image["first_s"] > 0
                assert image["steps"] == 2 and image["median_s"] > 0

        targets = {t["key"]: t for t in result["targets"]}
        assert list(targets) == GPU_TARGETS
        assert all(t["met"] is None and t["verdict"].startswith("not measured: no CUDA device") for t in targets.values())
        assert result["all_targets_met"] is False

    def test_the_markdown_section_shows_targets_stages_and_every_table(self, dry_run):
        _, out = dry_run
        md = (out / "gpu-check.md").read_text()
        assert md.startswith("## GPU figures: dry run on the CPU (no GPU)\n")
        for heading in ("### Targets", "### Headline figures", "### Stages", "### CUDA tests (`pytest -m gpu`)", "### Loader",
                        "### Runner: real-size architectures from files"):  # fmt: skip
            assert f"\n{heading}" in md, heading
        for name in ("RAM tier -> GPU vs pinned host -> GPU copy", "every CUDA test passes", *LOADERS):
            assert f"| {name} |" in md, name
        assert re.search(r"^\| SD 1\.5 \(tiny\) \| .* \| 64x64 \| 2 \| \d+ ms \| \d+ ms \(1 runs\) \|$", md, re.M), md
        assert re.search(r"^\| SDXL \(tiny\) \| .* \| 64x64 \|", md, re.M)
        assert re.search(r"^\| SDXL \(tiny, \d+ M params\): 96x96, 2 steps \| \d+ ms per image \|$", md, re.M), md
        assert re.search(r"^\| Stoker, cold -> cpu \| \d+\.\d\d GB/s \|$", md, re.M)
        assert "| pinned host -> GPU copy (ceiling) | not measured |" in md
        assert "\n## " not in md.partition("\n")[2]  # the benches' own sections are nested below this one


# ----------------------------------------------------------------------------- the report, from stage outputs


def gpu_loader(**overrides):
    targets = [
        {"key": "ram_tier_vs_pinned", "measured": 0.95, "met": True, "verdict": "met", "detail": "50 vs 53 GB/s"},
        {"key": "page_cache_vs_pinned", "measured": 0.60, "met": False, "verdict": "missed by 20 %", "detail": "32 vs 53"},
        {"key": "cold_vs_raw", "measured": 0.93, "met": True, "verdict": "met", "detail": "3.7 vs 4.0"},
        {"key": "warm_vs_others", "measured": 2.0, "met": True, "verdict": "met", "detail": "32 vs 16"},
        {"key": "cold_vs_others", "measured": 1.2, "met": True, "verdict": "met", "detail": "3.7 vs 3.1"},
    ]  # fmt: skip
    loaders = [
        {"name": "stoker [default]", "default": True, "warm_gbps": 32.0, "cold_gbps": 3.7},
        {"name": "stoker RAM tier -> GPU", "default": False, "warm_gbps": 50.0, "cold_gbps": None},
    ]  # fmt: skip
    ceilings = {"pinned_h2d_gbps": 53.0, "pageable_h2d_gbps": 20.0, "raw_read_cold_gbps": 4.0,
                "raw_read_cold_name": "raw pread, 16 threads (ceiling)"}  # fmt: skip
    return {"device": "cuda", "targets": targets, "loaders": loaders, "ceilings": ceilings, **overrides}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.unit.test_loader.TestCuda" name="test_a"/>
<testcase classname="tests.unit.test_loader.TestCuda" name="test_b"><failure message="AssertionError: 3 != 4&#10;more">trace</failure></testcase>
<testcase classname="tests.unit.test_hot_tiers" name="test_c"><skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.unit.test_weights" name="test_d"><error message="fixture broke">trace</error></testcase>
</testsuite></testsuites>"""


class TestReport:
    def test_junit_counts_each_outcome_and_names_the_failures(self, check, tmp_path):
        (tmp_path / "t.xml").write_text(JUNIT)
        tests = check.parse_junit(tmp_path / "t.xml")
        assert {k: tests[k] for k in ("passed", "failed", "errors", "skipped", "total")} == {
            "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "total": 4}
        assert tests["failures"] == ["tests.unit.test_loader.TestCuda::test_b: AssertionError: 3 != 4",
                                     "tests.unit.test_weights::test_d: fixture broke"]  # fmt: skip
        assert tests["skip_reasons"] == ["needs a CUDA device"]
        assert check.parse_junit(tmp_path / "absent.xml") is None

    def test_gpu_targets_come_from_the_loader_and_the_tests(self, check):
        tests = {"passed": 21, "failed": 0, "errors": 0, "skipped": 0, "total": 21}
        rows = {t["key"]: t for t in check.summarize_targets(tests=tests, tests_stage={"status": "ok"},
                                                               loader=gpu_loader(), cuda=True)}  # fmt: skip
        assert list(rows) == GPU_TARGETS
        assert rows["ram_tier_vs_pinned"]["met"] is True and rows["page_cache_vs_pinned"]["verdict"] == "missed by 20 %"
        assert rows["cold_vs_raw"]["measured"] == 0.93 and rows["cuda_tests"]["verdict"] == "met"

    def test_a_skipped_or_failed_cuda_test_misses_the_target(self, check):
        for tests, stage in (({"passed": 20, "failed": 0, "errors": 0, "skipped": 1, "total": 21}, "ok"),
                             ({"passed": 19, "failed": 2, "errors": 0, "skipped": 0, "total": 21}, "failed")):  # fmt: skip
            row = check.summarize_targets(tests=tests, tests_stage={"status": stage}, loader=gpu_loader(), cuda=True)[-1]
            assert row["met"] is False and row["verdict"].startswith("missed:")
        row = check.summarize_targets(tests=None, tests_stage={"status": "timed out"}, loader=None, cuda=True)[-1]
        assert row["met"] is False and row["verdict"] == "not measured: no test report (stage timed out)"

    def test_a_loader_stage_without_figures_leaves_its_targets_not_measured(self, check):
        rows = check.summarize_targets(tests=None, tests_stage={}, loader=None, cuda=True)
        assert all(r["met"] is None for r in rows[:5])
        assert rows[0]["verdict"] == "not measured: the loader stage did not report it (no figures)"

    def test_a_report_from_a_work_folder_with_a_stage_that_timed_out(self, check, tmp_path):
        (tmp_path / "stages.jsonl").write_text(
            '{"name": "setup", "status": "ok", "rc": 0, "seconds": 1.0, "timeout_s": 60, "log": "setup.log", "reason": null}\n'
            '{"name": "loader", "status": "timed out", "rc": 124, "seconds": 200.0, "timeout_s": 200, "log": "loader.log",'
            ' "reason": "after 200 s"}\n')  # fmt: skip
        (tmp_path / "probe.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "cuda_available": True,
                                                         "machine": "m", "missing": []}))  # fmt: skip
        (tmp_path / "loader.json").write_text(json.dumps(gpu_loader(markdown="## Loader\n\n| a | b |\n")))
        sdxl = {"family": "sdxl", "architecture": "real", "params": 3_468_837_867, "error": None, "load_s": 0.5,
                "load_gbps": 13.9, "build_s": 1.25, "images": [
                    {"width": 1024, "steps": 20, "median_s": 3.2, "error": None, "skipped": None},
                    {"width": 512, "steps": 20, "median_s": None, "error": None, "skipped": "not run: time budget spent"}]}
        (tmp_path / "runner.json").write_text(json.dumps({"models": [sdxl], "markdown": "## Runner: x\n"}))
        result, md = check.build_report(mode="gpu", work=tmp_path, budget_s=470, started_at="now", wall_s=300.0,
                                        test_files=[])  # fmt: skip
        assert [s["status"] for s in result["stages"]] == ["ok", "not run", "not run", "timed out", "not run"]
        assert md.startswith("## GPU figures: NVIDIA H100 80GB HBM3\n") and "| loader | timed out: after 200 s |" in md
        assert "\n### Loader\n" in md and "markdown" not in result["loader"]
        assert result["all_targets_met"] is False
        assert "| Stoker, RAM tier -> GPU | 50.00 GB/s |" in md and "| pinned host -> GPU copy (ceiling) | 53.00 GB/s |" in md
        assert "| SDXL (real, 3469 M params): load from the page cache, then build | 0.50 s (13.90 GB/s), then 1.25 s |" in md
        assert "| SDXL (real, 3469 M params): 1024x1024, 20 steps | 3200 ms per image |" in md
        assert "| SDXL (real, 3469 M params): 512x512, 20 steps | not run: time budget spent |" in md
        assert "### Runner: x" in md and "No figures (see runner.log)" not in md

    def test_record_writes_the_gpu_section_and_the_index_and_refuses_a_dry_run(self, check, tmp_path):
        bench = tmp_path / "BENCHMARKS.md"
        bench.write_text("# Benchmarks\n\n<!-- begin:gpu -->\n" + check.index_section([]) + "<!-- end:gpu -->\n")
        assert "Still to be measured" in bench.read_text()
        run = tmp_path / "run"
        run.mkdir()
        (run / "gpu-check.json").write_text(json.dumps({"mode": "gpu", "gpu": "NVIDIA H200"}))
        (run / "gpu-check.md").write_text("## GPU figures: NVIDIA H200\n\nfigures\n")
        assert check.record(run, benchmarks=bench) == "gpu-nvidia-h200"
        text = bench.read_text()
        assert "<!-- begin:gpu-nvidia-h200 -->\n## GPU figures: NVIDIA H200" in text
        assert "Measured on: `gpu-nvidia-h200`" in text and "Still to be measured" not in text
        (run / "gpu-check.json").write_text(json.dumps({"mode": "dry-run", "gpu": None}))
        with pytest.raises(SystemExit, match="only runs on a CUDA machine are recorded"):
            check.record(run, benchmarks=bench)

    def test_section_names_are_safe_markers(self, check):
        assert check.section_name("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"
        assert check.section_name("NVIDIA H200 (MIG 1g.18gb)") == "gpu-nvidia-h200-mig-1g-18gb"


def test_the_script_explains_itself_and_rejects_unknown_flags():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--fetch-wheels" in done.stdout and "--dry-run" in done.stdout
    assert "set -uo" not in done.stdout
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
