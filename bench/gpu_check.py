"""The Python half of bench/gpu_check.sh: probe the machine, assemble the report, record it.

    python bench/gpu_check.py probe --data-dir DIR --json PATH
    python bench/gpu_check.py report --mode gpu|dry-run --work DIR --out DIR --budget S
    PYTHONSAFEPATH=1 .venv/bin/python bench/gpu_check.py record out/gpu-check   # into BENCHMARKS.md

Only the probe imports torch (inside a function): the report must come out even where
torch or CUDA is broken, since that is then the finding.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

if not __package__:  # run as a file: make `bench` importable, behind the standard library
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report

SCHEMA = "stoker.gpu-check/1"
COMMAND = "bash bench/gpu_check.sh"
STAGES = ("setup", "probe", "tests", "loader", "runner")
"""Every stage the script runs, in order; each appears in the report even when it did not run."""

# Packages the stages import beyond torch and the standard library, by import name.
PACKAGES = {
    "safetensors": "safetensors",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "pydantic": "pydantic",
    "runai_model_streamer": "runai-model-streamer",
    "fastsafetensors": "fastsafetensors",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
}
FOUND_ONLY = {"open_clip": "open_clip_torch"}
"""Located, not imported: the runner reads the CLIP vocabulary file it ships."""


# ----------------------------------------------------------------------------- probe


def probe(data_dir: pathlib.Path) -> dict[str, Any]:
    """What the figures were measured on, and what is missing for the stages to run."""
    out: dict[str, Any] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "machine": report.describe_machine(),
        "load_average": os.getloadavg(),
        "packages": {},
        "missing": [],
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(data_dir)
    out["data_dir"] = {"path": str(data_dir), "free_gb": round(usage.free / 1e9, 1), "filesystem": _filesystem(data_dir)}
    for module, dist in PACKAGES.items():
        try:
            mod = importlib.import_module(module)
            out["packages"][dist] = getattr(mod, "__version__", "installed")
        except Exception as err:  # noqa: BLE001 - a broken package is a finding, not a crash
            out["packages"][dist] = None
            out["missing"].append(f"{dist}: {type(err).__name__}: {err}")
    for module, dist in FOUND_ONLY.items():
        found = importlib.util.find_spec(module) is not None
        out["packages"][dist] = "found" if found else None
        if not found:
            out["missing"].append(f"{dist}: not found")
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = torch.cuda.get_device_name(0)
            out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            out["gpu_capability"] = f"{props.major}.{props.minor}"
            out["cuda_runtime"] = torch.version.cuda
            torch.ones(1, device="cuda").add_(1).item()  # the context starts and a kernel runs
    except Exception as err:  # noqa: BLE001
        out["torch_error"] = f"{type(err).__name__}: {err}"
    out.setdefault("gpu", None)
    out["driver"] = _nvidia_smi("driver_version")
    out["pcie"] = _nvidia_smi("pcie.link.gen.max,pcie.link.width.max")
    return out


def _nvidia_smi(fields: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _filesystem(path: pathlib.Path) -> str | None:
    try:
        done = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=20, check=True)
        fields = done.stdout.splitlines()[-1].split()
        return f"{fields[0]} ({fields[1]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ----------------------------------------------------------------------------- pure: the report


def parse_junit(path: pathlib.Path) -> dict[str, Any] | None:
    """pytest's JUnit XML as counts and the failing tests' names and first message lines."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    skip_reasons: set[str] = set()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skip_reasons.add((outcome.get("message") or "").strip())
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            failures.append(f"{name}: {message[0][:200] if message else outcome.tag}")
    return {**counts, "total": sum(counts.values()), "failures": failures, "skip_reasons": sorted(skip_reasons)}


GPU_TARGETS = [
    ("ram_tier_vs_pinned", "RAM tier -> GPU vs pinned host -> GPU copy", ">= 90 %"),
    ("page_cache_vs_pinned", "page cache -> GPU vs pinned host -> GPU copy", ">= 75 %"),
    ("warm_vs_others", "page cache -> GPU vs every other loader", "above every other"),
    ("cold_vs_raw", "cold (disk -> GPU) vs the raw read of the same file", ">= 90 %"),
    ("cold_vs_others", "cold (disk -> GPU) vs every other loader", "above every other"),
]


