#!/usr/bin/env bash
# Run Stoker's main job locally: a real control plane, the operator, agents, a small
# generated model served over HTTP, several GenerationJobs -> PNGs in out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash hack/setup.sh)"
export PYTHONSAFEPATH=1
exec .venv/bin/stoker demo "$@"
