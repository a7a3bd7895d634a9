#!/usr/bin/env bash
# Install the Debian packages that the local image build and the end-to-end test cluster
# need: containerd, runc and the CNI plugins (the node's runtime), buildah, podman and
# mmdebstrap (the image build), catatonit (the pause image), iptables and conntrack
# (kube-proxy). Needs root and Debian's apt; skips packages that are already installed.
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins buildah podman mmdebstrap catatonit iptables conntrack
          uidmap)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[node] error: missing Debian packages ${missing[*]}; install them as root with apt-get" >&2
  exit 1
fi
echo "[node] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
# Debian's package starts containerd where systemd runs; the tests start their own.
