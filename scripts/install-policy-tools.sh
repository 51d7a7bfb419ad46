#!/usr/bin/env bash
# Installs cargo-deny (licenses, bans and sources of the Rust dependencies; scripts/test.sh
# runs it with deny.toml). Debian does not package it, so it is built from crates.io with
# the locked dependencies of its release. Idempotent. checkov, the Kubernetes policy scanner,
# comes with scripts/install-k8s-tools.sh.
set -euo pipefail

VERSION=0.20.2
log() { echo "install-policy-tools: $*" >&2; }

if cargo deny --version 2>/dev/null | grep -q " $VERSION\$"; then
  log "cargo-deny $VERSION already installed"
else
  log "building cargo-deny $VERSION (a few minutes on 2 cores)"
  cargo install --quiet --locked cargo-deny --version "$VERSION"
  log "installed $(cargo deny --version)"
fi
