#!/usr/bin/env bash
# GPU figures in one command: the CUDA tests, the loader benchmark and the real-size runner,
# measured on one CUDA machine within about 8 minutes, each stage under its own timeout.
#
#   bash bench/gpu_check.sh                  # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run        # the same stages on the CPU at toy sizes (in the test suite)
#   bash bench/gpu_check.sh --fetch-wheels   # first, where PyPI is reachable (see below)
#
# Stages, in order: setup (packages), probe (GPU model, driver, versions), tests (`pytest -m gpu`),
# loader (bench/loader_bench.py --device cuda on a 5 GB file: Stoker from the RAM tier, the page
# cache and cold, against the pinned host-to-device copy, raw reads, safetensors, runai-model-streamer
# and fastsafetensors), runner (bench/runner_bench.py --real-size: SD 1.5 and SDXL with random
# weights written to a file, loaded by Stoker's loader, built, timed at 512 and 1024 px, 20 steps).
# A failing or timed-out stage is recorded and the next one runs; partial figures are kept.
#
# Output in $OUT when set, else out/gpu-check (or --out DIR): gpu-check.json (every figure, the
# targets met or missed), gpu-check.md (a BENCHMARKS.md section titled with the GPU model) and one
# log per stage. Record a GPU run here with
#   PYTHONSAFEPATH=1 .venv/bin/python bench/gpu_check.py record out/gpu-check
#
# Python: $STOKER_PYTHON, else .venv/bin/python when present, else python3 (a GPU machine's own
# PyTorch). Stoker itself always comes from this working tree. Packages that python3 lacks
# (diffusers, pydantic, runai-model-streamer, fastsafetensors, ...) are installed from the wheels in
# .cache/gpu-check/wheels, which `--fetch-wheels` downloads for CPython 3.12 on x86-64 Linux
# (`--python-version 3.X` for another) at the versions in requirements.lock. A machine without a
# package index therefore needs, once, here:  bash bench/gpu_check.sh --fetch-wheels
# and the folder .cache/gpu-check taken along with the working tree.
set -uo pipefail  # no -e: a failing stage is recorded and the script goes on

cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
OUT_DIR=${OUT:-$REPO/out/gpu-check}
BUDGET=
WHEELS=$REPO/.cache/gpu-check/wheels
PY_VERSION=3.12

# Packages the stages import that a CUDA image with PyTorch, transformers, safetensors and pytest
# usually lacks (distribution names as in requirements.lock).
CARRIED=(diffusers open_clip_torch runai-model-streamer fastsafetensors pydantic pydantic_core annotated-types
  typing-inspection typing_extensions)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

fetch_wheels() {
  local py=${STOKER_PYTHON:-$REPO/.venv/bin/python} pins=() name line
  [[ -x $py ]] || py=python3
  for name in "${CARRIED[@]}"; do
    line=$(grep -iE "^${name//[-_]/[-_]}==" requirements.lock) || { echo "gpu-check: $name is not pinned in requirements.lock" >&2; return 1; }
    pins+=("$line")
  done
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  local platforms=() n
  for n in 17 24 27 28 30 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]}" || return 1
  ls -1 "$WHEELS"
  echo "gpu-check: $(du -sh "$WHEELS" | cut -f1) of wheels in ${WHEELS#"$REPO"/} for CPython $PY_VERSION;" \
    "copy .cache/gpu-check along with the working tree to the CUDA machine and run there: bash bench/gpu_check.sh"
}

while (($#)); do
  case $1 in
    --dry-run) MODE=dry-run ;;
    --fetch-wheels) FETCH=1 ;;
    --python-version) PY_VERSION=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n ${FETCH:-} ]]; then
  fetch_wheels
  exit
fi

# --------------------------------------------------------------------------- environment

if [[ -n ${STOKER_PYTHON:-} ]]; then PY=$STOKER_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=$(command -v python3 || echo python3); fi
if [[ $MODE == gpu ]]; then
  BUDGET=${BUDGET:-470}  # 8 minutes, less a margin for the report
  DATA=$REPO/.cache/gpu-check-data
else
  BUDGET=${BUDGET:-600}  # about a minute on an idle 2-core machine; room for a busy one
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/gpu-check.json "$OUT_DIR"/gpu-check.md "$OUT_DIR"/{setup,tests,loader,runner}.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DATA=${DATA:-$WORK/data}
mkdir -p "$DATA"
START=$(date +%s)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M UTC')
DEADLINE=$((START + BUDGET))