def summarize_targets(*, tests: dict[str, Any] | None, tests_stage: dict[str, Any], loader: dict[str, Any] | None,
                      cuda: bool) -> list[dict[str, Any]]:  # fmt: skip
    """The GPU targets from one run: each met, missed (by how much) or not measured (why)."""
    out = []
    by_key = {t["key"]: t for t in (loader or {}).get("targets", [])} if loader and loader.get("device", "").startswith("cuda") else {}
    for key, name, goal in GPU_TARGETS:
        t = by_key.get(key)
        if t is None:
            why = ("no CUDA device (dry run on the CPU)" if not cuda
                   else f"the loader stage did not report it ({'no figures' if loader is None else 'missing'})")  # fmt: skip
            out.append({"key": key, "name": name, "goal": goal, "measured": None, "met": None,
                        "verdict": f"not measured: {why}", "detail": ""})  # fmt: skip
        else:
            out.append({"key": key, "name": name, "goal": goal, "measured": t["measured"], "met": t["met"],
                        "verdict": t["verdict"], "detail": t["detail"]})  # fmt: skip
    name, goal = "every CUDA test passes", "all pass, none skipped"
    if not cuda:
        verdict, met = "not measured: no CUDA device (dry run: the CUDA tests skip)", None
    elif tests is None:
        verdict, met = f"not measured: no test report (stage {tests_stage.get('status', 'not run')})", False
    else:
        bad = tests["failed"] + tests["errors"] + tests["skipped"]
        met = tests["passed"] > 0 and bad == 0 and tests_stage.get("status") == "ok"
        verdict = "met" if met else (f"missed: {tests['failed']} failed, {tests['errors']} errors, "
                                     f"{tests['skipped']} skipped of {tests['total']}")  # fmt: skip
    detail = "" if tests is None else f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped"
    out.append({"key": "cuda_tests", "name": name, "goal": goal, "measured": None, "met": met, "verdict": verdict,
                "detail": detail})  # fmt: skip
    return out


def _pct(x: float | None) -> str:
    return f"{100 * x:.0f} %" if x is not None else "-"


def _demote(markdown: str) -> str:
    """A bench's own section, nested one level down (its '## Title' becomes '### Title')."""
    return re.sub(r"^(#+) ", lambda m: "#" + m[1] + " ", markdown.strip(), flags=re.M)


def _rate(x: float | None) -> str:
    return f"{x:.2f} GB/s" if x is not None else "not measured"


