#!/usr/bin/env python3
"""Runs every Kybernate benchmark, prints the ratios against the baselines measured in the
same run, updates perf/RESULTS.md and writes a self-contained HTML report.

Benchmarks are the files perf/bench_*.py; each follows the convention in perf/README.md
(`--json OUT` writes medians, spread, baselines and the exact command). A benchmark the
project expects but that is not in the tree is listed as "not present", with no numbers.

Usage (root): python3 perf/run.py [--only agent,scaling] [--quick] [--out perf/out]
              [--results perf/RESULTS.md | --no-results] [--report FILE]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchkit import ROOT, machine, machine_text, now_utc, update_section  # noqa: E402
import report  # noqa: E402

# What the project's issues ask to be measured; matched by file-name prefix.
EXPECTED = [
    ("agent", "bench_agent", "agent vs bare CRIU"),
    ("dataplane", "bench_dataplane", "data plane vs pzstd, dd and s5cmd"),
    ("shim", "bench_shim", "containerd shim vs the stock runc shim (io.containerd.runc.v2)"),
    ("scaling", "bench_scaling", "checkpoint/restore phases against process size"),
]
REQUIRED_KEYS = ("name", "title", "command", "comparisons")


def discover(bench_dir=HERE):
    """[(name, path, description)] for every expected benchmark, path None when absent,
    then any other bench_*.py in `bench_dir` (perf/)."""
    files = sorted(glob.glob(os.path.join(bench_dir, "bench_*.py")))
    out, used = [], set()
    for name, prefix, description in EXPECTED:
        matches = [f for f in files if os.path.basename(f).startswith(prefix)]
        if not matches:
            out.append((name, None, description))
        for i, f in enumerate(matches):
            used.add(f)
            out.append((name if i == 0 else os.path.basename(f)[6:-3], f, description))
    for f in files:
        if f not in used:
            name = os.path.basename(f)[6:-3]
            out.append((name, f, "(not in the expected list)"))
    return out


def run_one(name, path, args):
    """Runs one benchmark; returns its result document or a failure entry."""
    out_json = os.path.join(args.out, f"bench_{name}.json")
    log_path = os.path.join(args.out, f"bench_{name}.log")
    if os.path.exists(out_json):
        os.remove(out_json)
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    cmd = [sys.executable, shown, "--json", out_json] + (["--quick"] if args.quick else [])
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if args.verbose:
                print("   " + line, end="", flush=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
    took = time.monotonic() - started
    tail = "".join(open(log_path).readlines()[-15:])
    if code != 0:
        return {"status": "failed", "reason": f"exit {code} after {took:.0f}s", "log": log_path, "tail": tail}
    try:
        doc = json.load(open(out_json))
    except (OSError, ValueError) as e:
        return {"status": "failed", "reason": f"no valid result file {out_json}: {e}", "log": log_path,
                "tail": tail}
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        return {"status": "failed", "reason": f"{out_json} lacks {', '.join(missing)}", "log": log_path,
                "tail": tail}
    doc["status"] = "ok"
    doc["seconds"] = took
    return doc


def ratio_table(benchmarks):
    rows = []
    for name, doc in benchmarks.items():
        if doc["status"] != "ok":
            rows.append((name, doc["status"] + (f": {doc['reason']}" if "reason" in doc else ""), "", "", ""))
            continue
        for c in doc["comparisons"]:
            o, b = c["ours"], c["baseline"]
            ratio = o["median"] / b["median"] if b["median"] > 0 else float("nan")
            rows.append((name, c["metric"], f"{o['label']} {o['median']:.3f} ({o['min']:.3f}–{o['max']:.3f})",
                         f"{b['label']} {b['median']:.3f} ({b['min']:.3f}–{b['max']:.3f})", f"{ratio:.2f}×"))
    return rows


def print_table(rows):
    head = ("benchmark", "metric", "ours, s: median (min–max)", "baseline, s", "ratio")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def summary_markdown(results, rows):
    lines = ["<!-- run:start -->", "## Latest harness run", "",
             f"Run {results['date']} on {machine_text(results['machine'])}. Command: `{results['command']}`. "
             "Ratios are ours / baseline, both measured in this run (below 1 = faster than the baseline).", "",
             "| benchmark | metric | ours (s) | baseline (s) | ratio |", "| --- | --- | --- | --- | --- |"]
    # A cell may name a shell pipeline; an unescaped "|" would split the Markdown row.
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    lines += ["", "Exact commands:", ""]
    for name, doc in results["benchmarks"].items():
        lines.append(f"- {name}: " + (f"`{doc['command']}`" if doc["status"] == "ok" else doc["status"]))
    lines.append("<!-- run:end -->")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmark names (agent, dataplane, shim, scaling)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="result files, logs and the report")
    parser.add_argument("--results", help="results file to update (default perf/RESULTS.md, not with --quick)")
    parser.add_argument("--no-results", action="store_true", help="leave perf/RESULTS.md alone")
    parser.add_argument("--report", help="HTML report path (default OUT/report.html)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    parser.add_argument("--bench-dir", default=HERE, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="echo every benchmark's output")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    results_file = None if args.no_results else (args.results or (None if args.quick else
                                                                    os.path.join(HERE, "RESULTS.md")))
    only = set(args.only.split(",")) if args.only else None

    found = discover(os.path.abspath(args.bench_dir))
    if only:
        unknown = only - {n for n, _, _ in found}
        if unknown:
            sys.exit(f"run.py: no benchmark named {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(n for n, _, _ in found)}")
    benchmarks = {}
    for name, path, description in found:
        if only and name not in only:
            continue
        if path is None:
            print(f"== {name}: not present (no {dict((n, p) for n, p, _ in EXPECTED)[name]}*.py)")
            benchmarks[name] = {"status": "not present", "description": description}
            continue
        benchmarks[name] = run_one(name, path, args)
        benchmarks[name].setdefault("description", description)
        if benchmarks[name]["status"] != "ok":
            print(f"   FAILED: {benchmarks[name]['reason']}\n{benchmarks[name]['tail']}", flush=True)

    command = "python3 perf/run.py" + "".join(f" {a}" for a in sys.argv[1:])
    results = {"date": now_utc(), "machine": machine(), "command": command, "benchmarks": benchmarks}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = ratio_table(benchmarks)
    print()
    print(f"Kybernate benchmarks, {results['date']}, {machine_text()}")
    print_table(rows)
    report_path = args.report or os.path.join(args.out, "report.html")
    with open(report_path, "w") as f:
        f.write(report.render(results))
    print(f"\nHTML report: {report_path}")
    if results_file:
        for doc in benchmarks.values():
            if doc["status"] == "ok" and doc.get("markdown") and doc.get("section"):
                update_section(results_file, doc["markdown"], doc["section"])
        update_section(results_file, summary_markdown(results, rows), "run")
        print(f"updated {results_file}")
    failed = [n for n, d in benchmarks.items() if d["status"] == "failed"]
    if failed:
        sys.exit(f"run.py: benchmarks failed: {', '.join(failed)} (logs in {args.out})")


if __name__ == "__main__":
    main()
