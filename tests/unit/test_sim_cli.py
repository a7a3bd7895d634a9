"""`stoker sim` end to end on a tiny fleet: tables, plots, benchmark section."""

from __future__ import annotations

import io
import pathlib

from stoker.sim import cli, workload


TINY = ["--models", "40", "--loras", "20", "--agents", "3", "--duration-s", "600", "--warmup-s", "120",
        "--disk-gb", "15", "--vram-gb", "16", "--ram-gb", "10"]


def test_the_fleet_run_prints_every_policy_and_writes_small_plots(tmp_path: pathlib.Path) -> None:
    out = io.StringIO()
    args = cli.parse_args([*TINY, "--out", str(tmp_path), "--policies", "least-conn,stoker"])
    md = cli.run_fleet(args, out=out)
    text = out.getvalue()
    for name in ("least-conn+LRU", "stoker", "lower bounds", "p50/p95/p99", "duplicate"):
        assert name in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["fleet_bytes.png", "fleet_hit_rate.png", "fleet_latency_cdf.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
    assert md.startswith("## Fleet simulation")
    assert "| least-conn+LRU |" in md
    # every target gets a verdict, the decision time is given per binding and per examined job,
    # and the byte figures are explained (with the extra run without interruptions)
    assert md.count("(>= 3x: ") == 2 and "(<= 1.5x: " in md and "jobs lost (0: " in md
    assert "Decision time at 1,000 agents" in md and "per examined job" in md
    assert "Where `stoker`'s bytes go" in md and "without interruptions" in text
    assert "1-minute load average" in md


def test_a_target_verdict_says_by_how_much_it_is_missed() -> None:
    assert cli._verdict(3.2, 3.0, at_least=True) == "met"
    assert cli._verdict(2.5, 3.0, at_least=True) == "missed by 1.20x"
    assert cli._verdict(1.8, 1.5, at_least=False) == "missed by 1.20x"


def test_main_replays_a_csv_trace(tmp_path: pathlib.Path) -> None:
    trace_file = tmp_path / "trace.csv"
    trace_file.write_text("time_s,model,loras\n1.0,m0001,\n2.5,m0002,\n3.0,m0001,\n")
    rc = cli.main([*TINY, "--trace", str(trace_file), "--out", str(tmp_path / "plots"), "--no-record",
                   "--policies", "least-conn,stoker"])
    assert rc == 0
    assert (tmp_path / "plots" / "fleet_bytes.png").exists()


def test_the_scaling_mode_reports_a_row_per_grid_point() -> None:
    out = io.StringIO()
    md = cli.run_scaling(budget_s=30.0, grid=((10, 10), (20, 50)), out=out)
    lines = [line for line in md.splitlines() if line.startswith("| 10 |") or line.startswith("| 20 |")]
    assert len(lines) == 2
    assert "us/binding" in out.getvalue() and "us/job" in out.getvalue()
    assert "µs per examined job" in md


def test_the_top_level_command_hands_every_flag_to_the_simulator(capsys) -> None:
    from stoker import cli as top

    try:
        top.main(["sim", "--scaling", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    else:
        raise AssertionError("--help should exit")
    usage = capsys.readouterr().out
    assert usage.startswith("usage: stoker sim")
    assert "--scaling-budget-s" in usage


def test_main_replays_a_users_own_catalog_and_trace(tmp_path: pathlib.Path) -> None:
    (tmp_path / "catalog.csv").write_text(
        "name,kind,size,family\nbase-xl,checkpoint,6.9GB,sdxl\nanime-15,checkpoint,2.1GB,sd15\n"
        "flux-dev,checkpoint,23.8GB,flux\nink,lora,150MB,sdxl\n")
    rows = ["time_s,model,loras"] + [
        f"{i * 2.0},{('base-xl', 'anime-15', 'flux-dev')[i % 3]},{'ink' if i % 3 == 0 else ''}" for i in range(60)]
    (tmp_path / "trace.csv").write_text("\n".join(rows) + "\n")
    out = io.StringIO()
    args = cli.parse_args(["--catalog", str(tmp_path / "catalog.csv"), "--trace", str(tmp_path / "trace.csv"),
                           "--agents", "3", "--vram-gb", "48", "--warmup-s", "0", "--out", str(tmp_path / "plots"),
                           "--policies", "least-conn,stoker"])
    md = cli.run_fleet(args, out=out)
    text = out.getvalue()
    assert text.startswith("60 jobs over 2 simulated min")
    assert "3 checkpoints + 1 LoRAs from catalog.csv, replaying trace.csv" in text
    assert "20 s (FLUX)" in text
    # no job of the trace was lost, and all of them were replayed
    header = next(line for line in md.splitlines() if line.startswith("| policy | TB down"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for policy in ("least-conn+LRU", "stoker"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {policy} |"))
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        assert cells["lost"] == "0"
    trace, _ = cli.build(args)
    assert len(trace.jobs) == 60 and trace.jobs[1].model == "anime-15" and trace.jobs[3].loras == ("ink",)


def test_main_says_which_row_of_a_users_file_is_wrong_and_exits_2(tmp_path: pathlib.Path, capsys) -> None:
    (tmp_path / "catalog.csv").write_text("name,kind,size\nbase-xl,checkpoint,6.9 gigs\n")
    (tmp_path / "trace.csv").write_text("0,base-xl,\n")
    rc = cli.main(["--catalog", str(tmp_path / "catalog.csv"), "--trace", str(tmp_path / "trace.csv"), "--no-record"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"stoker sim: {tmp_path / 'catalog.csv'} line 2: size of 'base-xl': '6.9 gigs' is not a size" in err
    rc = cli.main(["--catalog", str(tmp_path / "missing.csv"), "--no-record"])
    assert rc == 2
    assert "cannot read the catalog file" in capsys.readouterr().err


def test_the_help_documents_the_catalog_and_trace_columns(capsys) -> None:
    try:
        cli.parse_args(["--help"])
    except SystemExit:
        pass
    usage = capsys.readouterr().out
    for text in ("--catalog", "name         required", "inference_s", "time_s   required", "RFC 3339"):
        assert text in usage


def test_the_flat_workload_sets_its_catalog_and_fleet_and_options_still_override_it() -> None:
    args = cli.parse_args(["--workload", "flat", "--agents", "6", "--duration-s", "300", "--models", "300",
                           "--loras", "50"])
    assert (args.models, args.zipf, args.agents, args.vram_gb) == (300, 0.8, 6, 48.0)
    trace, fleet = cli.build(args)
    assert {a.family for a in trace.catalog.checkpoints} == set(workload.Family)
    assert fleet.n_agents == 6 and fleet.vram_bytes == 48 * cli.GB
    assert cli.argv_text(args)[:2] == ["--workload", "flat"]
    assert "--zipf" not in cli.argv_text(args)  # the workload's own value is not repeated
    assert cli.parse_args([]).models == 1000 and cli.parse_args([]).workload == "default"


def test_the_peer_tier_is_reported_against_its_targets_and_the_pooled_bound(tmp_path: pathlib.Path) -> None:
    args = cli.parse_args([*TINY, "--out", str(tmp_path), "--policies", "least-conn,stoker,stoker+peers"])
    md = cli.run_fleet(args, out=io.StringIO())
    line = next(x for x in md.splitlines() if x.startswith("- `stoker+peers`"))
    assert "fewer bytes from sources than `least-conn+LRU` (>= 10x: " in line
    assert "no policy can do better than" in line and "TB came from peers" in line
    assert "for `stoker` (no worse: " in line and "jobs lost (0: " in line
    # source and peer bytes apart, by cause
    assert "| stoker+peers | peer |" in md and "| stoker+peers | source |" in md
    assert "| TB down | TB peer |" in md


def test_each_workload_records_its_own_section_and_a_replay_none_unless_named(tmp_path: pathlib.Path) -> None:
    assert cli.record_section(cli.parse_args([])) == "fleet"
    assert cli.record_section(cli.parse_args(["--workload", "flat"])) == "fleet-flat"
    assert cli.record_section(cli.parse_args(["--scaling"])) == "fleet-scaling"
    assert cli.record_section(cli.parse_args(["--catalog", "c.csv", "--trace", "t.csv"])) is None
    assert cli.record_section(cli.parse_args(["--trace", "t.csv", "--section", "fleet-ours"])) == "fleet-ours"
