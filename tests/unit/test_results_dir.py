"""The pod-local results folder: kept under its size and age limits, served read-only without traversal."""

from __future__ import annotations

import os
import pathlib

import httpx

from stoker.agent.results_dir import ResultFile, ResultsServer, clean, plan_cleanup


def test_old_files_go_first_then_the_oldest_until_the_rest_fit_and_the_newest_always_stays() -> None:
    files = [ResultFile("a.png", 400, 100.0), ResultFile("b.png", 400, 200.0), ResultFile("c.png", 400, 300.0),
             ResultFile("d.png", 400, 50.0)]
    assert sorted(plan_cleanup(files, max_bytes=900, max_age_s=None, now=310.0)) == ["a.png", "d.png"]
    assert sorted(plan_cleanup(files, max_bytes=10_000, max_age_s=150.0, now=310.0)) == ["a.png", "d.png"]
    assert plan_cleanup([ResultFile("huge.png", 5000, 300.0)], max_bytes=10, max_age_s=1.0, now=9999.0) == []


def test_clean_deletes_only_result_files(tmp_path: pathlib.Path) -> None:
    for i, name in enumerate(["ns__a__1.png", "ns__b__1.png", "notes.txt"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert clean(tmp_path, max_bytes=150, max_age_s=None, now=2000.0) == ["ns__a__1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "ns__b__1.png"]
    assert clean(tmp_path / "missing", max_bytes=1, max_age_s=None) == []


def test_the_endpoint_serves_result_files_and_nothing_else(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "ns__fox__1.png").write_bytes(b"\x89PNG fox")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (results / ".hidden.png").write_bytes(b"hidden")
    server = ResultsServer(results, port=0, addr="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        ok = httpx.get(f"{base}/results/ns__fox__1.png")
        assert ok.status_code == 200 and ok.content == b"\x89PNG fox" and ok.headers["content-type"] == "image/png"
        for path in ("/results/../secret.png", "/results/%2e%2e/secret.png", "/results/.hidden.png", "/secret.png",
                     "/results/missing.png", "/results/"):
            assert httpx.get(base + path).status_code == 404, path
    finally:
        server.close()