def headline(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures a reader looks for first: the loader's rates and ceilings, then time per image."""
    rows: list[tuple[str, str]] = []
    loader = result.get("loader")
    if loader:
        by_name = {r["name"]: r for r in loader["loaders"]}
        default = next((r for r in loader["loaders"] if r["default"]), None)
        ram = by_name.get("stoker RAM tier -> GPU")
        ceilings = loader["ceilings"]
        rows += [
            ("pinned host -> GPU copy (ceiling)", _rate(ceilings["pinned_h2d_gbps"])),
            ("Stoker, RAM tier -> GPU", _rate(ram and ram["warm_gbps"])),
            (f"Stoker, page cache -> {loader['device']} ({default['name'] if default else '-'})",
             _rate(default and default["warm_gbps"])),
            (f"Stoker, cold -> {loader['device']}", _rate(default and default["cold_gbps"])),
            (f"best raw read, cold ({ceilings['raw_read_cold_name'] or '-'})", _rate(ceilings["raw_read_cold_gbps"])),
        ]  # fmt: skip
    runner = result.get("runner")
    for m in (runner or {}).get("models", []):
        name = f"{'SD 1.5' if m['family'] == 'sd15' else 'SDXL'} ({m['architecture']}, {m['params'] / 1e6:.0f} M params)"
        if m["error"]:
            rows.append((name, m["error"]))
            continue
        load = f"{m['load_s']:.2f} s ({m['load_gbps']:.2f} GB/s)" if m["load_gbps"] else "-"
        build = f"{m['build_s']:.2f} s" if m["build_s"] is not None else "-"
        rows.append((f"{name}: load from the page cache, then build", f"{load}, then {build}"))
        for i in m["images"]:
            value = f"{i['median_s'] * 1000:.0f} ms per image" if i["median_s"] is not None else (i["error"] or i["skipped"] or "-")
            rows.append((f"{name}: {i['width']}x{i['width']}, {i['steps']} steps", value))
    return rows


def render(result: dict[str, Any], *, loader_md: str | None, runner_md: str | None) -> str:
    gpu = result["gpu"]
    title = f"GPU figures: {gpu}" if gpu else "GPU figures: dry run on the CPU (no GPU)"
    probe_ = result.get("machine") or {}
    lines = [
        f"## {title}",
        "",
        f"Command: `{result['command']}` ({result['mode']}, {result['budget_s']} s budget, {result['wall_s']:.0f} s wall), "
        f"{result['started_at']}.",
        f"Machine: {probe_.get('machine', 'unknown')}; interpreter {probe_.get('python', '?')}; torch {probe_.get('torch', '?')}"
        + (f"; {gpu} ({probe_.get('gpu_memory_gib')} GiB, compute {probe_.get('gpu_capability')}, CUDA "
           f"{probe_.get('cuda_runtime')}, driver {probe_.get('driver')}, PCIe gen/width {probe_.get('pcie')})" if gpu else "")
        + f"; data on {(probe_.get('data_dir') or {}).get('filesystem')}; 1-minute load average at start "
        + (f"{probe_['load_average'][0]:.1f}" if probe_.get("load_average") else "?") + ".",
        "",
        "### Targets",
        "",
        "| Target | Goal | Measured | Result |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for t in result["targets"]:
        measured = (f"{_pct(t['measured'])}: {t['detail']}" if t["measured"] is not None else t["detail"]) or "-"
        lines.append(f"| {t['name']} | {t['goal']} | {measured} | {t['verdict']} |")
    lines += ["", "### Headline figures", "", "| Figure | Value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in headline(result)]
    lines += ["", "### Stages", "", "| Stage | Result | Seconds | Timeout (s) | Log |", "|---|---|---:|---:|---|"]
    for s in result["stages"]:
        seconds = f"{s['seconds']:.0f}" if s.get("seconds") is not None else "-"
        reason = f": {s['reason']}" if s.get("reason") else ""
        lines.append(f"| {s['name']} | {s['status']}{reason} | {seconds} | {s.get('timeout_s') or '-'} | {s.get('log') or '-'} |")
    tests = result.get("tests")
    lines += ["", "### CUDA tests (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("No test report.")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped, in {', '.join(result.get('test_files') or []) or 'no files'}.")  # fmt: skip
        lines += [f"- {f}" for f in tests["failures"]]
        if tests["skipped"]:
            lines.append(f"Skipped because: {'; '.join(tests['skip_reasons'])}.")
    missing = probe_.get("missing") or []
    if missing:
        lines += ["", "Missing packages: " + "; ".join(missing)]
    lines += ["", _demote(loader_md) if loader_md else "### Loader\n\nNo figures (see loader.log).", ""]
    lines += [_demote(runner_md) if runner_md else "### Runner\n\nNo figures (see runner.log).", ""]
    return "\n".join(lines)


def build_report(*, mode: str, work: pathlib.Path, budget_s: int, started_at: str, wall_s: float,
                 test_files: list[str]) -> tuple[dict[str, Any], str]:  # fmt: skip
    """gpu-check.json's content and the BENCHMARKS.md section, from what the stages left in `work`."""

    def load(name: str) -> dict[str, Any] | None:
        try:
            return json.loads((work / name).read_text())
        except (OSError, ValueError):
            return None

    recorded = {}
    for line in (work / "stages.jsonl").read_text().splitlines() if (work / "stages.jsonl").exists() else []:
        stage = json.loads(line)
        recorded[stage["name"]] = stage
    stages = [recorded.get(n, {"name": n, "status": "not run", "seconds": None, "timeout_s": None, "log": None})
              for n in STAGES]  # fmt: skip
    machine = load("probe.json")
    loader, runner = load("loader.json"), load("runner.json")
    tests = parse_junit(work / "tests.xml")
    cuda = bool(machine and machine.get("cuda_available"))
    targets = summarize_targets(tests=tests, tests_stage=recorded.get("tests", {}), loader=loader, cuda=cuda)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": mode,
        "command": COMMAND + (" --dry-run" if mode == "dry-run" else ""),
        "gpu": machine.get("gpu") if machine else None,
        "started_at": started_at,
        "wall_s": wall_s,
        "budget_s": budget_s,
        "machine": machine,
        "stages": stages,
        "test_files": test_files,
        "tests": tests,
        "loader": {k: v for k, v in loader.items() if k != "markdown"} if loader else None,
        "runner": {k: v for k, v in runner.items() if k != "markdown"} if runner else None,
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets),
    }
    markdown = render(result, loader_md=loader and loader.get("markdown"), runner_md=runner and runner.get("markdown"))
    return result, markdown


def section_name(gpu: str) -> str:
    """The BENCHMARKS.md section of one GPU model: gpu-nvidia-h100-80gb-hbm3."""
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


INDEX_HEADER = "## GPU figures"


def index_section(recorded: list[str]) -> str:
    """The short `gpu` section: how to measure, and which GPU models have figures below."""
    lines = [
        INDEX_HEADER,
        "",
        f"Measured by `{COMMAND}` on a CUDA machine in one run of about 8 minutes: the CUDA tests (`pytest -m gpu`), "
        "the loader benchmark on a 5 GB file with `--device cuda`, and the runner on real-size SD 1.5 and SDXL "
        "architectures with random weights (512x512 and 1024x1024, 20 steps). Before going to a machine without "
        "a package index, run `bash bench/gpu_check.sh --fetch-wheels` here and take `.cache/gpu-check` along. "
        "Figures land in `$OUT` (else `out/gpu-check`); "
        "`PYTHONSAFEPATH=1 .venv/bin/python bench/gpu_check.py record out/gpu-check` puts them here. "
        "`bash bench/gpu_check.sh --dry-run` runs the same stages on the CPU at toy sizes (the test suite does).",
        "",
    ]  # fmt: skip
    if recorded:
        lines.append("Measured on: " + ", ".join(f"`{name}`" for name in recorded) + " (sections below).")
    else:
        lines.append("Still to be measured: no run on a CUDA machine yet, so every GPU claim (loader rates against "
                     "the pinned copy, time per image on real-size models) is unverified.")  # fmt: skip
    return "\n".join(lines) + "\n"


def record(out_dir: pathlib.Path, *, benchmarks: pathlib.Path = report.BENCHMARKS) -> str:
    """Write a GPU run's section (and the index) into BENCHMARKS.md; returns the section name."""
    result = json.loads((out_dir / "gpu-check.json").read_text())
    if result.get("mode") != "gpu" or not result.get("gpu"):
        raise SystemExit(f"{out_dir}/gpu-check.json is from a {result.get('mode')} run without a GPU; "
                         "only runs on a CUDA machine are recorded")  # fmt: skip
    name = section_name(result["gpu"])
    report.write_section(name, (out_dir / "gpu-check.md").read_text(), path=benchmarks)
    recorded = re.findall(r"<!-- begin:(gpu-[a-z0-9-]+) -->", benchmarks.read_text())
    report.write_section("gpu", index_section(recorded), path=benchmarks)
    return name


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="describe the machine and the packages the stages need")
    p.add_argument("--data-dir", type=pathlib.Path, required=True)
    p.add_argument("--json", type=pathlib.Path, required=True)
    r = sub.add_parser("report", help="assemble gpu-check.json and gpu-check.md from the stages' outputs")
    r.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    r.add_argument("--work", type=pathlib.Path, required=True)
    r.add_argument("--out", type=pathlib.Path, required=True)
    r.add_argument("--budget", type=int, required=True)
    r.add_argument("--started-at", required=True)
    r.add_argument("--wall-s", type=float, required=True)
    r.add_argument("--test-files", default="")
    c = sub.add_parser("record", help="write a GPU run's figures into BENCHMARKS.md")
    c.add_argument("dir", type=pathlib.Path)
    args = ap.parse_args(argv)
    if args.command == "probe":
        found = probe(args.data_dir)
        args.json.write_text(json.dumps(found, indent=2))
        print(json.dumps(found, indent=2))
        return 0 if not found["missing"] and "torch_error" not in found else 1
    if args.command == "report":
        result, markdown = build_report(mode=args.mode, work=args.work, budget_s=args.budget, started_at=args.started_at,
                                        wall_s=args.wall_s, test_files=args.test_files.split())  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-check.json").write_text(json.dumps(result, indent=2))
        (args.out / "gpu-check.md").write_text(markdown)
        print(markdown)
        return 0
    print(f"recorded section {record(args.dir)} in {report.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
