#!/usr/bin/env bash
# Real-GPU smoke check through the agent: VRAM survives `kybernatectl checkpoint` (CUDA lock +
# checkpoint, CRIU dump, which kills the process) and `kybernatectl restore` (CRIU restore,
# CUDA restore + unlock), with every phase timed by the agent. See README.md.
#
# usage: perf/gpu-smoke/run.sh [MiB]        (root; CRIU 4.2 on PATH; NVIDIA driver >= 570)
set -euo pipefail

MIB=${1:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROFILE=${PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --profile "$PROFILE" \
	-p kybernate-gpu-smoke -p kybernate-agent --bins

WORK=$(mktemp -d /dev/shm/gpu-smoke.XXXXXX)
SOCKET=$WORK/agent.sock
echo "work dir: $WORK"
"$BIN/kybernate-agent" --state-dir "$WORK/agent" --socket "$SOCKET" --metrics-addr 127.0.0.1:0 \
	2>"$WORK/agent.log" &
AGENT=$!
PID=
cleanup() {
	[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
	kill "$AGENT" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 200); do [ -S "$SOCKET" ] && break; sleep 0.05; done
[ -S "$SOCKET" ] || { echo "FAIL: agent did not start: $(cat "$WORK/agent.log")"; exit 1; }
grep -q "CUDA driver loaded" "$WORK/agent.log" || { echo "FAIL: the agent found no CUDA driver: $(cat "$WORK/agent.log")"; exit 1; }
ctl() { "$BIN/kybernatectl" --socket "$SOCKET" --output json "$@"; }

# Own session, stdio off the terminal: what CRIU needs to dump a bare process.
setsid "$BIN/gpu-smoke" "$MIB" "$WORK/state" </dev/null >"$WORK/smoke.log" 2>&1 &
PID=$!

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
echo "pid $PID holds $MIB MiB of verified VRAM; checkpointing through the agent"
ctl checkpoint --pid "$PID" --name gpu-smoke | tee "$WORK/checkpoint.json"
wait "$PID" 2>/dev/null || true
while [ -e "/proc/$PID" ]; do sleep 0.01; done
ctl restore gpu-smoke --from ram | tee "$WORK/restore.json"
BEFORE=$(sweeps)
wait_sweeps $((BEFORE + 2))
echo "PASS: restored process verified all $MIB MiB twice more (sweeps $(sweeps))"
echo "phases (ms): checkpoint $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["phases"])' "$WORK/checkpoint.json"), restore $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["phases"])' "$WORK/restore.json")"
