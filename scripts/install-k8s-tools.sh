#!/usr/bin/env bash
# Installs the offline Kubernetes manifest validator the controller's tests use:
# kubernetes-validate (PyPI; ships the API schemas up to Kubernetes 1.37). Idempotent.
set -euo pipefail

log() { echo "install-k8s-tools: $*" >&2; }

if command -v kubernetes-validate >/dev/null 2>&1; then
  log "kubernetes-validate $(kubernetes-validate --version 2>&1) already installed"
  exit 0
fi
PIP=$(command -v pip3 || command -v pip || true)
if [ -z "$PIP" ]; then
  log "pip is missing; installing python3-pip from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  PIP=$(command -v pip3)
fi
# Debian's own Python refuses system-wide pip installs unless told otherwise.
"$PIP" install --quiet 'kubernetes-validate>=1.37,<2' 2>/dev/null \
  || "$PIP" install --quiet --break-system-packages 'kubernetes-validate>=1.37,<2'
hash -r
command -v kubernetes-validate >/dev/null 2>&1 || {
  log "kubernetes-validate was installed but is not on PATH"; exit 1; }
log "installed kubernetes-validate $(kubernetes-validate --version 2>&1)"
