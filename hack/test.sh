#!/usr/bin/env bash
# Run Stoker's whole test suite (unit + integration against a real kube-apiserver),
# setting up whatever is missing first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash hack/setup.sh)"
# Keep the repo root off sys.path: the operator/ folder would shadow the standard
# library's `operator` module.
export PYTHONSAFEPATH=1
exec .venv/bin/pytest "$@"
