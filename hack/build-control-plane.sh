#!/usr/bin/env bash
# Build kube-apiserver and etcd from the Go module proxy into a cache outside git.
# Skips what is already built. Prints the path of the bin directory last.
#
#   hack/build-control-plane.sh            # build (or reuse) the pinned versions
#   STOKER_CACHE=/some/dir hack/...        # choose the cache root
#   STOKER_CONTROL_PLANE_BIN=/dir hack/... # use binaries built elsewhere (skips the build)
set -euo pipefail

if [ -n "${STOKER_CONTROL_PLANE_BIN:-}" ] && [ -x "$STOKER_CONTROL_PLANE_BIN/etcd" ] && [ -x "$STOKER_CONTROL_PLANE_BIN/kube-apiserver" ]; then
  echo "$STOKER_CONTROL_PLANE_BIN"  # binaries provided from elsewhere
  exit 0
fi
K8S_VERSION="${K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
BIN="$CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
mkdir -p "$BIN"

log() { printf '[control-plane] %s\n' "$*" >&2; }
if { [ ! -x "$BIN/etcd" ] || [ ! -x "$BIN/kube-apiserver" ]; } && ! command -v go >/dev/null 2>&1; then
  log "error: go is not on the PATH; building kube-apiserver and etcd needs Go 1.26+ (https://go.dev/dl/),"
  log "       or set STOKER_CONTROL_PLANE_BIN to a folder that holds both binaries"
  exit 1
fi
# shellcheck source=hack/lib/k8s-module.sh
source "$(dirname "$0")/lib/k8s-module.sh"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0

if [ ! -x "$BIN/etcd" ]; then
  log "building etcd v$ETCD_VERSION (first time only, about 1-2 minutes)"
  work=$(mktemp -d)
  (cd "$work" && go mod init stoker-etcd-build >/dev/null 2>&1 \
    && go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2 \
    && go build -trimpath -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  rm -rf "$work"
else
  log "etcd v$ETCD_VERSION already built"
fi

if [ ! -x "$BIN/kube-apiserver" ]; then
  log "building kube-apiserver v$K8S_VERSION (first time only, about 5-10 minutes on 2 cores)"
  work=$(mktemp -d)
  k8s_wrapper_module "$work" "$K8S_VERSION" stoker-apiserver-build k8s.io/kubernetes/cmd/kube-apiserver
  (cd "$work" && go build -trimpath -ldflags "$(k8s_ldflags "$K8S_VERSION")" \
         -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2)
  mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
  rm -rf "$work"
else
  log "kube-apiserver v$K8S_VERSION already built"
fi

echo "$BIN"
