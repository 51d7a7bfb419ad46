#!/usr/bin/env bash
# Installs the tools perf/ checks need, idempotently, as root on Debian 12:
# - prometheus: the dashboard test scrapes a real agent and evaluates every panel's PromQL;
# - chromium: the report test renders perf/'s HTML report headless and screenshots it.
# Called from scripts/install-test-deps.sh.
set -euo pipefail

log() { echo "install-perf-tools: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

packages=(prometheus chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt-get update -qq
  # No recommends: node-exporter and the font/desktop extras are not needed here. The
  # Debian prometheus package would start its own service; the tests run private instances.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in prometheus chromium; do
  command -v "$tool" >/dev/null || { log "$tool is not on PATH after installing"; exit 1; }
done
log "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}'), $(chromium --version 2>/dev/null | head -1)"
