"""Print the lines of requirements.lock that one install of Stoker needs.

requirements.lock is the one pin list (Stoker, its tests and its benchmarks). An image
needs less: the operator image only what `pip install stoker` pulls in, the agent image
what `pip install "stoker[agent]"` pulls in. This walks the dependency tree declared in
pyproject.toml through the metadata of the installed distributions (the locked ones) and
prints their pins, in lock order, so that nothing is pinned twice by hand.

    .venv/bin/python hack/lock-subset.py                 # stoker (operator, API, CLI)
    .venv/bin/python hack/lock-subset.py --extra agent   # stoker[agent]
    .venv/bin/python hack/lock-subset.py --names         # canonical names only
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]


class LockError(RuntimeError):
    """The lock file and the environment do not cover a requirement."""


def read_lock(path: pathlib.Path) -> dict[str, str]:
    """Canonical name → the lock line (`Name==version`)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, _ = line.partition("==")
            pins[canonicalize_name(name)] = line
    return pins


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(requirements: list[str], extras: set[str]) -> set[str]:
    """Canonical names of every distribution that `requirements` (with `extras` on the
    root) pull in, read from the installed distributions' metadata."""
    todo = [(Requirement(r), extras) for r in requirements]
    todo = [(req, set(req.extras)) for req, ex in todo if _applies(req, ex)]
    seen: dict[str, set[str]] = {}
    while todo:
        req, req_extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and req_extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(req_extras)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise LockError(f"{req.name} is required but not installed; install requirements.lock first "
                            f"(bash hack/setup.sh)") from None
        for dep in dist.requires or []:
            dep_req = Requirement(dep)
            if _applies(dep_req, seen[name]):
                todo.append((dep_req, set(dep_req.extras)))
    return set(seen)


def subset(extras: set[str], *, pyproject: pathlib.Path = REPO / "pyproject.toml",
           lock: pathlib.Path = REPO / "requirements.lock") -> list[str]:
    """The lock lines that `stoker[extras]` needs, in lock order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    unknown = extras - set(project.get("optional-dependencies", {}))
    if unknown:
        raise LockError(f"unknown extra(s) {sorted(unknown)}; pyproject.toml declares "
                        f"{sorted(project.get('optional-dependencies', {}))}")
    # Extras may name other extras of this project ("stoker[agent]"): expand those here,
    # from pyproject.toml, not from the metadata of whatever stoker is installed.
    wanted, todo, done = list(project["dependencies"]), sorted(extras), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for dep in project["optional-dependencies"][extra]:
            req = Requirement(dep)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo += sorted(req.extras)
            else:
                wanted.append(dep)
    names = closure(wanted, set())
    pins = read_lock(lock)
    missing = sorted(names - set(pins))
    if missing:
        raise LockError(f"requirements.lock does not pin {', '.join(missing)}; add them (see its header)")
    return [line for name, line in pins.items() if name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group (repeatable)")
    parser.add_argument("--names", action="store_true", help="print canonical names instead of pins")
    args = parser.parse_args(argv)
    try:
        lines = subset(set(args.extra))
    except LockError as error:
        print(f"lock-subset: {error}", file=sys.stderr)
        return 1
    for line in lines:
        print(canonicalize_name(line.partition("==")[0]) if args.names else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
