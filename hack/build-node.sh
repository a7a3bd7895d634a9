#!/usr/bin/env bash
# Build the node and cluster components that turn the test control plane into a real
# one-node cluster: kubelet, kube-scheduler, kube-controller-manager and kube-proxy, from
# the Go module proxy, in one `go build` (they share most of their packages). Cached
# outside git; skips what is already built. Prints the path of the bin directory last.
#
#   hack/build-node.sh                    # build (or reuse) the pinned version
#   STOKER_CACHE=/some/dir hack/...       # choose the cache root
#   STOKER_NODE_BIN=/dir hack/...         # use binaries built elsewhere (skips the build)
set -euo pipefail
COMPONENTS=(kubelet kube-scheduler kube-controller-manager kube-proxy)

have_all() { local c; for c in "${COMPONENTS[@]}"; do [ -x "$1/$c" ] || return 1; done; }
if [ -n "${STOKER_NODE_BIN:-}" ] && have_all "$STOKER_NODE_BIN"; then
  echo "$STOKER_NODE_BIN"
  exit 0
fi
K8S_VERSION="${K8S_VERSION:-1.36.3}"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
BIN="$CACHE/node/k8s-$K8S_VERSION"
log() { printf '[node] %s\n' "$*" >&2; }

if have_all "$BIN"; then
  log "kubelet, kube-scheduler, kube-controller-manager, kube-proxy v$K8S_VERSION already built"
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null 2>&1 || {
  log "error: go is not on the PATH; building the node components needs Go 1.26+ (https://go.dev/dl/),"
  log "       or set STOKER_NODE_BIN to a folder that holds ${COMPONENTS[*]}"
  exit 1
}
# shellcheck source=hack/lib/k8s-module.sh
source "$(dirname "$0")/lib/k8s-module.sh"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0

log "building ${COMPONENTS[*]} v$K8S_VERSION (first time only; about 10 minutes on 2 cores after kube-apiserver)"
mkdir -p "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkgs=()
for c in "${COMPONENTS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
k8s_wrapper_module "$work" "$K8S_VERSION" stoker-node-build "${pkgs[@]}"
mkdir "$work/out"
(cd "$work" && go build -trimpath -ldflags "$(k8s_ldflags "$K8S_VERSION")" -o "$work/out/" "${pkgs[@]}" >&2)
for c in "${COMPONENTS[@]}"; do mv "$work/out/$c" "$BIN/$c"; done
echo "$BIN"
