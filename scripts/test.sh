#!/usr/bin/env bash
# Runs the whole test suite as CI does: install, format, lints, every test on real CRIU.
# Run as root on Debian 12. Prints how long each stage took at the end, also when a stage
# fails.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
timings=()
stage_name=""
stage_started=0

finish_stage() {
  [ -n "$stage_name" ] || return 0
  timings+=("$(printf '%-12s %5d s' "$stage_name" $(($(date +%s) - stage_started)))")
  stage_name=""
}

stage() {
  finish_stage
  stage_name=$1
  stage_started=$(date +%s)
  echo "== $1: $2"
}

report() {
  local status=$?
  finish_stage
  echo "== stage durations"
  printf '  %s\n' "${timings[@]}"
  printf '  %-12s %5d s (exit %d)\n' "total" $(($(date +%s) - started)) "$status"
}
trap report EXIT

stage install "scripts/install-test-deps.sh"
bash scripts/install-test-deps.sh

stage fmt "cargo fmt --check"
cargo fmt --all -- --check

stage clippy "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# One build of every target (libraries, binaries, tests) with the features the tests use,
# so that nextest builds nothing more: the tests run the agent, kybernatectl, the shim and
# the S3 test server from target/debug.
stage build "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

stage tests "cargo nextest run"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  echo "cargo-nextest is not installed; using cargo test"
  cargo test --workspace --no-fail-fast
fi