# Stoker from this working tree: agent/ and operator/ are the subpackages stoker.agent and
# stoker.operator (a symlink tree, so no build step and no stale copy).
mkdir -p "$WORK/src/stoker" "$WORK/lib"
for entry in "$REPO"/stoker/*; do ln -s "$entry" "$WORK/src/stoker/"; done
ln -s "$REPO/agent" "$WORK/src/stoker/agent"
ln -s "$REPO/operator" "$WORK/src/stoker/operator"
export PYTHONPATH="$WORK/site:$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # the repository's operator/ must not shadow the standard library
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is fetched; fail fast if something tries

echo "gpu-check: $MODE run, ${BUDGET} s budget, python $PY, output in $OUT_DIR"

# --------------------------------------------------------------------------- stages

OVERALL=0

record() {  # name status rc seconds timeout log reason
  printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "log": "%s", "reason": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$(if [[ -n $7 ]]; then printf '"%s"' "${7//\"/\'}"; else echo null; fi)" \
    >>"$WORK/stages.jsonl"
  printf 'gpu-check: %-7s %-9s %6s s %s\n' "$1" "$2" "$4" "$7"
  [[ $2 == ok ]] || OVERALL=1
}

# run_stage NAME MAX_SECONDS RESERVE_SECONDS LOG: runs "${CMD[@]}" under a timeout of at most
# MAX_SECONDS, less if the later stages' RESERVE_SECONDS would not fit in the budget otherwise.
run_stage() {
  local name=$1 max=$2 reserve=$3 log=$4 left t0 rc status reason=
  left=$((DEADLINE - $(date +%s) - reserve))
  STAGE_TIMEOUT=$((max < left ? max : left))
  if ((STAGE_TIMEOUT < 15)); then
    record "$name" skipped null null null "" "no time left in the ${BUDGET} s budget"
    return
  fi
  prepare_"$name" || { record "$name" skipped null null null "" "$SKIP_REASON"; return; }
  t0=$(date +%s.%N)
  echo "\$ ${CMD[*]}" >>"$OUT_DIR/$log"
  timeout --signal=TERM --kill-after=20 "$STAGE_TIMEOUT" "${CMD[@]}" >>"$OUT_DIR/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out"; reason="after ${STAGE_TIMEOUT} s" ;;
    *) status=failed; reason="exit code $rc, see $log" ;;
  esac
  record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
    "$STAGE_TIMEOUT" "$log" "$reason"
}

prepare_setup() {
  if [[ $PY == "$REPO/.venv/bin/python" ]] || ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    if [[ $PY != "$REPO/.venv/bin/python" ]]; then
      echo "no wheels in ${WHEELS#"$REPO"/}: using $PY's own packages (if some are missing, run" \
        "'bash bench/gpu_check.sh --fetch-wheels' where PyPI is reachable and bring .cache/gpu-check)" >>"$OUT_DIR/setup.log"
    fi
    CMD=("$PY" -c "import sys; print(sys.version)")
  else
    CMD=("$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site"
      "$WHEELS"/*.whl)
  fi
}

prepare_probe() {
  CMD=("$PY" bench/gpu_check.py probe --data-dir "$DATA" --json "$WORK/probe.json")
}

prepare_tests() {
  mapfile -t TEST_FILES < <(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
  if ((${#TEST_FILES[@]} == 0)); then SKIP_REASON="no test file uses pytest.mark.gpu"; return 1; fi
  CMD=("$PY" -m pytest -m gpu -p no:cacheprovider -q --timeout 120 --junitxml="$WORK/tests.xml" "${TEST_FILES[@]}")
}

prepare_loader() {
  if [[ $MODE == gpu ]]; then
    CMD=("$PY" bench/loader_bench.py --device cuda --size-gb 5 --runs 3 --fast-runs 5)
  else
    CMD=("$PY" bench/loader_bench.py --device cpu --size-gb 0.02 --runs 1 --fast-runs 1 --drop fadvise)
  fi
  CMD+=(--dir "$DATA/loader" --time-budget $((STAGE_TIMEOUT - 25)) --json "$WORK/loader.json" --no-write)
}

prepare_runner() {
  if [[ $MODE == gpu ]]; then
    CMD=("$PY" bench/runner_bench.py --real-size --architecture real --device cuda --sizes 512,1024 --steps 20 --repeats 3)
  else
    CMD=("$PY" bench/runner_bench.py --real-size --architecture tiny --device cpu --sizes 64,96 --steps 2 --repeats 1
      --threads 1)
  fi
  CMD+=(--dir "$DATA/runner" --time-budget $((STAGE_TIMEOUT - 40)) --json "$WORK/runner.json" --no-write)
}

# fastsafetensors dlopen()s the unversioned libcudart.so, which PyTorch's CUDA wheels do not ship.
cudart_link() {
  ldconfig -p 2>/dev/null | grep -q 'libcudart\.so ' && return
  local lib
  lib=$("$PY" -c '
import glob, os, sys
roots = [p for p in sys.path if p] + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
hits = [h for r in roots for h in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib", "libcudart.so*")))
        + sorted(glob.glob(os.path.join(r, "libcudart.so*")))]
print(hits[0] if hits else "")' 2>/dev/null)
  if [[ -n $lib ]]; then
    ln -sf "$lib" "$WORK/lib/libcudart.so"
    export LD_LIBRARY_PATH="$WORK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcudart.so -> $lib (for fastsafetensors)" >>"$OUT_DIR/setup.log"
  fi
}

if [[ $MODE == gpu ]]; then
  # Each stage may take up to its maximum unless the later stages' least useful times (probe 30 s,
  # tests 60 s, loader 120 s, runner 100 s) would then not fit: the reserve column.
  #         stage  max reserve
  run_stage setup  60  310 setup.log
  cudart_link
  run_stage probe  60  280 setup.log
  run_stage tests  90  220 tests.log
  run_stage loader 200 100 loader.log
  run_stage runner 150 0 runner.log
else
  run_stage setup 60 60 setup.log
  run_stage probe 120 60 setup.log
  run_stage tests 180 60 tests.log
  run_stage loader 180 60 loader.log
  run_stage runner 240 0 runner.log
fi

# --------------------------------------------------------------------------- report

WALL=$(($(date +%s) - START))
if ! timeout 60 "$PY" bench/gpu_check.py report --mode "$MODE" --work "$WORK" --out "$OUT_DIR" --budget "$BUDGET" \
  --started-at "$STARTED_AT" --wall-s "$WALL" --test-files "${TEST_FILES[*]:-}" >"$WORK/report.out" 2>&1; then
  echo "gpu-check: the report failed:" && cat "$WORK/report.out"
  cp "$WORK"/*.json "$OUT_DIR"/ 2>/dev/null
  exit 1
fi
cat "$WORK/report.out"
echo "gpu-check: ${WALL} s; figures in $OUT_DIR (gpu-check.json, gpu-check.md, logs)"
exit $OVERALL
