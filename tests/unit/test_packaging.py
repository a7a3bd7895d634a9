"""One installable distribution: the wheel carries every package and its entry points run."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import sysconfig
import tomllib
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = {"stoker": REPO / "stoker", "stoker.operator": REPO / "operator", "stoker.agent": REPO / "agent"}


def source_packages() -> set[str]:
    found = set()
    for root_name, root in FOLDERS.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((root_name, *rel)) if rel else root_name)
    return found


def test_every_source_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == source_packages()


def test_the_build_backend_the_wheel_test_uses_is_pinned_in_the_lock_file() -> None:
    # The wheel is built without build isolation, so the backend comes from the environment.
    pins = dict(line.split("==", 1) for line in (REPO / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert "setuptools" in pins, "requirements.lock does not pin setuptools"
    assert pins["setuptools"] == importlib.metadata.version("setuptools"), "the environment is not the locked one"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh virtualenv with only the built wheel installed; third-party packages come
    from the development environment through a path entry (not its .pth hooks)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(REPO)],
                   check=True, capture_output=True, cwd=tmp)
    [wheel] = (tmp / "dist").glob("stoker-*.whl")
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    str(wheel)], check=True, capture_output=True, cwd=tmp)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "zz-dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


@pytest.mark.parametrize("command", ["stoker", "stoker-operator", "stoker-agent"])
def test_each_entry_point_of_the_installed_wheel_runs(installed_wheel: pathlib.Path, command: str, tmp_path) -> None:
    proc = subprocess.run([str(installed_wheel / "bin" / command), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_the_wheel_imports_from_site_packages_and_leaves_stdlib_operator_alone(installed_wheel, tmp_path) -> None:
    code = ("import operator, stoker.operator, stoker.agent, stoker.api; "
            "print(operator.__file__); print(stoker.operator.__file__); print(stoker.agent.__file__)")
    out = subprocess.run([str(installed_wheel / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout.splitlines()
    assert "site-packages" not in out[0]  # the standard library's operator
    assert str(installed_wheel) in out[1] and str(installed_wheel) in out[2]
