"""Layering rules hold: the import-linter contracts in .importlinter pass."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept(tmp_path: pathlib.Path) -> None:
    # The linter walks a package's folder, so lay the mapped folders out as installed.
    shutil.copytree(REPO / "stoker", tmp_path / "stoker", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("operator", "agent"):
        shutil.copytree(REPO / folder, tmp_path / "stoker" / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "configs"))
    lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    assert lint, "lint-imports (import-linter) is not installed in this environment"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([lint, "--config", str(REPO / ".importlinter")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
