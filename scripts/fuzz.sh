#!/usr/bin/env bash
# Runs one fuzz target for SECONDS under libFuzzer (cargo-fuzz) and prints the executions
# and the crashes found. Works on the stable toolchain: with `--sanitizer none` cargo-fuzz
# passes rustc only stable flags (`-Cpasses=sancov-module` and SanitizerCoverage options for
# the coverage feedback), never a `-Z` flag, so no nightly and no RUSTC_BOOTSTRAP is needed.
# Installs cargo-fuzz (pinned) on first use; libFuzzer itself comes with the libfuzzer-sys
# crate and is compiled with the system's C++ compiler.
#
#   scripts/fuzz.sh TARGET SECONDS     TARGET: manifest record rootfs_diff config request
#   scripts/fuzz.sh list
#
# Seeds are read from fuzz/corpus/TARGET (kept in git); inputs that reach new code are added
# to fuzz/corpus-new/TARGET (not in git). The run goes on after a crash (libFuzzer's fork
# mode), and every crashing input is saved as fuzz/artifacts/TARGET/crash-*. To keep one as
# a regression test, fix the bug, then copy the input to fuzz/regressions/TARGET/ (the
# corpus replay test in testing/fuzz-targets runs every file there in CI).
# The instrumented build has its own target dir, fuzz/target (a few GB; delete when done).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
TARGETS="manifest record rootfs_diff config request"
root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "fuzz.sh: $*" >&2; }
usage() { log "usage: scripts/fuzz.sh TARGET SECONDS (targets: $TARGETS) | scripts/fuzz.sh list"; exit 2; }

target=${1:-}
[ "$target" = list ] && { echo "$TARGETS" | tr ' ' '\n'; exit 0; }
seconds=${2:-}
[[ " $TARGETS " == *" $target "* ]] || usage
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION (a few minutes on 2 cores)"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
command -v c++ >/dev/null || { log "libFuzzer needs a C++ compiler (apt-get install g++)"; exit 1; }

cd "$root/fuzz"
mkdir -p "corpus-new/$target" "artifacts/$target"
before=$(find "artifacts/$target" -type f | wc -l)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# --dev keeps debug assertions and overflow checks (an overflow is a crash); the profile in
# fuzz/Cargo.toml still optimises the parsers.
export CARGO_INCREMENTAL=0
cargo fuzz build --dev --sanitizer none "$target"
log "running $target for $seconds s"
set +e
cargo fuzz run --dev --sanitizer none "$target" "corpus-new/$target" "corpus/$target" -- \
  -max_total_time="$seconds" -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
  -timeout=10 -rss_limit_mb=2048 2>&1 | tee "$out" | grep --line-buffered -E '^#[0-9]+:|INFO: (exiting|fuzzed)|Test unit written|panicked'
status=${PIPESTATUS[0]}
set -e
after=$(find "artifacts/$target" -type f | wc -l)
# Fork mode reports "#<executions>: cov: ... exec/s <n> oom/timeout/crash: a/b/c time: <s>s".
last=$(grep -E '^#[0-9]+:' "$out" | tail -1 || true)
execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
failures=$(sed -nE 's/.*oom\/timeout\/crash: ([0-9]+\/[0-9]+\/[0-9]+).*/\1/p' <<<"$last")
corpus=$(find "corpus-new/$target" -type f | wc -l)
echo "target=$target seconds=$seconds executions=${execs:-0} exec_per_sec=$(( ${execs:-0} / seconds ))" \
  "oom/timeout/crash=${failures:-0/0/0} new_artifacts=$((after - before))" \
  "corpus_new=$corpus libfuzzer_status=$status"
if [ "$after" -gt "$before" ]; then
  log "crashing inputs:"
  find "artifacts/$target" -type f -newer "$out" >&2
  exit 1
fi
