"""Shared pieces of the perf/ benchmarks: the agent binaries, a private agent, sample
workloads, statistics, the result-file convention (see perf/README.md).

Not a benchmark itself: perf/run.py discovers only files named bench_*.py.
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "kybernate-bench/1"
CRIU_OPTS = ["--tcp-established", "--file-locks", "--ext-unix-sk", "--link-remap"]


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def binaries():
    """(kybernate-agent, kybernatectl): from KYBERNATE_AGENT_BIN / KYBERNATECTL_BIN when both
    are set (the tests pass their debug build), else a fresh release build."""
    agent, ctl = os.environ.get("KYBERNATE_AGENT_BIN"), os.environ.get("KYBERNATECTL_BIN")
    if agent and ctl:
        for path in (agent, ctl):
            if not os.access(path, os.X_OK):
                raise SystemExit(f"benchmark binary {path} is missing or not executable")
        return agent, ctl, "prebuilt (KYBERNATE_AGENT_BIN)"
    subprocess.run(["cargo", "build", "--release", "-p", "kybernate-agent", "--bins"], cwd=ROOT, check=True)
    release = os.path.join(target_dir(), "release")
    return os.path.join(release, "kybernate-agent"), os.path.join(release, "kybernatectl"), "release"


def require_root():
    if os.geteuid() != 0:
        raise SystemExit("this benchmark checkpoints real processes with CRIU and must run as root")


def machine():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # The 1-minute load average says how busy the machine was (shared machines are noisy).
    return {"cores": os.cpu_count(), "memory_gib": round(mem), "kernel": platform.release(),
            "load": round(os.getloadavg()[0], 1)}


def machine_text(m=None):
    m = m or machine()
    load = f", load average {m['load']}" if "load" in m else ""
    return f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}{load}"


def now_utc():
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def stats(values):
    """Median and spread of several runs; the raw values are kept too."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def spread(s, fmt="{:.3f}"):
    return f"{fmt.format(s['min'])}–{fmt.format(s['max'])}"


def wait_until(predicate, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def read_status(path):
    try:
        with open(path) as f:
            return dict(kv.split("=", 1) for kv in f.read().split() if "=" in kv)
    except (OSError, ValueError):
        return None


def start_workload(ctl, mib, status):
    """`kybernatectl workload` holding `mib` MiB, in its own session, once it counts."""
    if os.path.exists(status):
        os.remove(status)
    proc = subprocess.Popen([ctl, "workload", "--mib", str(mib), "--status", status],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: (s := read_status(status)) and int(s["counter"]) >= 3, f"{mib} MiB workload to start")
    return proc


def pid_gone(pid):
    return not os.path.exists(f"/proc/{pid}")


def continued(status, counter_at_dump, epoch):
    """The restored workload counts on from where it was dumped (same epoch: not restarted)."""
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


class Agent:
    """A private kybernate-agent: own socket, state dir and tiers; stopped on exit."""

    def __init__(self, agent_bin, ctl, ram_parent="/dev/shm", nvme_parent=None, metrics_addr="127.0.0.1:0",
                 extra_config=""):
        self.ctl_bin = ctl
        self.work = tempfile.mkdtemp(prefix="kybernate-bench-", dir=ram_parent)
        self.nvme_work = tempfile.mkdtemp(prefix="kybernate-bench-", dir=nvme_parent) if nvme_parent else None
        self.socket = os.path.join(self.work, "agent.sock")
        config = os.path.join(self.work, "agent.toml")
        tiers = [f'ram_path = "{self.work}/ram"']
        if self.nvme_work:
            tiers.append(f'nvme_path = "{self.nvme_work}/nvme"')
        # The agent refuses configured tier directories that do not exist.
        os.makedirs(f"{self.work}/ram", exist_ok=True)
        if self.nvme_work:
            os.makedirs(f"{self.nvme_work}/nvme", exist_ok=True)
        with open(config, "w") as f:
            f.write("[tiers]\n" + "\n".join(tiers) + "\n" + extra_config)
        self.log_path = os.path.join(self.work, "agent.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([agent_bin, "--config", config, "--state-dir", os.path.join(self.work, "state"),
                                         "--socket", self.socket, "--metrics-addr", metrics_addr],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            wait_until(lambda: os.path.exists(self.socket) or self.process.poll() is not None, "agent socket", 60)
        except RuntimeError:
            self.close()
            raise
        if self.process.poll() is not None:
            log = open(self.log_path).read()
            self.close()
            raise RuntimeError(f"kybernate-agent exited at start:\n{log}")

    def ctl(self, *args):
        """kybernatectl --output json ARGS against this agent; the parsed reply."""
        out = subprocess.run([self.ctl_bin, "--socket", self.socket, "--output", "json", *args],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kybernatectl {' '.join(args)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.nvme_work:
            shutil.rmtree(self.nvme_work, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def comparison(metric, ours_label, ours, base_label, base, bytes_moved=None, baseline_command=None):
    """One row of the ratio table: our median against the baseline's, both in seconds."""
    row = {"metric": metric, "unit": "s", "ours": {"label": ours_label, **stats(ours)},
           "baseline": {"label": base_label, **stats(base)}}
    row["ratio"] = row["ours"]["median"] / row["baseline"]["median"] if row["baseline"]["median"] > 0 else None
    if bytes_moved:
        row["bytes"] = int(bytes_moved)
    if baseline_command:
        row["baseline"]["command"] = baseline_command
    return row


def write_json(path, doc):
    doc.setdefault("schema", SCHEMA)
    doc.setdefault("date", now_utc())
    doc.setdefault("machine", machine())
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def update_section(path, report, key):
    """Replaces the `<!-- key:start/end -->` section of a results file (or appends it)."""
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
