#!/usr/bin/env python3
"""Data plane vs pzstd, dd oflag=direct and s5cmd: runs `dataplane-bench suite` (issue 3's
comparison, perf/dataplane) and turns its table into the harness's result file.

The suite generates a fixed CRIU-like image set, runs every step (ours and each baseline)
as a child process several times in the same run and reports the median wall time of each
step; it prints medians only, so the spread shown here is that of the medians (none). It
needs root (it drops the page cache), `pzstd` and `s5cmd` (scripts/install-dataplane-deps.sh).

Usage (root): python3 perf/bench_dataplane.py [--size-mib 1024] [--runs 3] [--json OUT] [--quick]
With DATAPLANE_BENCH_BIN set, that binary is used instead of a fresh release build.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import ROOT, comparison, machine_text, now_utc, require_root, target_dir, write_json  # noqa: E402

# One row of the suite's table: step, median wall, CPU s/GiB, peak RSS, peak anon RSS, command.
ROW = re.compile(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9]+) \| (\S+) \| `(.*)` \|$")
# (metric, ours step, baseline label, baseline step); every row moves the whole image.
COMPARISONS = [
    ("drain to NVMe vs pzstd piped to dd", "1 drain: kybernate → NVMe", "pzstd -1 -p 2 | dd oflag=direct",
     "1 drain: pzstd -1 -p 2 | dd oflag=direct"),
    ("drain to NVMe vs raw dd", "1 drain: kybernate → NVMe", "dd oflag=direct", "1 drain: dd oflag=direct (raw)"),
    ("restore from NVMe vs pzstd -d", "2 restore: kybernate NVMe → tmpfs", "pzstd -d -p 2",
     "2 restore: pzstd -d -p 2"),
    ("upload to S3 vs s5cmd", "4 upload: kybernate → S3", "s5cmd cp", "4 upload: s5cmd cp"),
    ("download from S3 vs s5cmd", "5 download: kybernate S3 → tmpfs", "s5cmd cp", "5 download: s5cmd cp"),
]


def suite_binary():
    """(path, how it was built)."""
    path = os.environ.get("DATAPLANE_BENCH_BIN")
    if path:
        if not os.access(path, os.X_OK):
            raise SystemExit(f"DATAPLANE_BENCH_BIN={path} is missing or not executable")
        return path, "prebuilt (DATAPLANE_BENCH_BIN)"
    subprocess.run(["cargo", "build", "--release", "-p", "kybernate-dataplane-bench"], cwd=ROOT, check=True)
    return os.path.join(target_dir(), "release", "dataplane-bench"), "release"


def parse(table):
    """{step: {"wall": s, "cpu_per_gib": s, "command": str}} from the suite's Markdown."""
    rows = {}
    for line in table.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1)] = {"wall": float(m.group(2)), "cpu_per_gib": float(m.group(3)),
                                "command": m.group(6)}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the harness result file here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, one run")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.runs = 64, 1
    require_root()
    for tool in ("pzstd", "s5cmd"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not on PATH: run scripts/install-dataplane-deps.sh")
    exe, build = suite_binary()
    suite = [exe, "suite", "--size-mib", str(args.size_mib), "--runs", str(args.runs)]
    print("running: " + " ".join(suite), flush=True)
    out = subprocess.run(suite, cwd=ROOT, capture_output=True, text=True)
    print(out.stdout + out.stderr, flush=True)
    if out.returncode != 0:
        raise SystemExit(f"dataplane-bench suite failed (exit {out.returncode})")
    steps = parse(out.stdout)
    missing = sorted({s for c in COMPARISONS for s in (c[1], c[3])} - steps.keys())
    if missing:
        raise SystemExit(f"dataplane-bench suite printed no row for {', '.join(missing)}")

    image_bytes = args.size_mib << 20
    rows = []
    for metric, ours, base_label, base in COMPARISONS:
        row = comparison(metric, "kybernate", [steps[ours]["wall"]], base_label, [steps[base]["wall"]],
                         bytes_moved=image_bytes, baseline_command=steps[base]["command"])
        row["ours"]["command"] = steps[ours]["command"]
        rows.append(row)
    command = (f"python3 perf/bench_dataplane.py --size-mib {args.size_mib} --runs {args.runs}"
               + (" --quick" if args.quick else ""))
    date = now_utc()
    report = "\n".join([
        "<!-- bench_dataplane:start -->",
        f"### Data plane suite through the harness, {args.size_mib} MiB image",
        "",
        f"Measured {date} on {machine_text()}, {build} build, {args.runs} runs, median wall time per step "
        f"(the suite reports medians only). Command: `{command}` "
        f"(runs `dataplane-bench suite --size-mib {args.size_mib} --runs {args.runs}`).",
        "",
        out.stdout.strip(),
        "<!-- bench_dataplane:end -->",
    ])
    if args.json:
        write_json(args.json, {
            "name": "dataplane",
            "title": f"Data plane vs pzstd, dd and s5cmd, {args.size_mib} MiB image",
            "command": command,
            "date": date,
            "runs": args.runs,
            "build": build,
            "comparisons": rows,
            "steps": steps,
            "markdown": report,
            "section": "bench_dataplane",
        })


if __name__ == "__main__":
    main()
