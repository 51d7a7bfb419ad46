#!/usr/bin/env python3
"""Proves perf/dashboards/*.json against a real Prometheus scraping a real agent.

Starts a private kybernate-agent (KYBERNATE_AGENT_BIN / KYBERNATECTL_BIN, or a release
build) and a private Prometheus scraping it every second, runs checkpoints and restores
(from the RAM and the NVMe tier) and one checkpoint that times out, then evaluates every
panel's PromQL through Prometheus' HTTP API. Fails when a query is invalid, returns no
series or only NaN, or when a dashboard names a metric the agent does not export.

Usage (root): python3 perf/check_dashboards.py [--prometheus prometheus] [--keep]
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchkit import Agent, binaries, continued, kill, pid_gone, read_status, require_root, start_workload, \
    wait_until  # noqa: E402

# What the dashboards' Grafana variables stand for in the test: windows that cover the run.
VARIABLES = {"$__rate_interval": "5m", "$__range": "10m", "$__interval": "15s"}
METRIC = re.compile(r"\bkybernate_[a-zA-Z0-9_:]+")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def panels(dashboard):
    """Every panel, including those inside rows."""
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


def load_dashboards():
    """[(file, panel title, refId, expr)] and structural problems."""
    queries, problems = [], []
    files = sorted(glob.glob(os.path.join(HERE, "dashboards", "*.json")))
    if not files:
        problems.append("no dashboards in perf/dashboards/")
    for path in files:
        name = os.path.basename(path)
        try:
            d = json.load(open(path))
        except ValueError as e:
            problems.append(f"{name}: not JSON: {e}")
            continue
        for key in ("uid", "title", "panels", "schemaVersion"):
            if key not in d:
                problems.append(f"{name}: no '{key}' (not Grafana's import format)")
        ids = [p.get("id") for p in panels(d)]
        if len(ids) != len(set(ids)):
            problems.append(f"{name}: duplicate panel ids {ids}")
        for p in panels(d):
            if p.get("type") == "row":
                continue
            title = p.get("title", f"panel {p.get('id')}")
            if "gridPos" not in p:
                problems.append(f"{name}: panel '{title}' has no gridPos")
            targets = p.get("targets") or []
            if not targets:
                problems.append(f"{name}: panel '{title}' has no queries")
            for t in targets:
                if not t.get("expr"):
                    problems.append(f"{name}: panel '{title}' target {t.get('refId')} has no expr")
                    continue
                queries.append((name, title, t.get("refId", "?"), t["expr"]))
    return queries, problems


def expand(expr):
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    left = re.findall(r"\$\{?[A-Za-z_]\w*", expr)
    return expr, left


def exported_names(text):
    """Sample names in the agent's exposition (histograms give _bucket/_sum/_count)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def exercise(agent, ctl):
    """Two checkpoints, each restored twice (from RAM, from NVMe), and one checkpoint that
    times out. Every restore phase runs twice: a series is born at its first value, so a
    phase seen once has no rate and its panels would show nothing."""
    for run, tier in enumerate(("ram", "nvme")):
        status = os.path.join(agent.work, f"status-{run}")
        proc = start_workload(ctl, 16, status)
        agent.ctl("checkpoint", "--pid", str(proc.pid), "--name", f"dash-{run}")
        proc.wait()
        at_dump = read_status(status)
        wait_until(lambda: pid_gone(proc.pid), "dumped PID to be released")
        for _ in range(2):
            restored = agent.ctl("restore", f"dash-{run}", "--from", tier)
            continued(status, int(at_dump["counter"]), at_dump["epoch"])
            kill(restored["pid"])
    status = os.path.join(agent.work, "status-slow")
    proc = start_workload(ctl, 16, status)
    try:
        agent.ctl("checkpoint", "--pid", str(proc.pid), "--name", "dash-too-slow", "--timeout-ms", "1")
        raise RuntimeError("a checkpoint with a 1 ms timeout succeeded; no failure to show")
    except RuntimeError as e:
        if "timed out" not in str(e):
            raise
    finally:
        proc.kill()
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="prometheus")
    parser.add_argument("--keep", action="store_true", help="keep Prometheus' directory (for debugging)")
    args = parser.parse_args()
    require_root()
    if not shutil.which(args.prometheus):
        sys.exit(f"{args.prometheus} is not on PATH: run scripts/install-perf-tools.sh")
    queries, problems = load_dashboards()
    agent_bin, ctl, _ = binaries()
    metrics_port, prom_port = free_port(), free_port()
    prom_dir = tempfile.mkdtemp(prefix="kybernate-prometheus-")
    with open(os.path.join(prom_dir, "prometheus.yml"), "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: kybernate-agent\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    prom_log = open(os.path.join(prom_dir, "prometheus.log"), "w")
    prom = subprocess.Popen([args.prometheus, f"--config.file={prom_dir}/prometheus.yml",
                             f"--storage.tsdb.path={prom_dir}/data", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdin=subprocess.DEVNULL, stdout=prom_log, stderr=prom_log)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        with Agent(agent_bin, ctl, nvme_parent="/var/tmp", metrics_addr=f"127.0.0.1:{metrics_port}") as agent:
            def target_up():
                if prom.poll() is not None:
                    raise RuntimeError("prometheus exited:\n" + open(os.path.join(prom_dir, "prometheus.log")).read())
                try:
                    targets = json.loads(http_get(f"{api}/targets"))["data"]["activeTargets"]
                except (urllib.error.URLError, ConnectionError, KeyError, ValueError):
                    return False
                return any(t["health"] == "up" for t in targets)
            wait_until(target_up, "Prometheus to scrape the agent", 60)
            exercise(agent, ctl)
            exposition = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            # A few scrapes after the last operation, so every rate has two samples around it.
            time.sleep(4)
            exported = exported_names(exposition)
            for name, title, ref, expr in queries:
                for metric in sorted(set(METRIC.findall(expr))):
                    if metric not in exported:
                        problems.append(f"{name}: panel '{title}' uses {metric}, which the agent does not export")
                expr, left = expand(expr)
                if left:
                    problems.append(f"{name}: panel '{title}' {ref}: unknown variables {left}")
                    continue
                url = f"{api}/query?" + urllib.parse.urlencode({"query": expr})
                try:
                    reply = json.loads(http_get(url))
                except urllib.error.HTTPError as e:
                    problems.append(f"{name}: panel '{title}' {ref}: invalid query ({e.code}): "
                                    f"{e.read().decode().strip()}\n    {expr}")
                    continue
                result = reply.get("data", {}).get("result", [])
                values = [float(r["value"][1]) for r in result]
                if reply.get("status") != "success":
                    problems.append(f"{name}: panel '{title}' {ref}: {reply}")
                elif not values or all(math.isnan(v) for v in values):
                    problems.append(f"{name}: panel '{title}' {ref}: no data\n    {expr}")
                else:
                    print(f"ok  {name}: {title} [{ref}]: {len(values)} series, e.g. "
                          f"{result[0]['metric']} = {values[0]:.4g}")
            missing_in_agent = sorted({m for _, _, _, e in queries for m in METRIC.findall(e)} - exported)
            if missing_in_agent:
                print("metrics the dashboards need and the agent does not export: " + ", ".join(missing_in_agent))
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom_log.close()
        if not args.keep:
            shutil.rmtree(prom_dir, ignore_errors=True)
    print(f"{len(queries)} queries checked")
    if problems:
        print("\nFAILED:\n" + "\n".join(f"- {p}" for p in problems))
        sys.exit(1)
    print("every dashboard query is valid and returns data")


if __name__ == "__main__":
    main()
