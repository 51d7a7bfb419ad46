#!/usr/bin/env bash
# Runs the whole test suite as CI does: install, format, lints, dependency policy, every test
# on real CRIU.
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

# One compilation serves the lints and the tests. clippy-driver compiles the workspace's own
# crates in place of rustc and runs clippy's lints (warnings denied) as it does, the same lints
# as `cargo clippy --workspace --all-targets -- -D warnings`; dependencies compile with plain
# rustc. A separate `cargo clippy` would type-check every crate a second time. The wrapper is
# part of cargo's fingerprint, so it stays set for nextest, which then builds nothing more: the
# tests run the agent, kybernatectl, the shim and the S3 test server from target/debug.
# CLIPPY_ARGS is how cargo-clippy itself hands its arguments to clippy-driver.
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
stage build "cargo build --workspace --all-targets, linted by clippy-driver"
cargo build --workspace --all-targets

# Licenses, banned crates (one TLS backend, one nix) and sources of the dependencies, from
# the registry cache the build filled. Advisories are not checked: the RustSec database cannot
# be fetched from these machines. The Kubernetes policy scan (checkov) is a test in
# controller/tests/manifests.rs.
stage policy "cargo deny check licenses bans sources; module cycles"
cargo deny --offline --log-level error check licenses bans sources
# No module may depend on a sibling that depends back on it (listed exceptions aside).
python3 scripts/module_cycles.py --self-test
python3 scripts/module_cycles.py

stage tests "cargo nextest run"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  echo "cargo-nextest is not installed; using cargo test"
  cargo test --workspace --no-fail-fast
fi
