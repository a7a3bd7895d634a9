#!/usr/bin/env bash
# Build Stoker's images on this machine without any container registry:
#   localhost/stoker-operator:<tag>  the operator, API types and CLI (no torch)
#   localhost/stoker-agent:<tag>     the agent (torch with its CUDA libraries, diffusers)
#   localhost/stoker-pause:<tag>     the pod sandbox ("pause") image of the test cluster
# into the local containers storage (buildah/podman), and print `name=ref` lines last.
#
# The same layout as the Dockerfile (a venv in /opt/stoker, user 10001, read-only root
# filesystem), assembled from parts that need no registry:
#   1. base OS: a Debian root filesystem from Debian's packages (mmdebstrap)
#   2. Python dependencies: the wheels of requirements-{operator,agent}.lock from PyPI,
#      installed by `buildah run` (runc, no network) from a read-only mount
#   3. the app: Stoker's own wheel, built from this checkout
# Each layer is its own image, tagged with the hash of everything that goes into it, so a
# warm run rebuilds only what changed (usually just the app layer, in seconds) and
# images with an unchanged tag need no re-import.
#
#   hack/build-images.sh                 # all three
#   hack/build-images.sh operator pause  # only some
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}/images"
WHEELS="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}/wheels"  # shared with hack/setup.sh
SUITE=bookworm
PIP_VERSION=25.3           # runs the installs inside the image; not part of the image
UID_GID=10001:10001
PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
mkdir -p "$WHEELS" "$CACHE/base"
log() { printf '[images] %s\n' "$*" >&2; }
for tool in buildah podman mmdebstrap runc; do
  command -v "$tool" >/dev/null || { log "error: $tool is missing; run: bash hack/setup-node.sh"; exit 1; }
done
# runc needs explicit rlimits on hosts with hybrid cgroups (crun refuses them altogether).
FROM_OPTS=(--pull-never --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
RUN_OPTS=(--runtime "$(command -v runc)" --network none)
hash_of() { sha256sum | cut -c1-16; }
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(operator agent pause)
start=$(date +%s)

# ---- 1. base OS ------------------------------------------------------------------------
BASE_PACKAGES="python3,python3-venv,ca-certificates,libgomp1"
base_key=$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$UID_GID" v1 | hash_of)
BASE="localhost/stoker-base:$base_key"
if ! have_image "$BASE"; then
  tarball="$CACHE/base/$base_key.tar"
  if [ ! -f "$tarball" ]; then
    log "building the base OS ($SUITE: $BASE_PACKAGES) with mmdebstrap"
    mirror=()
    [ -f /etc/apt/sources.list.d/debian.sources ] && mirror=(/etc/apt/sources.list.d/debian.sources)
    SOURCE_DATE_EPOCH=0 mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" \
      --customize-hook='chroot "$1" groupadd --gid 10001 stoker' \
      --customize-hook='chroot "$1" useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stoker' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*' \
      "$SUITE" "$tarball.tmp" "${mirror[@]}" >&2
    mv "$tarball.tmp" "$tarball"
  fi
  podman import --quiet "$tarball" "$BASE" >/dev/null
  rm -f "$tarball"
fi

# ---- 2. Python dependencies ------------------------------------------------------------
have_wheels() {  # every pin of the lock file already has its wheel in $WHEELS
  local name version
  while IFS='=' read -r name _ version; do
    case $name in ''|'#'*) continue ;; esac
    name=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    compgen -G "$WHEELS/$name-$version-*.whl" >/dev/null \
      || compgen -G "$WHEELS/$(echo "$name" | tr '_' '-')-$version-*.whl" >/dev/null || return 1
  done < "$1"
  compgen -G "$WHEELS/pip-$PIP_VERSION-py3-none-any.whl" >/dev/null
}

wheels_for() {  # download the missing wheels of one lock file into the shared wheel folder
  local lock=$1
  have_wheels "$lock" && return
  log "downloading the wheels of $lock from PyPI"
  # The image's Python (Debian's 3.11) has the same tags as the one running pip.
  "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$WHEELS" \
    -r "$lock" "pip==$PIP_VERSION" >&2
}

deps_image() {  # deps_image NAME LOCK: base + /opt/stoker venv with LOCK's pins
  local name=$1 lock=$2 key ref ctr
  key=$( { echo "$base_key" "$PIP_VERSION"; cat "$lock"; } | hash_of)
  ref="localhost/stoker-$name-deps:$key"
  if ! have_image "$ref"; then
    wheels_for "$lock"
    log "installing $lock into the $name image's venv"
    ctr=$(buildah from "${FROM_OPTS[@]}" "$BASE")
    grep -v '^#' "$lock" > "$CACHE/install-$name.txt"
    buildah run "${RUN_OPTS[@]}" -v "$WHEELS:/wheels:ro" -v "$CACHE/install-$name.txt:/install.txt:ro" "$ctr" -- sh -ec "
      python3 -m venv --without-pip /opt/stoker
      /opt/stoker/bin/python /wheels/pip-$PIP_VERSION-py3-none-any.whl/pip install --disable-pip-version-check \
        --no-cache-dir --no-index --no-deps --quiet --find-links /wheels -r /install.txt" >&2
    buildah commit --quiet --timestamp 0 "$ctr" "$ref" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
  echo "$ref"
}

