#!/usr/bin/env bash
# Installs what only the test suite and the benchmarks use, on top of scripts/install-deps.sh
# (which the demo needs alone), idempotently, as root on Debian 12:
# - containerd 1.6 + runc 1.1 (bookworm) and containerd 2.1 (sid, private prefix), through
#   scripts/install-containerd.sh. runc stays bookworm's: a loader-wrapped runc cannot
#   re-exec itself for `runc init`;
# - busybox-static, the rootfs of the test containers (scripts/make-busybox-oci.sh);
# - the data-plane baselines (pzstd, s5cmd), the offline Kubernetes tools, the image tools
#   with the local base image, Prometheus + Chromium for perf/'s checks, and cargo-deny
#   (scripts/install-policy-tools.sh).
set -euo pipefail
here=$(dirname "$0")

bash "$here/install-deps.sh"
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  echo "install-test-deps: installing busybox-static from bookworm" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
bash "$here/install-containerd.sh"
bash "$here/install-dataplane-deps.sh"
bash "$here/install-k8s-tools.sh"
bash "$here/install-image-tools.sh"
bash "$here/install-perf-tools.sh"
bash "$here/install-policy-tools.sh"
