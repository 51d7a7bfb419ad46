#!/usr/bin/env python3
"""The kybernate shim vs the stock io.containerd.runc.v2 shim, same containerd, same run.

A container holds N MiB (kybernatectl's sample workload, bind-mounted with the host's
libraries into the busybox test image) and runs a heartbeat loop. Each run:
- stock: `ctr c checkpoint --task` through io.containerd.runc.v2, kill, `ctr c restore --live`;
- kybernate, its own flow: `kybernatectl checkpoint --container --leave-running` (agent ->
  containerd task API -> kybernate shim -> agent), kill, restore from the agent's RAM tier
  through the `kybernate.io/restore-from` annotation;
- kybernate, stock's flow: the same `ctr` commands through the kybernate runtime.
The restored workload must continue (same epoch, counter past the dump) or the run fails.

Freeze time is the longest gap of the in-container heartbeat (a counter bumped every 10 ms,
read from the host every 2 ms) while the checkpoint runs: it is what the workload feels.
Restore time is from the restore command until the restored workload's counter moves again.
Before each timed step, dirty pages are synced and, after a checkpoint through `ctr`, the
agent's background work (the shim's handoff of the images, the drain to NVMe) has ended,
so no step pays for an earlier one.

`ctr` pauses the task around the whole checkpoint call (containerd's client does), so the
stock freeze is that call, containerd's archive of the images included; kybernatectl asks
containerd's task API directly, and the kybernate shim pauses the task only around the dump
and the rootfs diff.

With --pod-rss it measures memory instead: a pod-like group of 3 containers (a pause
container and two app containers sharing one io.kubernetes.cri.sandbox-id, as the CRI makes
them) runs under each runtime in turn, and the resident memory (VmRSS) of every shim process
serving the namespace is summed. Both runtimes group a pod into one shim process.

Usage (root): python3 perf/bench_shim.py [--json OUT] [--quick] [--mib 1024] [--runs 3]
              [--containerd 1.6|2.1] [--profile release|debug] [--no-build] [--write perf/RESULTS.md]
              [--pod-rss]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "docker.io/kybernate/busybox:shim-bench"
STOCK, OURS = "io.containerd.runc.v2", "io.containerd.kybernate.v1"


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def build(profile, skip=False, shim_only=False):
    flags = ["--release"] if profile == "release" else []
    packages = ["-p", "containerd-shim-kybernate-v1"] if shim_only else [
        "-p", "kybernate-agent", "-p", "containerd-shim-kybernate-v1"]
    if not skip:
        subprocess.run(["cargo", "build", *flags, *packages, "--bins"], cwd=ROOT, check=True)
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

    def __init__(self, bins, version, with_agent=True):
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
        # The agent refuses configured tier directories that do not exist.
        os.makedirs(self.ram, exist_ok=True)
        os.makedirs(f"{self.work}/nvme", exist_ok=True)
        open(os.path.join(self.work, "agent.toml"), "w").write(
            f'socket = "{self.agent_socket}"\ncontainerd_socket = "{self.socket}"\nstate_dir = "{self.work}/agent-state"\nmetrics_addr = "127.0.0.1:0"\n'
            f'[tiers]\nram_path = "{self.ram}"\nnvme_path = "{self.work}/nvme"\n')
        # containerd leaves each task checkpoint's work dir (1 GiB here) under XDG_RUNTIME_DIR,
        # else /tmp: keep them in the work dir, which close() removes.
        env = dict(os.environ, PATH=self.path, KYBERNATE_SHIM_CONFIG=os.path.join(self.work, "shim.toml"),
                   XDG_RUNTIME_DIR=self.work)
        self.agent = self.daemon = None
        try:
            if with_agent:
                self.agent = subprocess.Popen([bins["kybernate-agent"], "--config",
                                               os.path.join(self.work, "agent.toml")],
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
        except BaseException:
            self.close()
            raise

    def ctr(self, *args, check=True):
        out = subprocess.run([os.path.join(self.bin_dir, "ctr"), "--address", self.socket, "--namespace", self.ns,
                              *args], env=dict(os.environ, PATH=self.path), capture_output=True, text=True,
                             timeout=None if check else 60)
        if check and out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {out.stderr.strip()}")
        return out

    def remove(self, cid):
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        wait_until(lambda: (out := self.ctr("tasks", "delete", cid, check=False)).returncode == 0
                   or "not found" in out.stderr, f"{cid} deleted", step=0.05)
        self.ctr("containers", "rm", cid)

    def close(self):
        try:
            if self.daemon is not None:
                self.remove_all()
        except subprocess.TimeoutExpired as e:
            print(f"cleanup: {e}; killing the daemon", flush=True)
        for proc in (self.daemon, self.agent):
            if proc is None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.release()

    def remove_all(self):
        for cid in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False)
            self.ctr("tasks", "delete", "-f", cid, check=False)
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", cid, check=False)

    def release(self):
        subprocess.run(["pkill", "-KILL", "-f", self.socket], check=False)
        shutil.rmtree(self.ram, ignore_errors=True)
        # Whatever is still mounted below the work dir (a task containerd could not delete
        # leaves its rootfs mounted), deepest first.
        points = [line.split()[4] for line in open("/proc/self/mountinfo")
                  if line.split()[4].startswith(self.work + "/")]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def task_pid(node, cid):
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == cid and cols[-1] == "RUNNING":
            return int(cols[1])
    return None


def heartbeat(pid):
    try:
        return open(f"/proc/{pid}/root/dev/shm/hb").read().strip()
    except OSError:
        return None


def workload_mounts(ctl):
    # Bind sources must be real directories: on a merged-/usr host /lib and /lib64 are
    # symlinks, and CRIU's mount-v2 restore cannot move_mount an external bind mount whose
    # source is a symlink ("Failed to move_mount from /lib ...: Invalid argument"), which
    # runc reports as "criu failed: type NOTIFY errno 0".
    mounts = []
    for d in ("/lib", "/lib64", "/usr/lib"):
        if os.path.exists(d):
            mounts += ["--mount", f"type=bind,src={os.path.realpath(d)},dst={d},options=rbind:ro"]
    return mounts + ["--mount", f"type=bind,src={ctl},dst=/kybernatectl,options=rbind:ro"]


def run_workload(node, runtime, cid, ctl, mib, extra=()):
    mounts = workload_mounts(ctl)
    # Status and heartbeat live in the container's /dev/shm, a tmpfs CRIU dumps with the
    # process: neither checkpoint carries the writable layer (ctr without --rw, Kybernate
    # never), and the workload holds its status file open, which CRIU must reopen.
    script = (f"/kybernatectl workload --mib {mib} --status /dev/shm/status & "
              "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/hb; sleep 0.01; done")
    node.ctr("run", "-d", "--runtime", runtime, *mounts, *extra, IMAGE, cid, "sh", "-c", script)
    pid = wait_until(lambda: task_pid(node, cid), f"{cid} running")
    wait_until(lambda: (s := open(f"/proc/{pid}/root/dev/shm/status").read() if os.path.exists(
        f"/proc/{pid}/root/dev/shm/status") else "") and "counter=" in s and int(
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


def status_of(pid):
    return benchkit.read_status(f"/proc/{pid}/root/dev/shm/status")


def timed_freeze(pid, action):
    """Runs `action` while watching the heartbeat; (longest gap, wall time of the action).
    Dirty pages of earlier rounds are written back first, so no flow pays for another's."""
    os.sync()
    done = threading.Event()
    result = {}
    watcher = threading.Thread(target=lambda: result.setdefault("gap", longest_gap(pid, done)))
    watcher.start()
    t0 = time.monotonic()
    try:
        action()
    finally:
        total = time.monotonic() - t0
        time.sleep(0.3)
        done.set()
        watcher.join()
    return result["gap"], total


