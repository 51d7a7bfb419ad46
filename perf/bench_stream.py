#!/usr/bin/env python3
"""Streamed checkpoints (`[dataplane] stream = true`) against CRIU and the CLI tools, in the same run.

The agent's NVMe tier is on a real disk (`--disk`, default /var/tmp); its RAM tier stays in
tmpfs. Per run, on fresh workloads of N MiB (`kybernatectl workload`):

- bare `criu dump` into tmpfs: the freeze baseline;
- the same dump, then `tar | pzstd -1 -p 2 | dd oflag=direct` onto the disk and `sync`:
  the "compressed and durable on disk" baseline;
- bare `criu restore` from the same images as plain files on the disk, page cache dropped;
- the agent: `kybernatectl checkpoint --tier nvme` (streamed; done = durable on NVMe), its
  `criu_dump` phase as the freeze, then `kybernatectl restore --from nvme` with the page
  cache dropped (streamed from the chunks), and the peak extra host memory during the
  checkpoint: agent RSS growth plus tmpfs growth, sampled every 10 ms.

Usage (root): python3 perf/bench_stream.py [--mib 1024] [--runs 3] [--disk /var/tmp]
              [--write perf/RESULTS.md] [--json OUT] [--quick]
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import (CRIU_OPTS, Agent, binaries, comparison, continued, kill, machine_text,  # noqa: E402
                      now_utc, pid_gone, read_status, require_root, start_workload, update_section,
                      wait_until, write_json)


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def shm_used():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Samples agent RSS + tmpfs use until stopped; `extra` is the peak above the start."""

    def __init__(self, pid):
        self.pid, self.stop, self.peak = pid, threading.Event(), 0
        self.start = rss(pid) + shm_used()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss(self.pid) + shm_used())
            time.sleep(0.01)

    def extra(self):
        self.stop.set()
        self.thread.join()
        return max(0, self.peak - self.start)


def baselines(ctl, mib, work, disk):
    status = os.path.join(work, "bare-status")
    images = os.path.join(work, "bare-images")
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    proc = start_workload(ctl, mib, status)
    t0 = time.monotonic()
    subprocess.run(["criu", "dump", "-t", str(proc.pid), "-D", images, "-o", "dump.log", "-v2", *CRIU_OPTS],
                   check=True)
    freeze = time.monotonic() - t0
    proc.wait()
    at_dump = read_status(status)
    packed = os.path.join(disk, "bare-images.tar.zst")
    t0 = time.monotonic()
    subprocess.run(f"tar -C {images} -cf - . | pzstd -1 -p 2 -c | "
                   f"dd of={packed} oflag=direct bs=1M iflag=fullblock status=none && sync {packed}",
                   shell=True, check=True)
    durable = freeze + time.monotonic() - t0
    os.remove(packed)
    plain = os.path.join(disk, "bare-plain")
    shutil.rmtree(plain, ignore_errors=True)
    shutil.copytree(images, plain)
    shutil.rmtree(images)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    drop_caches()
    pidfile = os.path.join(work, "bare.pid")
    if os.path.exists(pidfile):
        os.remove(pidfile)
    t0 = time.monotonic()
    subprocess.run(["criu", "restore", "-D", plain, "-o", "restore.log", "-v2", "--restore-detached",
                    "--pidfile", pidfile, *CRIU_OPTS], check=True)
    restore = time.monotonic() - t0
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(int(open(pidfile).read()))
    shutil.rmtree(plain)
    return {"freeze": freeze, "durable": durable, "restore": restore}


