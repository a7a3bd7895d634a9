#!/usr/bin/env bash
# Build promtool (Prometheus's rule and exposition checker) from the Go module proxy into a
# cache outside git. Skips the build when it is already there. Prints the binary's path last.
#
#   hack/build-promtool.sh                  # build (or reuse) the pinned version
#   STOKER_CACHE=/some/dir hack/...         # choose the cache root
#   STOKER_PROMTOOL=/path/promtool hack/... # use a binary built elsewhere (skips the build)
set -euo pipefail

if [ -n "${STOKER_PROMTOOL:-}" ] && [ -x "$STOKER_PROMTOOL" ]; then
  echo "$STOKER_PROMTOOL"
  exit 0
fi
# Prometheus 3.16.0 is published as the Go module version v0.316.0.
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-3.16.0}"
MODULE_VERSION="v0.${PROMETHEUS_VERSION%%.*}$(printf '%02d' "$(echo "$PROMETHEUS_VERSION" | cut -d. -f2)").$(echo "$PROMETHEUS_VERSION" | cut -d. -f3)"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
DEST="$CACHE/promtool/$PROMETHEUS_VERSION"
log() { printf '[promtool] %s\n' "$*" >&2; }

if [ ! -x "$DEST/promtool" ]; then
  command -v go >/dev/null 2>&1 || {
    log "error: go is not on the PATH; building promtool needs Go 1.26+ (https://go.dev/dl/),"
    log "       or set STOKER_PROMTOOL to a promtool binary"
    exit 1
  }
  log "building promtool $PROMETHEUS_VERSION (github.com/prometheus/prometheus@$MODULE_VERSION; first time only, 5-15 minutes on 2 cores)"
  mkdir -p "$DEST"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # `go install pkg@version` builds with the module's own go.mod (it has no replace
  # directives), so the dependency set is exactly the released one. remove_all_sd leaves out
  # the cloud service-discovery plugins (AWS, Azure, GCE, ...) that rule and metric checks
  # never use.
  GOBIN="$work" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}" go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$MODULE_VERSION" >&2
  mv "$work/promtool" "$DEST/promtool.tmp"
  mv "$DEST/promtool.tmp" "$DEST/promtool"
else
  log "promtool $PROMETHEUS_VERSION already built"
fi
echo "$DEST/promtool"
