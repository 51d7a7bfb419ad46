#!/usr/bin/env bash
# Classic against custom-storage CUDA checkpoints, side by side, reported as GB/s of VRAM
# end to end to a disk (CUDA checkpoint + CRIU dump --leave-running + syncfs).
#
# usage: perf/gpu-smoke/modes.sh [MiB per process] [processes] [runs] [disk dir]
#   On a GPU machine (driver branch 615 / CUDA 13.4 or newer) it measures gpu-smoke
#   processes on the real GPUs. With FAKE=1 it sets up the fake driver with one fake GPU
#   per process and measures gpu-workload processes (what perf/RESULTS.md records here).
# Root, CRIU 4.2 on PATH.
set -euo pipefail

MIB=${1:-256}
PROCS=${2:-2}
RUNS=${3:-3}
DISK=${4:-/var/tmp}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROFILE=${PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --profile "$PROFILE" \
	-p kybernate-gpu-smoke -p kybernate-gpu-workload -p kybernate-fake-libcuda

WORK=$(mktemp -d "$DISK/gpu-modes.XXXXXX")
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

if [ "${FAKE:-0}" = 1 ]; then
	NODE=$(mktemp -d /dev/shm/gpu-modes-node.XXXXXX)
	mkdir "$NODE/lib"
	ln -s "$BIN/libkybernate_fake_libcuda.so" "$NODE/lib/libcuda.so.1"
	ln -s "$BIN/libkybernate_fake_libcuda.so" "$NODE/lib/libnvidia-ml.so.1"
	for i in $(seq 0 $((PROCS - 1))); do
		printf 'GPU-%08d-0000-0000-0000-000000000000 16384 Kybernate Fake GPU\n' "$i"
	done >"$NODE/devices"
	echo 13040 >"$NODE/driver_version"
	echo 615.20.04 >"$NODE/driver_release"
	export LD_LIBRARY_PATH="$NODE/lib" KYBERNATE_FAKE_CUDA_DIR="$NODE"
	trap 'cleanup; rm -rf "$NODE"' EXIT
	for i in $(seq 0 $((PROCS - 1))); do
		mkdir -p "$WORK/state-$i"
		setsid "$BIN/gpu-workload" --mib "$MIB" --device "$i" --state-dir "$WORK/state-$i" \
			</dev/null >"$WORK/workload-$i.log" 2>&1 &
		PIDS+=($!)
	done
	ready() { grep -qs 'status=ok' "$WORK"/state-"$1"/*.state; }
else
	for i in $(seq 0 $((PROCS - 1))); do
		CUDA_VISIBLE_DEVICES=$i setsid "$BIN/gpu-smoke" "$MIB" "$WORK/state-$i" \
			</dev/null >"$WORK/smoke-$i.log" 2>&1 &
		PIDS+=($!)
	done
	ready() { grep -qs 'status=ok' "$WORK/state-$1"; }
fi
for i in $(seq 0 $((PROCS - 1))); do
	for _ in $(seq 600); do ready "$i" && break; sleep 0.1; done
	ready "$i" || { echo "FAIL: process $i never held its VRAM"; exit 1; }
done
echo "$PROCS processes x $MIB MiB of VRAM; measuring into $WORK"
"$BIN/gpu-modes" "$WORK/ckpt" "$RUNS" "${PIDS[@]}"
