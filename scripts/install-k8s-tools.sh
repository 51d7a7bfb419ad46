#!/usr/bin/env bash
# Installs the offline Kubernetes tools the controller's tests use, all from PyPI:
# kubernetes-validate (ships the API schemas up to Kubernetes 1.37), helm-python-sdk
# (Helm v4's own Go SDK as a shared library, to render the chart the way `helm template`
# does; Helm itself is not packaged for Debian 12) and the policy scanner checkov (in its own
# virtualenv, $CHECKOV_VENV: it pins many libraries). Idempotent.
set -euo pipefail

log() { echo "install-k8s-tools: $*" >&2; }

pip_install() {
  local PIP
  PIP=$(command -v pip3 || command -v pip || true)
  if [ -z "$PIP" ]; then
    log "pip is missing; installing python3-pip from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    PIP=$(command -v pip3)
  fi
  # Debian's own Python refuses system-wide pip installs unless told otherwise.
  "$PIP" install --quiet "$@" 2>/dev/null \
    || "$PIP" install --quiet --break-system-packages "$@"
  hash -r
}

if command -v kubernetes-validate >/dev/null 2>&1; then
  log "kubernetes-validate $(kubernetes-validate --version 2>&1) already installed"
else
  pip_install 'kubernetes-validate>=1.37,<2'
  command -v kubernetes-validate >/dev/null 2>&1 || {
    log "kubernetes-validate was installed but is not on PATH"; exit 1; }
  log "installed kubernetes-validate $(kubernetes-validate --version 2>&1)"
fi

if python3 -c 'import helm_python' >/dev/null 2>&1; then
  log "helm-python-sdk already installed"
else
  pip_install 'helm-python-sdk==0.2.2'
  python3 -c 'import helm_python as h; print(h.helm_sdk_version())' >/dev/null || {
    log "helm-python-sdk was installed but does not import"; exit 1; }
  log "installed helm-python-sdk (Helm SDK $(python3 -c 'import helm_python as h; print(h.helm_sdk_version())'))"
fi

CHECKOV_VENV=/opt/kybernate/venv-checkov
if "$CHECKOV_VENV/bin/checkov" --version >/dev/null 2>&1; then
  log "checkov $("$CHECKOV_VENV/bin/checkov" --version) already installed"
else
  rm -rf "$CHECKOV_VENV"
  python3 -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install --quiet 'checkov>=3.2,<4'
  log "installed checkov $("$CHECKOV_VENV/bin/checkov" --version) in $CHECKOV_VENV"
fi
