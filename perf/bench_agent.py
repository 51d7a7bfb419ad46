#!/usr/bin/env python3
"""Agent vs bare CRIU: checkpoint and restore a process holding N MiB, in the same run.

Baseline: `criu dump` of the process into tmpfs and `criu restore` from there, with the same
options the agent uses. Agent: `kybernatectl checkpoint` / `kybernatectl restore --from ram`.
Freeze time is CRIU's dump wall time (the agent reports it as its `criu_dump` phase, timed
around the same CRIU invocation). Several runs; medians and spread are reported.

Usage (root): python3 perf/bench_agent.py [--mib 1024] [--runs 5] [--write perf/RESULTS.md]
              [--json OUT] [--quick]   (perf/README.md: the harness convention)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import (CRIU_OPTS, Agent, binaries, comparison, continued, kill, machine_text,  # noqa: E402
                      now_utc, pid_gone, read_status, require_root, start_workload, stats, update_section,
                      wait_until, write_json)


def bare_criu(ctl, mib, work):
    status = os.path.join(work, "bare-status")
    images = os.path.join(work, "bare-images")
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    proc = start_workload(ctl, mib, status)
    t0 = time.monotonic()
    subprocess.run(["criu", "dump", "-t", str(proc.pid), "-D", images, "-o", "dump.log", "-v2", *CRIU_OPTS], check=True)
    freeze = time.monotonic() - t0
    proc.wait()
    at_dump = read_status(status)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    pidfile = os.path.join(work, "bare.pid")
    if os.path.exists(pidfile):
        os.remove(pidfile)
    t0 = time.monotonic()
    restored = subprocess.run(["criu", "restore", "-D", images, "-o", "restore.log", "-v2", "--restore-detached",
                               "--pidfile", pidfile, *CRIU_OPTS])
    if restored.returncode != 0:
        log = open(os.path.join(images, "restore.log")).read()
        raise RuntimeError("bare criu restore failed:\n" + "\n".join(log.splitlines()[-15:]))
    restore = time.monotonic() - t0
    pid = int(open(pidfile).read())
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(pid)
    shutil.rmtree(images)
    return freeze, restore


def through_agent(agent, ctl, mib, work, run):
    status = os.path.join(work, "agent-status")
    proc = start_workload(ctl, mib, status)
    name = f"bench-{run}"
    t0 = time.monotonic()
    reply = agent.ctl("checkpoint", "--pid", str(proc.pid), "--name", name)
    checkpoint_total = time.monotonic() - t0
    proc.wait()
    at_dump = read_status(status)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    t0 = time.monotonic()
    restored = agent.ctl("restore", name, "--from", "ram")
    restore = time.monotonic() - t0
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(restored["pid"])
    agent.ctl("delete", name)
    return {
        "freeze": reply["phases"]["criu_dump"] / 1000.0,
        "checkpoint_total": checkpoint_total,
        "restore": restore,
        "restore_criu": restored["phases"]["criu_restore"] / 1000.0,
        "raw_bytes": reply["raw_bytes"],
        "phases": reply["phases"],
        "restore_phases": restored["phases"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 run")
    parser.add_argument("--write", help="results file whose bench_agent section to update")
    parser.add_argument("--json", help="write the results here (perf/README.md: the harness convention)")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.runs = 64, 1
    require_root()
    agent_bin, ctl, build = binaries()
    bare, ours = [], []
    # Both tiers on tmpfs (the state dir is in /dev/shm), as in the first measurements.
    with Agent(agent_bin, ctl) as agent:
        work = agent.work
        for run in range(args.runs):
            bare.append(bare_criu(ctl, args.mib, work))
            ours.append(through_agent(agent, ctl, args.mib, work, run))
            print(f"run {run + 1}: bare freeze {bare[-1][0]:.3f}s restore {bare[-1][1]:.3f}s | "
                  f"agent freeze {ours[-1]['freeze']:.3f}s restore {ours[-1]['restore']:.3f}s", flush=True)

    bare_freeze = [b[0] for b in bare]
    bare_restore = [b[1] for b in bare]
    raw = ours[0]["raw_bytes"]
    dump_cmd = "criu dump -t PID -D DIR " + " ".join(CRIU_OPTS)
    restore_cmd = "criu restore -D DIR --restore-detached " + " ".join(CRIU_OPTS)
    rows = [
        comparison("freeze (CRIU dump)", "agent", [o["freeze"] for o in ours], "bare CRIU", bare_freeze, raw,
                   dump_cmd),
        comparison("checkpoint until stored on NVMe", "agent", [o["checkpoint_total"] for o in ours], "bare CRIU",
                   bare_freeze, raw, dump_cmd),
        comparison("restore from RAM tier (end to end)", "agent", [o["restore"] for o in ours], "bare CRIU",
                   bare_restore, raw, restore_cmd),
        comparison("restore: CRIU restore phase only", "agent", [o["restore_criu"] for o in ours], "bare CRIU",
                   bare_restore, raw, restore_cmd),
    ]
    command = f"python3 perf/bench_agent.py --mib {args.mib} --runs {args.runs}" + (" --quick" if args.quick else "")
    date = now_utc()
    lines = [
        "<!-- bench_agent:start -->",
        f"### Agent vs bare CRIU, {args.mib} MiB process",
        "",
        f"Measured {date} on {machine_text()}, {build} build, {args.runs} runs, medians (min–max). "
        f"Command: `{command}`",
        "",
        "| metric | agent (s) | bare CRIU (s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        a, b = row["ours"], row["baseline"]
        lines.append(f"| {row['metric']} | {a['median']:.3f} ({a['min']:.3f}–{a['max']:.3f}) | "
                     f"{b['median']:.3f} ({b['min']:.3f}–{b['max']:.3f}) | {row['ratio']:.2f}× |")
    phases = ours[len(ours) // 2]["phases"]
    restore_phases = ours[len(ours) // 2]["restore_phases"]
    lines += [
        "",
        f"Checkpoint phases (one run, ms): {json.dumps(phases)}; restore phases: {json.dumps(restore_phases)}; "
        f"image size {raw / 2**20:.0f} MiB.",
        "<!-- bench_agent:end -->",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section(args.write, report, "bench_agent")
    if args.json:
        write_json(args.json, {
            "name": "agent",
            "title": f"Agent vs bare CRIU, {args.mib} MiB process",
            "command": command,
            "date": date,
            "runs": args.runs,
            "build": build,
            "comparisons": rows,
            "phases": {"checkpoint": {k: stats([o["phases"].get(k, 0) / 1000.0 for o in ours]) for k in phases},
                       "restore": {k: stats([o["restore_phases"].get(k, 0) / 1000.0 for o in ours])
                                   for k in restore_phases}},
            "markdown": report,
            "section": "bench_agent",
        })


if __name__ == "__main__":
    main()
