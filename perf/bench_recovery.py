#!/usr/bin/env python3
"""Agent start-up with recovery: how long a restarted agent takes until it answers `list`
with N checkpoints on disk (journal replay, RAM tier scan, records), against the same agent
starting on an empty state directory, in the same run. Issue 16's target: under 2 s for 100.

The checkpoints are real: one small process checkpointed N times with --leave-running (RAM
and NVMe copies, records, journal). The recovery phase's own time comes from the agent's
log line "recovery done" (`millis`).

Usage (root): python3 perf/bench_recovery.py [--checkpoints 100] [--runs 5] [--write perf/RESULTS.md]
              [--json OUT] [--quick]   (perf/README.md: the harness convention)
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import (binaries, comparison, machine_text, now_utc, require_root,  # noqa: E402
                      start_workload, update_section, wait_until, write_json)


class StateDir:
    """A state directory (tiers inside) that agents are started on, one after the other."""

    def __init__(self, agent_bin, ctl):
        self.agent_bin, self.ctl_bin = agent_bin, ctl
        self.work = tempfile.mkdtemp(prefix="kybernate-recovery-", dir="/dev/shm")
        self.socket = os.path.join(self.work, "agent.sock")
        self.config = os.path.join(self.work, "agent.toml")
        open(self.config, "w").write("")
        self.log_path = os.path.join(self.work, "agent.log")
        self.process = None

    def start(self):
        """Starts an agent and returns (seconds until `list` answered, the reply)."""
        log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.process = subprocess.Popen(
            [self.agent_bin, "--config", self.config, "--state-dir", os.path.join(self.work, "state"),
             "--socket", self.socket, "--metrics-addr", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("kybernate-agent exited at start:\n" + open(self.log_path).read())
            out = subprocess.run([self.ctl_bin, "--socket", self.socket, "--output", "json", "list"],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return time.monotonic() - t0, json.loads(out.stdout)
            if time.monotonic() - t0 > 120:
                raise RuntimeError("agent did not answer within 120 s:\n" + open(self.log_path).read())
            time.sleep(0.005)

    def recovery_millis(self):
        text = open(self.log_path).read()
        found = re.findall(r"recovery done[^\n]*millis=(\d+)", text)
        return int(found[-1]) / 1000.0 if found else None

    def ctl(self, *args):
        out = subprocess.run([self.ctl_bin, "--socket", self.socket, "--output", "json", *args],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kybernatectl {' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None

    def close(self):
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 checkpoints, 1 run")
    parser.add_argument("--write", help="results file whose bench_recovery section to update")
    parser.add_argument("--json", help="write the results here (perf/README.md: the harness convention)")
    args = parser.parse_args()
    if args.quick:
        args.checkpoints, args.runs = 10, 1
    require_root()
    agent_bin, ctl, build = binaries()

    full, empty = StateDir(agent_bin, ctl), StateDir(agent_bin, ctl)
    try:
        full.start()
        status = os.path.join(full.work, "status")
        proc = start_workload(ctl, 8, status)
        for i in range(args.checkpoints):
            full.ctl("checkpoint", "--pid", str(proc.pid), "--name", f"rec-{i:03}", "--leave-running")
        proc.kill()
        proc.wait()
        full.stop()

        with_state, baseline, recovery = [], [], []
        for run in range(args.runs):
            seconds, listed = full.start()
            if len(listed) != args.checkpoints:
                raise RuntimeError(f"the restarted agent lists {len(listed)} checkpoints, not {args.checkpoints}")
            with_state.append(seconds)
            recovery.append(full.recovery_millis() or 0.0)
            full.stop()
            seconds, listed = empty.start()
            if listed:
                raise RuntimeError("an empty state directory lists checkpoints")
            baseline.append(seconds)
            empty.stop()
            print(f"run {run + 1}: {args.checkpoints} checkpoints {with_state[-1]:.3f}s "
                  f"(recovery {recovery[-1]:.3f}s) | empty {baseline[-1]:.3f}s", flush=True)
    finally:
        full.close()
        empty.close()

    rows = [
        comparison(f"start until `list` answers, {args.checkpoints} checkpoints", "agent", with_state,
                   "same agent, empty state", baseline),
        comparison("recovery phase alone (agent log)", "agent", recovery, "same agent, empty state", baseline),
    ]
    command = f"python3 perf/bench_recovery.py --checkpoints {args.checkpoints} --runs {args.runs}" + \
        (" --quick" if args.quick else "")
    date = now_utc()
    lines = [
        "<!-- bench_recovery:start -->",
        f"### Agent start-up with recovery, {args.checkpoints} checkpoints on disk",
        "",
        f"Measured {date} on {machine_text()}, {build} build, {args.runs} runs, medians (min–max). "
        f"Command: `{command}`. Target (issue 16): under 2 s for 100 checkpoints.",
        "",
        "| metric | with checkpoints (s) | empty state (s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        a, b = row["ours"], row["baseline"]
        lines.append(f"| {row['metric']} | {a['median']:.3f} ({a['min']:.3f}–{a['max']:.3f}) | "
                     f"{b['median']:.3f} ({b['min']:.3f}–{b['max']:.3f}) | {row['ratio']:.2f}× |")
    lines.append("<!-- bench_recovery:end -->")
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section(args.write, report, "bench_recovery")
    if args.json:
        write_json(args.json, {
            "name": "recovery",
            "title": f"Agent start-up with recovery, {args.checkpoints} checkpoints",
            "command": command,
            "date": date,
            "runs": args.runs,
            "build": build,
            "comparisons": rows,
            "markdown": report,
            "section": "bench_recovery",
        })


if __name__ == "__main__":
    main()