# ---- 3. the app ------------------------------------------------------------------------
src_key=$( { git ls-files -s -- stoker operator agent pyproject.toml README.md LICENSE 2>/dev/null
             git diff --no-ext-diff HEAD -- stoker operator agent pyproject.toml README.md LICENSE 2>/dev/null
             git ls-files --others --exclude-standard -- stoker operator agent | xargs -r cat 2>/dev/null; } | hash_of)
wheel_dir="$CACHE/app-$src_key"
app_wheel() {
  if [ ! -d "$wheel_dir" ]; then
    log "building Stoker's wheel"
    "$PYTHON" -m build --wheel --no-isolation --outdir "$wheel_dir.tmp" . >"$CACHE/wheel-build.log" 2>&1 \
      || { cat "$CACHE/wheel-build.log" >&2; exit 1; }
    mv "$wheel_dir.tmp" "$wheel_dir"
  fi
}
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')

app_image() {  # app_image NAME LOCK ENTRYPOINT DESCRIPTION
  local name=$1 lock=$2 entry=$3 description=$4 deps key ref ctr
  deps=$(deps_image "$name" "$lock")
  key=$(echo "${deps##*:}" "$src_key" | hash_of)
  ref="localhost/stoker-$name:$key"
  if ! have_image "$ref"; then
    app_wheel
    log "adding Stoker $version ($revision) to the $name image"
    ctr=$(buildah from "${FROM_OPTS[@]}" "$deps")
    buildah run "${RUN_OPTS[@]}" -v "$WHEELS:/wheels:ro" -v "$wheel_dir:/app:ro" "$ctr" -- \
      /opt/stoker/bin/python "/wheels/pip-$PIP_VERSION-py3-none-any.whl/pip" install --disable-pip-version-check \
        --no-cache-dir --no-index --no-deps --quiet /app/stoker-"$version"-py3-none-any.whl >&2
    buildah config --user "$UID_GID" --workingdir /tmp --entrypoint "[\"/opt/stoker/bin/$entry\"]" --cmd '' \
      --env PATH=/opt/stoker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1 --env HOME=/tmp \
      --env HF_HUB_OFFLINE=1 --env TRANSFORMERS_OFFLINE=1 \
      --label org.opencontainers.image.title="stoker-$name" \
      --label org.opencontainers.image.description="$description" \
      --label org.opencontainers.image.version="$version" \
      --label org.opencontainers.image.revision="$revision" \
      --label org.opencontainers.image.licenses=Apache-2.0 \
      --label org.opencontainers.image.source=https://github.com/stoker-dev/stoker \
      --label org.opencontainers.image.base.name="debian:$SUITE (mmdebstrap $BASE_PACKAGES)" "$ctr"
    buildah commit --quiet --timestamp 0 "$ctr" "$ref" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
  echo "$ref"
}

pause_image() {  # catatonit, Debian's static init, in its pause mode: the pod sandbox process
  local bin key ref ctr
  bin=$(command -v catatonit) || { log "error: catatonit is missing; run: bash hack/setup-node.sh"; exit 1; }
  key=$(cat "$bin" | hash_of)
  ref="localhost/stoker-pause:$key"
  if ! have_image "$ref"; then
    ctr=$(buildah from scratch)
    buildah copy --quiet --chmod 0755 "$ctr" "$bin" /pause >/dev/null
    buildah config --user 65535:65535 --entrypoint '["/pause", "-P"]' --cmd '' \
      --label org.opencontainers.image.title=stoker-pause "$ctr"
    buildah commit --quiet --timestamp 0 "$ctr" "$ref" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
  echo "$ref"
}

out=()
for target in "${targets[@]}"; do
  case $target in
    operator) out+=("operator=$(app_image operator requirements-operator.lock stoker-operator \
                "Stoker operator: schedules GenerationJobs onto cache agents and keeps ModelCache replicas warm")") ;;
    agent) out+=("agent=$(app_image agent requirements-agent.lock stoker-agent \
                "Stoker agent: caches models on a GPU pod, loads them and runs generation jobs")") ;;
    pause) out+=("pause=$(pause_image)") ;;
    *) log "error: unknown image '$target' (operator, agent or pause)"; exit 2 ;;
  esac
done
for line in "${out[@]}"; do
  ref=${line#*=}
  log "$ref: $(buildah inspect --type image --format '{{.FromImageID}}' "$ref" | cut -c1-12), $(podman image inspect --format '{{.Size}}' "$ref" | numfmt --to=iec)B"
done
log "done in $(( $(date +%s) - start ))s"
printf '%s\n' "${out[@]}"
