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
STAGING_VERSION="0.${K8S_VERSION#1.}"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
BIN="$CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
mkdir -p "$BIN"

log() { printf '[control-plane] %s\n' "$*" >&2; }
if { [ ! -x "$BIN/etcd" ] || [ ! -x "$BIN/kube-apiserver" ]; } && ! command -v go >/dev/null 2>&1; then
  log "error: go is not on the PATH; building kube-apiserver and etcd needs Go 1.26+ (https://go.dev/dl/),"
  log "       or set STOKER_CONTROL_PLANE_BIN to a folder that holds both binaries"
  exit 1
fi
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
  # k8s.io/kubernetes points its staging modules at ./staging; a wrapper module
  # pins each of them to its published release instead.
  modfile=$(cd "$work" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module stoker-apiserver-build"
    echo "go 1.26"
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    sed -n '/^replace (/,/^)/p' "$modfile" \
      | sed -n 's#^\s*\(k8s.io/[a-z-]*\) => ./staging.*#replace \1 => \1 v'"$STAGING_VERSION"'#p'
  } > "$work/go.mod"
  printf 'package main\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' > "$work/tools.go"
  (cd "$work" && go mod tidy >&2 \
    && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${STAGING_VERSION#0.}" \
         -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2)
  mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
  rm -rf "$work"
else
  log "kube-apiserver v$K8S_VERSION already built"
fi

echo "$BIN"
