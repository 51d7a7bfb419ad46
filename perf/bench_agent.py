#!/usr/bin/env python3
"""Agent vs bare CRIU: checkpoint and restore a process holding N MiB, in the same run.

Baseline: `criu dump` of the process into tmpfs and `criu restore` from there, with the same
options the agent uses. Agent: `kybernatectl checkpoint` / `kybernatectl restore --from ram`.
Freeze time is CRIU's dump wall time (the agent reports it as its `criu_dump` phase, timed
around the same CRIU invocation). Several runs; medians and spread are reported.

Usage (root): python3 perf/bench_agent.py [--mib 1024] [--runs 5] [--write perf/RESULTS.md]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIU_OPTS = ["--tcp-established", "--file-locks", "--ext-unix-sk", "--link-remap"]


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def build():
    subprocess.run(["cargo", "build", "--release", "-p", "kybernate-agent", "--bins"], cwd=ROOT, check=True)
    release = os.path.join(target_dir(), "release")
    return os.path.join(release, "kybernate-agent"), os.path.join(release, "kybernatectl")


def read_status(path):
    try:
        with open(path) as f:
            fields = dict(kv.split("=", 1) for kv in f.read().split() if "=" in kv)
        return fields
    except (OSError, ValueError):
        return None


def wait_until(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def start_workload(ctl, mib, status):
    if os.path.exists(status):
        os.remove(status)
    proc = subprocess.Popen([ctl, "workload", "--mib", str(mib), "--status", status],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: (s := read_status(status)) and int(s["counter"]) >= 3, "workload start")
    return proc


def pid_gone(pid):
    return not os.path.exists(f"/proc/{pid}")


def continued(status, counter_at_dump, epoch):
    s = wait_until(lambda: (s := read_status(status)) and int(s["counter"]) > counter_at_dump + 3 and s,
                   "restored workload progress")
    if s["epoch"] != epoch:
        raise RuntimeError("restored workload has a new epoch: it was restarted, not restored")


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_until(lambda: pid_gone(pid), f"PID {pid} to exit")


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


def through_agent(ctl, socket, mib, work, run):
    status = os.path.join(work, "agent-status")
    proc = start_workload(ctl, mib, status)
    name = f"bench-{run}"
    t0 = time.monotonic()
    out = subprocess.run([ctl, "--socket", socket, "--output", "json", "checkpoint", "--pid", str(proc.pid),
                          "--name", name], check=True, capture_output=True, text=True).stdout
    checkpoint_total = time.monotonic() - t0
    reply = json.loads(out)
    proc.wait()
    at_dump = read_status(status)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    t0 = time.monotonic()
    out = subprocess.run([ctl, "--socket", socket, "--output", "json", "restore", name, "--from", "ram"],
                         check=True, capture_output=True, text=True).stdout
    restore = time.monotonic() - t0
    restored = json.loads(out)
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(restored["pid"])
    subprocess.run([ctl, "--socket", socket, "delete", name], check=True, capture_output=True)
    return {
        "freeze": reply["phases"]["criu_dump"] / 1000.0,
        "checkpoint_total": checkpoint_total,
        "restore": restore,
        "restore_criu": restored["phases"]["criu_restore"] / 1000.0,
        "raw_bytes": reply["raw_bytes"],
        "phases": reply["phases"],
        "restore_phases": restored["phases"],
    }


def med(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):.3f}–{max(values):.3f}"


def machine():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", help="results file to update")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_agent.py: must run as root (CRIU)")
    agent_bin, ctl = build()
    work = tempfile.mkdtemp(prefix="kybernate-bench-", dir="/dev/shm")
    socket = os.path.join(work, "agent.sock")
    log = open(os.path.join(work, "agent.log"), "w")
    agent = subprocess.Popen([agent_bin, "--state-dir", os.path.join(work, "state"), "--socket", socket,
                              "--metrics-addr", "127.0.0.1:0"], stderr=log)
    try:
        wait_until(lambda: os.path.exists(socket), "agent socket")
        bare, ours = [], []
        for run in range(args.runs):
            bare.append(bare_criu(ctl, args.mib, work))
            ours.append(through_agent(ctl, socket, args.mib, work, run))
            print(f"run {run + 1}: bare freeze {bare[-1][0]:.3f}s restore {bare[-1][1]:.3f}s | "
                  f"agent freeze {ours[-1]['freeze']:.3f}s restore {ours[-1]['restore']:.3f}s", flush=True)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    bare_freeze = [b[0] for b in bare]
    bare_restore = [b[1] for b in bare]
    freeze = [o["freeze"] for o in ours]
    total = [o["checkpoint_total"] for o in ours]
    restore = [o["restore"] for o in ours]
    restore_criu = [o["restore_criu"] for o in ours]
    rows = [
        ("freeze (CRIU dump)", freeze, bare_freeze),
        ("checkpoint until stored on NVMe", total, bare_freeze),
        ("restore from RAM tier (end to end)", restore, bare_restore),
        ("restore: CRIU restore phase only", restore_criu, bare_restore),
    ]
    command = f"python3 perf/bench_agent.py --mib {args.mib} --runs {args.runs}"
    lines = [
        "<!-- bench_agent:start -->",
        f"### Agent vs bare CRIU, {args.mib} MiB process",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, "
        f"release build, {args.runs} runs, medians (min–max). Command: `{command}`",
        "",
        "| metric | agent (s) | bare CRIU (s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for label, agent_values, base in rows:
        lines.append(f"| {label} | {med(agent_values):.3f} ({spread(agent_values)}) | "
                     f"{med(base):.3f} ({spread(base)}) | {med(agent_values) / med(base):.2f}× |")
    phases = ours[len(ours) // 2]["phases"]
    restore_phases = ours[len(ours) // 2]["restore_phases"]
    lines += [
        "",
        f"Checkpoint phases (one run, ms): {json.dumps(phases)}; restore phases: {json.dumps(restore_phases)}; "
        f"image size {ours[0]['raw_bytes'] / 2**20:.0f} MiB.",
        "<!-- bench_agent:end -->",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section(args.write, report, "bench_agent")


def update_section(path, report, key):
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Kybernate performance results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + report + after
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
