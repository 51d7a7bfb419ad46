#!/usr/bin/env python3
"""The kybernate shim vs the stock io.containerd.runc.v2 shim, same containerd, same run.

A container holds N MiB (kybernatectl's sample workload, bind-mounted with the host's
libraries into the busybox test image) and runs a heartbeat loop. Each run checkpoints it
with `ctr c checkpoint --task` (leave-running) through both runtimes, then restores it:
stock with `ctr c restore --live`, kybernate with `ctr c restore --live` and from the agent's
RAM tier through the `kybernate.io/restore-from` annotation.

Freeze time is the longest gap of the in-container heartbeat (a counter bumped every 10 ms,
read from the host every 2 ms) while the checkpoint runs: it is what the workload feels.
Restore time is from the restore command until the restored workload's counter moves again.

Usage (root): python3 perf/bench_shim.py [--mib 1024] [--runs 3] [--containerd 1.6|2.1]
              [--write perf/RESULTS.md]
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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "docker.io/kybernate/busybox:shim-bench"
STOCK, OURS = "io.containerd.runc.v2", "io.containerd.kybernate.v1"


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def build(profile, skip=False):
    flags = ["--release"] if profile == "release" else []
    if not skip:
        subprocess.run(["cargo", "build", *flags, "-p", "kybernate-agent", "-p",
                        "containerd-shim-kybernate-v1", "--bins"], cwd=ROOT, check=True)
    release = os.path.join(target_dir(), "release" if profile == "release" else "debug")
    return {n: os.path.join(release, n) for n in
            ("kybernate-agent", "kybernatectl", "containerd-shim-kybernate-v1")}


def wait_until(predicate, what, timeout=120, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


class Node:
    """A private containerd + agent with the kybernate shim on PATH."""

    def __init__(self, bins, version):
        self.work = tempfile.mkdtemp(prefix="kybernate-shim-bench-")
        self.ns = f"bench-{os.getpid()}"
        self.ram = f"/dev/shm/kyb-bench-{os.getpid()}"
        if version == "2.1":
            self.bin_dir, fixture, self.v3 = "/opt/kybernate/containerd2/usr/bin", "containerd-2.1-default.toml", True
        else:
            self.bin_dir, fixture, self.v3 = "/usr/bin", "containerd-1.6-default.toml", False
        self.socket = os.path.join(self.work, "containerd.sock")
        self.agent_socket = os.path.join(self.work, "agent.sock")
        shim_dir = os.path.join(self.work, "bin")
        os.makedirs(shim_dir)
        os.symlink(bins["containerd-shim-kybernate-v1"], os.path.join(shim_dir, "containerd-shim-kybernate-v1"))
        self.path = f"{shim_dir}:{self.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
        text = open(os.path.join(ROOT, "installer/tests/fixtures", fixture)).read()
        config = os.path.join(self.work, "containerd.toml")
        out, section = [], ""
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                section = stripped
            if not section and stripped.startswith("root ="):
                line = f'root = "{self.work}/root"'
            elif not section and stripped.startswith("state ="):
                line = f'state = "{self.work}/state"'
            elif section == "[grpc]" and stripped.startswith("address ="):
                line = f'  address = "{self.socket}"'
            elif self.v3 and section.replace("'", '"') == '[plugins."io.containerd.nri.v1.nri"]' and stripped.startswith("disable ="):
                line = "    disable = true"
            out.append(line)
        open(config, "w").write("\n".join(out) + "\n")
        open(os.path.join(self.work, "shim.toml"), "w").write(
            f'runc = "/usr/bin/runc"\nrunc_root = "{self.work}/runc"\nagent_socket = "{self.agent_socket}"\n')
        open(os.path.join(self.work, "agent.toml"), "w").write(
            f'socket = "{self.agent_socket}"\nstate_dir = "{self.work}/agent-state"\nmetrics_addr = "127.0.0.1:0"\n'
            f'[tiers]\nram_path = "{self.ram}"\nnvme_path = "{self.work}/nvme"\n')
        env = dict(os.environ, PATH=self.path, KYBERNATE_SHIM_CONFIG=os.path.join(self.work, "shim.toml"))
        self.agent = subprocess.Popen([bins["kybernate-agent"], "--config", os.path.join(self.work, "agent.toml")],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(self.work, "agent.log"), "w"))
        wait_until(lambda: os.path.exists(self.agent_socket), "agent socket")
        self.daemon = subprocess.Popen([os.path.join(self.bin_dir, "containerd"), "--config", config], env=env,
                                       stdout=subprocess.DEVNULL,
                                       stderr=open(os.path.join(self.work, "containerd.log"), "w"))
        wait_until(lambda: self.ctr("version", check=False).returncode == 0, "containerd", step=0.2)
        tar = os.path.join(self.work, "busybox.tar")
        subprocess.run(["bash", os.path.join(ROOT, "scripts/make-busybox-oci.sh"), tar, IMAGE], check=True)
        self.ctr("images", "import", tar)

    def ctr(self, *args, check=True):
        out = subprocess.run([os.path.join(self.bin_dir, "ctr"), "--address", self.socket, "--namespace", self.ns,
                              *args], env=dict(os.environ, PATH=self.path), capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {out.stderr.strip()}")
        return out

    def remove(self, cid):
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        wait_until(lambda: (out := self.ctr("tasks", "delete", cid, check=False)).returncode == 0
                   or "not found" in out.stderr, f"{cid} deleted", step=0.05)
        self.ctr("containers", "rm", cid)

    def close(self):
        for cid in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False)
            self.ctr("tasks", "delete", "-f", cid, check=False)
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", cid, check=False)
        for proc in (self.daemon, self.agent):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", self.socket], check=False)
        shutil.rmtree(self.ram, ignore_errors=True)
        subprocess.run(["umount", "-R", "-l", self.work], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def task_pid(node, cid):
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == cid and cols[-1] == "RUNNING":
            return int(cols[1])
    return None


def heartbeat(pid):
    try:
        return open(f"/proc/{pid}/root/tmp/hb").read().strip()
    except OSError:
        return None


def run_workload(node, runtime, cid, ctl, mib, extra=()):
    mounts = []
    for d in ("/lib", "/lib64", "/usr/lib"):
        if os.path.exists(d):
            mounts += ["--mount", f"type=bind,src={d},dst={d},options=rbind:ro"]
    mounts += ["--mount", f"type=bind,src={ctl},dst=/kybernatectl,options=rbind:ro"]
    script = (f"/kybernatectl workload --mib {mib} --status /tmp/status & "
              "i=0; while :; do i=$((i+1)); echo $i > /tmp/hb; sleep 0.01; done")
    node.ctr("run", "-d", "--runtime", runtime, *mounts, *extra, IMAGE, cid, "sh", "-c", script)
    pid = wait_until(lambda: task_pid(node, cid), f"{cid} running")
    wait_until(lambda: (s := open(f"/proc/{pid}/root/tmp/status").read() if os.path.exists(
        f"/proc/{pid}/root/tmp/status") else "") and "counter=" in s and int(
        s.split("counter=")[1].split()[0]) >= 3, f"{cid} workload filled", timeout=300)
    return pid


def longest_gap(pid, done):
    """Longest time the heartbeat did not move while `done` is unset."""
    last, changed, gap = heartbeat(pid), time.monotonic(), 0.0
    while not done.is_set():
        now_value = heartbeat(pid)
        now = time.monotonic()
        if now_value != last:
            gap = max(gap, now - changed)
            last, changed = now_value, now
        time.sleep(0.002)
    return max(gap, 0.0)


def checkpoint(node, cid, pid, ref):
    done = threading.Event()
    result = {}
    watcher = threading.Thread(target=lambda: result.setdefault("gap", longest_gap(pid, done)))
    watcher.start()
    t0 = time.monotonic()
    node.ctr("containers", "checkpoint", "--task", cid, ref)
    total = time.monotonic() - t0
    time.sleep(0.3)
    done.set()
    watcher.join()
    return result["gap"], total


def restored(node, cid):
    pid = wait_until(lambda: task_pid(node, cid), f"{cid} restored")
    first = heartbeat(pid)
    wait_until(lambda: heartbeat(pid) not in (None, first), f"{cid} heartbeat after restore")


def one_run(node, ctl, mib, run):
    out = {}
    for runtime, tag in ((STOCK, "stock"), (OURS, "kyb")):
        cid = f"{tag}-{run}"
        ref = f"bench/{tag}:{run}"
        pid = run_workload(node, runtime, cid, ctl, mib)
        out[f"{tag}_freeze"], out[f"{tag}_checkpoint"] = checkpoint(node, cid, pid, ref)
        node.remove(cid)
        t0 = time.monotonic()
        node.ctr("containers", "restore", "--live", cid, ref)
        restored(node, cid)
        out[f"{tag}_restore"] = time.monotonic() - t0
        node.remove(cid)
        node.ctr("images", "rm", ref, check=False)
    listing = json.loads(subprocess.run([ctl, "--socket", node.agent_socket, "--output", "json", "list"],
                                        check=True, capture_output=True, text=True).stdout)
    name = [c["name"] for c in listing if c["name"].startswith(f"kyb-{run}-")][0]
    cid = f"ram-{run}"
    t0 = time.monotonic()
    run_workload_start = time.monotonic()
    mounts_pid = run_workload(node, OURS, cid, ctl, mib,
                              extra=("--annotation", f"kybernate.io/restore-from={name}"))
    restored(node, cid)
    out["kyb_restore_ram"] = time.monotonic() - t0
    del run_workload_start, mounts_pid
    node.remove(cid)
    subprocess.run([ctl, "--socket", node.agent_socket, "delete", name], check=True, capture_output=True)
    return out


def med(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):.3f}–{max(values):.3f}"


def machine():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}"


def update_section(path, report, key):
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Kybernate performance results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + report + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--containerd", default="1.6", choices=["1.6", "2.1"])
    parser.add_argument("--profile", default="release", choices=["release", "debug"])
    parser.add_argument("--no-build", action="store_true", help="use the binaries already built")
    parser.add_argument("--write", help="results file to update")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_shim.py: must run as root (containerd, CRIU)")
    bins = build(args.profile, args.no_build)
    node = Node(bins, args.containerd)
    runs = []
    try:
        for run in range(args.runs):
            runs.append(one_run(node, bins["kybernatectl"], args.mib, run))
            print(f"run {run + 1}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}", flush=True)
    finally:
        node.close()
    col = lambda key: [r[key] for r in runs]
    rows = [
        ("freeze (heartbeat gap during checkpoint)", col("kyb_freeze"), col("stock_freeze")),
        ("`ctr c checkpoint --task` wall time", col("kyb_checkpoint"), col("stock_checkpoint")),
        ("`ctr c restore --live` until running", col("kyb_restore"), col("stock_restore")),
        ("restore from the RAM tier (annotation) vs stock `ctr c restore --live`",
         col("kyb_restore_ram"), col("stock_restore")),
    ]
    command = (f"python3 perf/bench_shim.py --mib {args.mib} --runs {args.runs} --containerd {args.containerd}"
               f" --profile {args.profile}")
    lines = [
        "<!-- bench_shim:start -->",
        f"### kybernate shim vs io.containerd.runc.v2, {args.mib} MiB container, containerd {args.containerd}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, {args.profile} build, "
        f"{args.runs} runs, medians (min–max). Command: `{command}`",
        "",
        "| metric | kybernate (s) | runc.v2 (s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for label, ours, stock in rows:
        lines.append(f"| {label} | {med(ours):.3f} ({spread(ours)}) | {med(stock):.3f} ({spread(stock)}) | "
                     f"{med(ours) / med(stock):.2f}× |")
    lines.append("<!-- bench_shim:end -->")
    report = "\n".join(lines)
    print(report)
    if args.write:
        update_section(args.write, report, "bench_shim")


if __name__ == "__main__":
    main()
