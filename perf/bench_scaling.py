#!/usr/bin/env python3
"""Scaling: checkpoint and restore latency per phase, through the agent, against process size.

For each size (default 64 MiB, 256 MiB, 1 GiB, 4 GiB) and each run: a fresh
`kybernatectl workload --mib N` is checkpointed with `kybernatectl --output json checkpoint`
(the agent reports every phase in ms: cuda_*, criu_dump, store_ram, digest, store_nvme, ...),
then restored with `kybernatectl --output json restore NAME --from ram` (verify_ram,
wait_pid, criu_restore, cuda_*), and must count on from where it stopped. Baseline in the same
run: bare `criu dump` / `criu restore` of the same size into tmpfs. The RAM tier is on tmpfs
(/dev/shm), the NVMe tier on disk (/var/tmp), as on a node.

Per phase, a least-squares line time = a + size / throughput through the per-size medians
gives the fitted GB/s (1 GB = 1e9 bytes of CRIU image).

Usage (root): python3 perf/bench_scaling.py [--sizes 64,256,1024,4096] [--runs 3]
              [--json OUT] [--write perf/RESULTS.md] [--quick]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_agent import bare_criu  # noqa: E402
from benchkit import (Agent, binaries, comparison, continued, kill, machine_text, now_utc, pid_gone,  # noqa: E402
                      read_status, require_root, start_workload, stats, update_section, wait_until, write_json)


def one_run(agent, ctl, mib, name):
    status = os.path.join(agent.work, f"status-{name}")
    proc = start_workload(ctl, mib, status)
    t0 = time.monotonic()
    reply = agent.ctl("checkpoint", "--pid", str(proc.pid), "--name", name)
    checkpoint_total = time.monotonic() - t0
    proc.wait()
    at_dump = read_status(status)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    t0 = time.monotonic()
    restored = agent.ctl("restore", name, "--from", "ram")
    restore_total = time.monotonic() - t0
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(restored["pid"])
    agent.ctl("delete", name)
    return {
        "raw_bytes": reply["raw_bytes"],
        "checkpoint": {k: v / 1000.0 for k, v in reply["phases"].items()},
        "restore": {k: v / 1000.0 for k, v in restored["phases"].items()},
        "checkpoint_total": checkpoint_total,
        "restore_total": restore_total,
    }


def fit(xs, ys):
    """Least squares y = a + b x. Returns (a, b, r2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    syy = sum((y - my) ** 2 for y in ys)
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else 0.0
    return a, b, r2


def fits(sizes, operation):
    """Fitted throughput of every phase of `operation` across sizes (medians per size)."""
    phases = sorted({p for s in sizes for p in s[operation]})
    out = {}
    xs = [s["raw_bytes"]["median"] / 1e9 for s in sizes]
    for phase in phases + ["total"]:
        ys = [s[operation][phase]["median"] if phase != "total" else s[f"{operation}_total"]["median"]
              for s in sizes]
        a, b, r2 = fit(xs, ys)
        # A phase that does not grow with size (or shrinks within the noise) has no throughput.
        grows = b > 0 and max(ys) >= 0.005
        out[phase] = {"intercept_s": a, "seconds_per_gb": b, "gb_per_s": (1.0 / b) if grows else None, "r2": r2}
    return out


def markdown(doc):
    lines = ["<!-- bench_scaling:start -->", "### Scaling: checkpoint and restore phases against process size", "",
             f"Measured {doc['date']} on {machine_text(doc['machine'])}, {doc['build']} build, {doc['runs']} runs "
             f"per size, medians in ms (min–max). RAM tier on tmpfs, NVMe tier on disk. Command: `{doc['command']}`",
             ""]
    for operation in ("checkpoint", "restore"):
        phases = list(doc["fits"][operation])
        lines.append(f"**{operation}** (client-observed total, then each phase the agent reports)")
        lines.append("")
        lines.append("| size | " + " | ".join(phases) + " |")
        lines.append("| --- " * (len(phases) + 1) + "|")
        for s in doc["sizes"]:
            cells = []
            for p in phases:
                st = s[f"{operation}_total"] if p == "total" else s[operation].get(p)
                cells.append("–" if st is None else
                             f"{st['median'] * 1e3:.0f} ({st['min'] * 1e3:.0f}–{st['max'] * 1e3:.0f})")
            lines.append(f"| {s['mib']} MiB | " + " | ".join(cells) + " |")
        cells = []
        for p in phases:
            f = doc["fits"][operation][p]
            cells.append(f"{f['gb_per_s']:.2f} GB/s (r²={f['r2']:.2f})" if f["gb_per_s"] else "flat")
        lines.append("| fitted | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Fitted throughput: least squares of the per-size medians, time = a + bytes / throughput, "
                 "bytes = CRIU image size; \"flat\" = does not grow with size.")
    lines.append("<!-- bench_scaling:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256,1024,4096", help="MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16, 32, 64 MiB, 1 run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare CRIU runs")
    parser.add_argument("--json", help="write the results here (perf/README.md: the harness convention)")
    parser.add_argument("--write", help="results file whose bench_scaling section to update")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.runs = "16,32,64", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        raise SystemExit("bench_scaling.py: a fit needs at least two sizes")
    require_root()
    agent_bin, ctl, build = binaries()
    results = []
    with Agent(agent_bin, ctl, ram_parent="/dev/shm", nvme_parent="/var/tmp") as agent:
        for mib in sizes:
            runs, bare = [], []
            for run in range(args.runs):
                if not args.no_baseline:
                    bare.append(bare_criu(ctl, mib, agent.work))
                runs.append(one_run(agent, ctl, mib, f"scale-{mib}-{run}"))
                r = runs[-1]
                print(f"{mib} MiB run {run + 1}: checkpoint {r['checkpoint_total']:.3f}s "
                      f"{ {k: round(v * 1e3) for k, v in r['checkpoint'].items()} } | restore "
                      f"{r['restore_total']:.3f}s { {k: round(v * 1e3) for k, v in r['restore'].items()} }"
                      + (f" | bare dump {bare[-1][0]:.3f}s restore {bare[-1][1]:.3f}s" if bare else ""),
                      flush=True)
            entry = {"mib": mib, "raw_bytes": stats([r["raw_bytes"] for r in runs]),
                     "checkpoint_total": stats([r["checkpoint_total"] for r in runs]),
                     "restore_total": stats([r["restore_total"] for r in runs])}
            for operation in ("checkpoint", "restore"):
                names = sorted({p for r in runs for p in r[operation]})
                entry[operation] = {p: stats([r[operation].get(p, 0.0) for r in runs]) for p in names}
            if bare:
                entry["bare_dump"] = stats([b[0] for b in bare])
                entry["bare_restore"] = stats([b[1] for b in bare])
                entry["comparisons"] = [
                    comparison(f"{mib} MiB: freeze (criu_dump phase)", "agent",
                               [r["checkpoint"]["criu_dump"] for r in runs], "bare CRIU", [b[0] for b in bare],
                               entry["raw_bytes"]["median"]),
                    comparison(f"{mib} MiB: restore from RAM (end to end)", "agent",
                               [r["restore_total"] for r in runs], "bare CRIU", [b[1] for b in bare],
                               entry["raw_bytes"]["median"]),
                ]
            results.append(entry)
    command = f"python3 perf/bench_scaling.py --sizes {','.join(map(str, sizes))} --runs {args.runs}" + \
        (" --no-baseline" if args.no_baseline else "")
    doc = {
        "name": "scaling",
        "title": "Scaling: checkpoint and restore phases against process size",
        "command": command,
        "date": now_utc(),
        "runs": args.runs,
        "build": build,
        "sizes": results,
        "fits": {op: fits(results, op) for op in ("checkpoint", "restore")},
        "comparisons": [c for s in results for c in s.get("comparisons", [])],
        "section": "bench_scaling",
    }
    from benchkit import machine
    doc["machine"] = machine()
    doc["markdown"] = markdown(doc)
    print(doc["markdown"])
    if args.write:
        update_section(args.write, doc["markdown"], "bench_scaling")
    if args.json:
        write_json(args.json, doc)


if __name__ == "__main__":
    main()
