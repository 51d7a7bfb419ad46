#!/usr/bin/env bash
# Runs the whole test suite as CI does: install, format, lints, every test on real CRIU.
# Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== binaries (the tests run the agent, kybernatectl, the shim and the S3 test server)"
cargo build --workspace --bins
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  echo "cargo-nextest is not installed; using cargo test"
  cargo test --workspace --no-fail-fast
fi
