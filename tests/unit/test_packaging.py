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
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Stoker's wheel, built from this source tree."""
    tmp = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp), str(REPO)],
                   check=True, capture_output=True, cwd=tmp)
    [built] = tmp.glob("stoker-*.whl")
    return built


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory, wheel: pathlib.Path) -> pathlib.Path:
    """A fresh virtualenv with only the built wheel installed; third-party packages come
    from the development environment through a path entry (not its .pth hooks)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    str(wheel)], check=True, capture_output=True, cwd=tmp)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # Every site directory of this environment, including ones its own .pth files added.
    dev_sites = dict.fromkeys([sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))])
    (site / "zz-dev-deps.pth").write_text("".join(f"{p}\n" for p in dev_sites))
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


def _lock_subset(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, str(REPO / "hack" / "lock-subset.py"), *args],
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_the_base_install_pins_no_torch_or_diffusion_stack() -> None:
    base = set(_lock_subset("--names"))
    assert {"kopf", "kubernetes", "pydantic"} <= base
    assert not base & {"torch", "diffusers", "transformers", "scipy", "open-clip-torch", "safetensors", "triton",
                       "numpy", "pillow"}
    assert {"torch", "diffusers", "safetensors"} <= set(_lock_subset("--names", "--extra", "agent"))


def test_every_locked_package_is_needed_by_stoker_or_one_of_its_extras() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needed = set(_lock_subset(*[arg for extra in extras for arg in ("--extra", extra)]))
    locked = {line.strip() for line in (REPO / "requirements.lock").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert locked - needed == {"setuptools==" + importlib.metadata.version("setuptools")} or locked == needed


@pytest.fixture(scope="module")
def torchless_env(tmp_path_factory: pytest.TempPathFactory, wheel: pathlib.Path) -> pathlib.Path:
    """A fresh virtualenv holding the built wheel (no dependencies) plus exactly the locked
    distributions that `pip install stoker` needs, linked from this environment: torch and
    the diffusion stack are not there to import."""
    tmp = tmp_path_factory.mktemp("torchless")
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=True)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    for name in _lock_subset("--names"):
        dist = importlib.metadata.distribution(name)
        root = pathlib.Path(str(dist.locate_file("")))
        for top in {pathlib.PurePath(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (site / top).exists() and (root / top).exists():
                (site / top).symlink_to(root / top)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    str(wheel)], check=True, capture_output=True, cwd=tmp)
    return env_dir


def test_the_operator_api_types_and_cli_import_and_run_without_torch(torchless_env: pathlib.Path, tmp_path) -> None:
    python = str(torchless_env / "bin" / "python")
    absent = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path)
    assert absent.returncode != 0 and "No module named 'torch'" in absent.stderr
    code = ("import sys, stoker.api, stoker.kube, stoker.cli, stoker.operator.main; "
            "heavy = {'torch', 'diffusers', 'transformers', 'safetensors', 'numpy', 'PIL'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for command in ("stoker-operator", "stoker"):
        proc = subprocess.run([str(torchless_env / "bin" / command), "--help"], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout


def test_the_agent_without_its_extra_says_what_to_install(torchless_env: pathlib.Path, tmp_path) -> None:
    proc = subprocess.run([str(torchless_env / "bin" / "stoker-agent"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert 'stoker[agent]' in proc.stderr


def test_the_image_lock_files_are_generated_from_requirements_lock() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "hack" / "lock-subset.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    operator_pins = (REPO / "requirements-operator.lock").read_text()
    assert "kopf==" in operator_pins and "torch==" not in operator_pins
    assert "torch==" in (REPO / "requirements-agent.lock").read_text()