def through_agent(agent, ctl, mib, work, run):
    status = os.path.join(work, "agent-status")
    proc = start_workload(ctl, mib, status)
    name = f"stream-{run}"
    memory = PeakMemory(agent.process.pid)
    t0 = time.monotonic()
    reply = agent.ctl("checkpoint", "--pid", str(proc.pid), "--name", name, "--tier", "nvme")
    durable = time.monotonic() - t0
    extra = memory.extra()
    if reply["tiers"] != ["nvme"]:
        raise RuntimeError(f"the checkpoint was not streamed into NVMe alone: {reply}")
    proc.wait()
    at_dump = read_status(status)
    wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
    drop_caches()
    t0 = time.monotonic()
    restored = agent.ctl("restore", name, "--from", "nvme")
    restore = time.monotonic() - t0
    continued(status, int(at_dump["counter"]), at_dump["epoch"])
    kill(restored["pid"])
    agent.ctl("delete", name)
    return {"freeze": reply["phases"]["criu_dump"] / 1000.0, "durable": durable, "restore": restore,
            "extra_memory": extra, "raw_bytes": reply["raw_bytes"], "stored_bytes": reply["stored_bytes"],
            "phases": reply["phases"], "restore_phases": restored["phases"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--disk", default="/var/tmp", help="directory on the disk the NVMe tier and baselines use")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 run")
    parser.add_argument("--write", help="results file whose bench_stream section to update")
    parser.add_argument("--json", help="write the results here (perf/README.md: the harness convention)")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.runs = 64, 1
    require_root()
    if not shutil.which("pzstd"):
        raise SystemExit("pzstd is needed for the baseline; run scripts/install-test-deps.sh")
    agent_bin, ctl, build = binaries()
    bare, ours = [], []
    disk = os.path.abspath(args.disk)
    with Agent(agent_bin, ctl, nvme_parent=disk, extra_config="[dataplane]\nstream = true\n") as agent:
        for run in range(args.runs):
            bare.append(baselines(ctl, args.mib, agent.work, disk))
            ours.append(through_agent(agent, ctl, args.mib, agent.work, run))
            print(f"run {run + 1}: bare freeze {bare[-1]['freeze']:.3f}s durable {bare[-1]['durable']:.3f}s "
                  f"restore {bare[-1]['restore']:.3f}s | streamed freeze {ours[-1]['freeze']:.3f}s "
                  f"durable {ours[-1]['durable']:.3f}s restore {ours[-1]['restore']:.3f}s "
                  f"extra memory {ours[-1]['extra_memory'] / 2**20:.0f} MiB", flush=True)

    raw = ours[0]["raw_bytes"]
    dump_cmd = "criu dump -t PID -D TMPFS " + " ".join(CRIU_OPTS)
    pack_cmd = dump_cmd + "; tar -C TMPFS -cf - . | pzstd -1 -p 2 -c | dd oflag=direct bs=1M of=DISK; sync"
    restore_cmd = "criu restore -D DISK --restore-detached " + " ".join(CRIU_OPTS) + " (page cache dropped)"
    rows = [
        comparison("freeze (workload stopped)", "streamed", [o["freeze"] for o in ours], "bare criu dump",
                   [b["freeze"] for b in bare], raw, dump_cmd),
        comparison("checkpoint until durable on NVMe", "streamed", [o["durable"] for o in ours], "bare criu dump",
                   [b["freeze"] for b in bare], raw, dump_cmd),
        comparison("checkpoint until durable on NVMe vs dump + pzstd + dd", "streamed",
                   [o["durable"] for o in ours], "criu dump, then pzstd and dd", [b["durable"] for b in bare], raw,
                   pack_cmd),
        comparison("restore from NVMe, page cache dropped", "streamed", [o["restore"] for o in ours],
                   "bare criu restore from disk", [b["restore"] for b in bare], raw, restore_cmd),
    ]
    peak = max(o["extra_memory"] for o in ours)
    command = (f"python3 perf/bench_stream.py --mib {args.mib} --runs {args.runs} --disk {args.disk}"
               + (" --quick" if args.quick else ""))
    date = now_utc()
    lines = [
        "<!-- bench_stream:start -->",
        f"### Streamed checkpoints, {args.mib} MiB process",
        "",
        f"Measured {date} on {machine_text()}, {build} build, {args.runs} runs, medians (min–max). "
        f"NVMe tier and baselines on {args.disk}. Command: `{command}`",
        "",
        *([f"Not a release build ({build}): the data plane's own code runs unoptimised; treat the ratios as "
           "indicative.", ""] if build != "release" else []),
        "| metric | streamed (s) | baseline (s) | baseline | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a, b = row["ours"], row["baseline"]
        lines.append(f"| {row['metric']} | {a['median']:.3f} ({a['min']:.3f}–{a['max']:.3f}) | "
                     f"{b['median']:.3f} ({b['min']:.3f}–{b['max']:.3f}) | {b['label']} | {row['ratio']:.2f}× |")
    lines += [
        "",
        f"Peak extra host memory during a streamed checkpoint (agent RSS growth + tmpfs growth): "
        f"{peak / 2**20:.0f} MiB. Image {raw / 2**20:.0f} MiB, stored {ours[0]['stored_bytes'] / 2**20:.0f} MiB. "
        f"Phases of one run (ms): checkpoint {ours[len(ours) // 2]['phases']}, "
        f"restore {ours[len(ours) // 2]['restore_phases']}.",
        "<!-- bench_stream:end -->",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section(args.write, report, "bench_stream")
    if args.json:
        write_json(args.json, {
            "name": "stream",
            "title": f"Streamed checkpoints, {args.mib} MiB process",
            "command": command,
            "date": date,
            "runs": args.runs,
            "build": build,
            "comparisons": rows,
            "peak_extra_memory_bytes": peak,
            "markdown": report,
            "section": "bench_stream",
        })


if __name__ == "__main__":
    main()