def restored(node, cid, at_dump):
    """Waits until the restored workload runs on; fails unless it continued from the dump."""
    pid = wait_until(lambda: task_pid(node, cid), f"{cid} restored")
    first = heartbeat(pid)
    wait_until(lambda: heartbeat(pid) not in (None, first), f"{cid} heartbeat after restore")
    took = time.monotonic()
    s = wait_until(lambda: (s := status_of(pid)) and int(s["counter"]) > int(at_dump["counter"]) and s,
                   f"{cid} workload progress after restore")
    if s["epoch"] != at_dump["epoch"]:
        raise RuntimeError(f"{cid}: the restored workload has a new epoch: it restarted")
    return took


def ctl(node, bin_ctl, *args):
    out = subprocess.run([bin_ctl, "--socket", node.agent_socket, "--output", "json", *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kybernatectl {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout) if out.stdout.strip() else None


def stock_round(node, bin_ctl, mib, run, runtime=STOCK, tag="stock"):
    """`ctr c checkpoint --task`, kill, `ctr c restore --live` through `runtime`."""
    out = {}
    cid, ref = f"{tag}-{run}", f"bench/{tag}:{run}"
    pid = run_workload(node, runtime, cid, bin_ctl, mib)
    at_dump = status_of(pid)
    out["freeze"], out["checkpoint"] = timed_freeze(
        pid, lambda: node.ctr("containers", "checkpoint", "--task", cid, ref))
    if runtime == OURS:
        # The shim hands the images to the agent once ctr resumed the task, and the agent
        # drains them to NVMe: let that finish, so the restore below is timed on its own.
        wait_until(lambda: any(c["name"].startswith(f"{cid}-") and "nvme" in c["tiers"]
                               for c in ctl(node, bin_ctl, "list") or []),
                   f"{cid}'s checkpoint on NVMe", step=0.1)
    node.remove(cid)
    os.sync()
    t0 = time.monotonic()
    node.ctr("containers", "restore", "--live", cid, ref)
    out["restore"] = restored(node, cid, at_dump) - t0
    node.remove(cid)
    node.ctr("images", "rm", ref, check=False)
    if runtime == OURS:
        for c in ctl(node, bin_ctl, "list") or []:
            if c["name"].startswith(f"{cid}-"):
                ctl(node, bin_ctl, "delete", c["name"])
    return out


def kybernate_round(node, bin_ctl, mib, run):
    """`kybernatectl checkpoint --container`, kill, restore from the RAM tier (annotation)."""
    out = {}
    cid, name = f"kyb-{run}", f"bench-kyb-{run}"
    pid = run_workload(node, OURS, cid, bin_ctl, mib)
    at_dump = status_of(pid)
    out["freeze"], out["checkpoint"] = timed_freeze(pid, lambda: ctl(
        node, bin_ctl, "checkpoint", "--container", cid, "--namespace", node.ns,
        "--leave-running", "--name", name))
    node.remove(cid)
    os.sync()
    t0 = time.monotonic()
    node.ctr("run", "-d", "--runtime", OURS, "--annotation", f"kybernate.io/restore-from={name}",
             *workload_mounts(bin_ctl), IMAGE, f"ram-{run}", "sh", "-c", "exit 3")
    out["restore_ram"] = restored(node, f"ram-{run}", at_dump) - t0
    node.remove(f"ram-{run}")
    ctl(node, bin_ctl, "delete", name)
    return out


SHIM_BINARIES = {STOCK: "containerd-shim-runc-v2", OURS: "containerd-shim-kybernate-v1"}


def shim_pids(node, runtime):
    """Pids of the `runtime` shim processes serving the node's namespace."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            words = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        args = [w.decode(errors="replace") for w in words]
        if (args and os.path.basename(args[0]) == SHIM_BINARIES[runtime]
                and "-namespace" in args and node.ns in args):
            pids.append(int(entry))
    return pids


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pod_round(node, runtime, run, grouped=True, containers=3):
    """Starts a pod-like group under `runtime` (without the sandbox annotation when not
    `grouped`: one shim per container); (RSS of its shims in MiB, shim count)."""
    tag = f"{'kyb' if runtime == OURS else 'stock'}-{'pod' if grouped else 'solo'}{run}"
    sandbox = f"{tag}-pause"
    ids = [sandbox] + [f"{tag}-app{i}" for i in range(1, containers)]
    for i, cid in enumerate(ids):
        kind = "sandbox" if i == 0 else "container"
        group = ["--annotation", f"io.kubernetes.cri.sandbox-id={sandbox}",
                 "--annotation", f"io.kubernetes.cri.container-type={kind}"] if grouped else []
        node.ctr("run", "-d", "--runtime", runtime, *group, IMAGE, cid, "sleep", "1000")
        wait_until(lambda: task_pid(node, cid), f"{cid} running")
    # Each container also got an exec and a state query, so both shims did comparable work.
    for cid in ids:
        node.ctr("tasks", "exec", "--exec-id", "probe", cid, "true")
        node.ctr("tasks", "ls")
    time.sleep(1.0)
    pids = shim_pids(node, runtime)
    total = sum(rss_kib(p) for p in pids) / 1024
    for cid in ids:
        node.remove(cid)
    wait_until(lambda: not shim_pids(node, runtime), f"{runtime} shims of {tag} gone", step=0.1)
    return total, len(pids)


def pod_rss_main(args):
    bins = build(args.profile, args.no_build, shim_only=True)
    node = Node(bins, args.containerd, with_agent=False)
    rss = {(r, g): [] for r in (OURS, STOCK) for g in (True, False)}
    counts = {key: set() for key in rss}
    try:
        for run in range(args.runs):
            order = [STOCK, OURS] if run % 2 == 0 else [OURS, STOCK]
            for grouped in (True, False):
                for runtime in order:
                    mib, n = pod_round(node, runtime, run, grouped)
                    rss[(runtime, grouped)].append(mib)
                    counts[(runtime, grouped)].add(n)
                    print(f"run {run + 1} {runtime} {'pod' if grouped else 'no sandbox id'}: "
                          f"{n} shim process(es), {mib:.1f} MiB RSS", flush=True)
    finally:
        node.close()
    o, b = benchkit.stats(rss[(OURS, True)]), benchkit.stats(rss[(STOCK, True)])
    ratio = o["median"] / b["median"]
    o_solo, b_solo = benchkit.stats(rss[(OURS, False)]), benchkit.stats(rss[(STOCK, False)])
    shown = lambda key: ", ".join(map(str, sorted(counts[key])))
    section = f"bench_shim_rss_{args.containerd.replace('.', '')}"
    command = (f"python3 perf/bench_shim.py --pod-rss --runs {args.runs} --containerd {args.containerd}"
               f" --profile {args.profile}")
    fmt = "{:.1f}"
    lines = [
        f"<!-- {section}:start -->",
        f"### Shim memory per pod (3 containers), kybernate vs io.containerd.runc.v2, containerd {args.containerd}",
        "",
        f"Measured {benchkit.now_utc()} on {benchkit.machine_text()}, {args.profile} build, {args.runs} runs, "
        f"medians (min–max). Command: `{command}`. A pause container and two app containers share one "
        "io.kubernetes.cri.sandbox-id; the figure is the summed VmRSS of every shim process serving them "
        "(after one exec per container). Target ≤ 1.2×. The last rows run the same 3 containers "
        "without the annotation (one shim per container in both runtimes; before the grouping, the "
        "kybernate shim always ran so).",
        "",
        "| metric | kybernate | runc.v2 | ratio |",
        "| --- | --- | --- | --- |",
        f"| shim processes per pod | {shown((OURS, True))} | {shown((STOCK, True))} | |",
        f"| shim RSS per pod (MiB) | {o['median']:.1f} ({benchkit.spread(o, fmt)}) | "
        f"{b['median']:.1f} ({benchkit.spread(b, fmt)}) | {ratio:.2f}× |",
        f"| without the sandbox id: shim processes | {shown((OURS, False))} | {shown((STOCK, False))} | |",
        f"| without the sandbox id: shim RSS (MiB) | {o_solo['median']:.1f} "
        f"({benchkit.spread(o_solo, fmt)}) | {b_solo['median']:.1f} ({benchkit.spread(b_solo, fmt)}) | "
        f"{o_solo['median'] / b_solo['median']:.2f}× |",
        f"<!-- {section}:end -->",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        benchkit.update_section(args.write, report, section)
    if args.json:
        row = {"metric": "shim RSS per pod of 3 containers", "unit": "MiB",
               "ours": {"label": "kybernate", **o}, "baseline": {"label": "runc.v2", **b}, "ratio": ratio}
        benchkit.write_json(args.json, {
            "name": "shim_rss", "title": "shim memory per pod, kybernate vs io.containerd.runc.v2",
            "command": command, "runs": args.runs, "comparisons": [row],
            "markdown": report, "section": section})


def one_run(node, bin_ctl, mib, run, with_ctr_flow):
    rounds = [("stock", lambda: stock_round(node, bin_ctl, mib, run)),
              ("kyb", lambda: kybernate_round(node, bin_ctl, mib, run))]
    if with_ctr_flow:
        rounds.append(("kybctr", lambda: stock_round(node, bin_ctl, mib, run, OURS, "kybctr")))
    # Every other run goes in reverse order, so that no flow always runs first or last.
    if run % 2:
        rounds.reverse()
    out = {}
    for tag, round_ in rounds:
        out.update({f"{tag}_{k}": v for k, v in round_().items()})
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="result file (perf/README.md convention)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, one run")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--containerd", default="1.6", choices=["1.6", "2.1"])
    parser.add_argument("--profile", default="release", choices=["release", "debug"])
    parser.add_argument("--no-build", action="store_true", help="use the binaries already built")
    parser.add_argument("--write", help="results file to update")
    parser.add_argument("--pod-rss", action="store_true",
                        help="measure the shims' memory for a pod of 3 containers instead")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.runs = 64, 1
    benchkit.require_root()
    if args.pod_rss:
        pod_rss_main(args)
        return
    bins = build(args.profile, args.no_build)
    node = Node(bins, args.containerd)
    runs = []
    try:
        for run in range(args.runs):
            runs.append(one_run(node, bins["kybernatectl"], args.mib, run, not args.quick))
            print(f"run {run + 1}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}", flush=True)
    finally:
        node.close()
    col = lambda key: [r[key] for r in runs]
    size = args.mib << 20
    stock_cmd = "ctr c checkpoint --task ID REF; ctr c restore --live ID REF (io.containerd.runc.v2)"
    comparisons = [
        benchkit.comparison("freeze (heartbeat gap): kybernatectl checkpoint --container vs ctr",
                            "kybernate", col("kyb_freeze"), "runc.v2 + ctr", col("stock_freeze"),
                            size, stock_cmd),
        benchkit.comparison("restore from the RAM tier (annotation) until running on",
                            "kybernate", col("kyb_restore_ram"), "runc.v2 + ctr", col("stock_restore"),
                            size, stock_cmd),
    ]
    if not args.quick:
        comparisons += [
            benchkit.comparison("freeze (heartbeat gap), both through ctr c checkpoint --task",
                                "kybernate", col("kybctr_freeze"), "runc.v2", col("stock_freeze"), size,
                                stock_cmd),
            benchkit.comparison("ctr c restore --live until running on, both through ctr",
                                "kybernate", col("kybctr_restore"), "runc.v2", col("stock_restore"), size,
                                stock_cmd),
        ]
    command = (f"python3 perf/bench_shim.py --mib {args.mib} --runs {args.runs} --containerd {args.containerd}"
               f" --profile {args.profile}" + (" --quick" if args.quick else ""))
    lines = [
        "<!-- bench_shim:start -->",
        f"### kybernate shim vs io.containerd.runc.v2, {args.mib} MiB container, containerd {args.containerd}",
        "",
        f"Measured {benchkit.now_utc()} on {benchkit.machine_text()}, {args.profile} build, "
        f"{args.runs} runs, medians (min–max). Command: `{command}`. Targets: freeze ≤ 1.1×, "
        "restore from RAM ≤ 1.0×. `ctr` pauses the task for its whole checkpoint call; "
        "kybernatectl's flow pauses it around the dump and the rootfs diff only.",
        "",
        "| metric | kybernate (s) | runc.v2 (s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for c in comparisons:
        o, b = c["ours"], c["baseline"]
        lines.append(f"| {c['metric']} | {o['median']:.3f} ({benchkit.spread(o)}) | "
                     f"{b['median']:.3f} ({benchkit.spread(b)}) | {c['ratio']:.2f}× |")
    lines.append("<!-- bench_shim:end -->")
    report = "\n".join(lines)
    print(report)
    if args.write:
        benchkit.update_section(args.write, report, "bench_shim")
    if args.json:
        benchkit.write_json(args.json, {
            "name": "shim", "title": f"kybernate shim vs io.containerd.runc.v2, {args.mib} MiB container",
            "command": command, "runs": args.runs, "comparisons": comparisons,
            "markdown": report, "section": "bench_shim"})


if __name__ == "__main__":
    main()
