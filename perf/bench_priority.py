#!/usr/bin/env python3
"""Priority classes in the data plane: how much a background drain that is running slows a
checkpoint's store, with the classes (the drain yields at its next chunk) and without them
(the drain in the checkpoint's class), against the same store with nothing else running.
All three go through one data plane (one gate, one chunk writer, one buffer pool) in the
same process and run, each into a fresh NVMe tier, so nothing is deduplicated between them
(`dataplane-bench priority`, perf/dataplane/src/priority.rs).

Usage: python3 perf/bench_priority.py [--mib 512] [--runs 3] [--work /var/tmp/kyb-prio]
With DATAPLANE_BENCH_BIN set, that binary is used instead of a fresh release build.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import ROOT, machine_text, now_utc, target_dir  # noqa: E402

LINE = re.compile(r"run=\d+ alone_s=([0-9.]+) with_background_drain_s=([0-9.]+) "
                  r"with_unprioritised_drain_s=([0-9.]+)")


def bench_binary():
    """(path, how it was built)."""
    path = os.environ.get("DATAPLANE_BENCH_BIN")
    if path:
        if not os.access(path, os.X_OK):
            raise SystemExit(f"DATAPLANE_BENCH_BIN={path} is missing or not executable")
        return path, "prebuilt (DATAPLANE_BENCH_BIN)"
    subprocess.run(["cargo", "build", "--release", "-p", "kybernate-dataplane-bench"], cwd=ROOT, check=True)
    return os.path.join(target_dir(), "release", "dataplane-bench"), "release"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="/dev/shm/kyb-prio-image")
    parser.add_argument("--work", default="/var/tmp/kyb-prio")
    args = parser.parse_args()
    exe, build = bench_binary()
    shutil.rmtree(args.image, ignore_errors=True)
    try:
        subprocess.run([exe, "generate", args.image, str(args.mib)], check=True)
        cmd = [exe, "priority", args.image, args.work, str(args.runs)]
        print("running: " + " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        shutil.rmtree(args.image, ignore_errors=True)
        shutil.rmtree(args.work, ignore_errors=True)
    print(out.stdout + out.stderr, flush=True)
    if out.returncode != 0:
        raise SystemExit(f"dataplane-bench priority failed (exit {out.returncode})")
    runs = [tuple(float(x) for x in m.groups()) for m in map(LINE.search, out.stdout.splitlines()) if m]
    if len(runs) != args.runs:
        raise SystemExit(f"expected {args.runs} result lines, got {len(runs)}")
    alone, yielding, sharing = (statistics.median(col) for col in zip(*runs))
    print(f"\n{now_utc()} on {machine_text()}, {build} build, {args.mib} MiB image, {args.runs} runs (medians):")
    print(f"| case | checkpoint store, s | vs alone |")
    print(f"| --- | --- | --- |")
    print(f"| alone | {alone:.3f} | 1.00× |")
    print(f"| with a background drain running (priority classes) | {yielding:.3f} | {yielding / alone:.2f}× |")
    print(f"| with the same drain unprioritised (same class) | {sharing:.3f} | {sharing / alone:.2f}× |")


if __name__ == "__main__":
    main()
