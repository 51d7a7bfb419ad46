#!/usr/bin/env bash
# Real-GPU smoke check: VRAM survives CUDA checkpoint -> CRIU dump (kill) -> CRIU
# restore -> CUDA restore, with each phase timed. See README.md.
#
# usage: perf/gpu-smoke/run.sh [MiB]        (root; criu on PATH; NVIDIA driver >= 570)
set -euo pipefail

MIB=${1:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROFILE=${PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/$PROFILE

cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --profile "$PROFILE" -p kybernate-gpu-smoke

WORK=$(mktemp -d /dev/shm/gpu-smoke.XXXXXX)
echo "work dir: $WORK"

# Own session, stdio off the terminal: what CRIU needs to dump a bare process.
setsid "$BIN/gpu-smoke" "$MIB" "$WORK/state" </dev/null >"$WORK/smoke.log" 2>&1 &
PID=$!
trap 'kill -9 $PID 2>/dev/null || true' EXIT

sweeps() { sed -n 's/^sweeps=\([0-9]*\).*/\1/p' "$WORK/state" 2>/dev/null || true; }
wait_sweeps() { # wait_sweeps N: until N verified sweeps, failing on an error status
	local want=$1 deadline=$((SECONDS + 600))
	while :; do
		if grep -q 'status=error' "$WORK/state" 2>/dev/null; then
			echo "FAIL: $(cat "$WORK/state")"; exit 1
		fi
		local have; have=$(sweeps)
		if [ -n "$have" ] && [ "$have" -ge "$want" ]; then return; fi
		if [ $SECONDS -ge $deadline ]; then echo "FAIL: no progress ($(cat "$WORK/state" 2>/dev/null))"; exit 1; fi
		sleep 0.05
	done
}

wait_sweeps 1
echo "pid $PID holds $MIB MiB of verified VRAM; checkpointing"
"$BIN/gpu-cycle" "$PID" "$WORK/images" | tee "$WORK/phases.json"
BEFORE=$(sweeps)
wait_sweeps $((BEFORE + 2))
echo "PASS: restored process verified all $MIB MiB twice more (sweeps $(sweeps)); phases in $WORK/phases.json"
