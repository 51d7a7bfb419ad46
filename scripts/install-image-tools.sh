#!/usr/bin/env bash
# Installs what building Kybernate's container images needs without a Docker engine, and
# builds the local Debian bookworm slim base image (scripts/build-base-image.sh), whose
# rootfs is fetched once from Debian's mirror and cached. Idempotent; run as root.
set -euo pipefail

log() { echo "install-image-tools: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

packages=(buildah debootstrap binutils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash "$(dirname "$0")/build-base-image.sh"
