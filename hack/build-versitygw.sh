#!/usr/bin/env bash
# Build versitygw (Versity's S3 gateway: a real S3 server over a POSIX folder) from the Go module
# proxy into a cache outside git; the results-store tests start it on 127.0.0.1. Skips the build
# when it is already there. Prints the binary's path last.
#
#   hack/build-versitygw.sh                   # build (or reuse) the pinned version
#   STOKER_CACHE=/some/dir hack/...           # choose the cache root
#   STOKER_VERSITYGW=/path/versitygw hack/... # use a binary built elsewhere (skips the build)
set -euo pipefail

if [ -n "${STOKER_VERSITYGW:-}" ] && [ -x "$STOKER_VERSITYGW" ]; then
  echo "$STOKER_VERSITYGW"
  exit 0
fi
VERSITYGW_VERSION="${VERSITYGW_VERSION:-1.8.0}"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
DEST="$CACHE/versitygw/$VERSITYGW_VERSION"
log() { printf '[versitygw] %s\n' "$*" >&2; }

if [ ! -x "$DEST/versitygw" ]; then
  command -v go >/dev/null 2>&1 || {
    log "error: go is not on the PATH; building versitygw needs Go 1.26+ (https://go.dev/dl/),"
    log "       or set STOKER_VERSITYGW to a versitygw binary"
    exit 1
  }
  log "building versitygw $VERSITYGW_VERSION (first time only, a few minutes on 2 cores)"
  mkdir -p "$DEST"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  GOBIN="$work" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}" go install -trimpath -ldflags "-s -w" \
    "github.com/versity/versitygw/cmd/versitygw@v$VERSITYGW_VERSION" >&2
  mv "$work/versitygw" "$DEST/versitygw.tmp"
  mv "$DEST/versitygw.tmp" "$DEST/versitygw"
else
  log "versitygw $VERSITYGW_VERSION already built"
fi
echo "$DEST/versitygw"
