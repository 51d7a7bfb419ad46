#!/usr/bin/env python3
"""Checks that the HTML report of a harness run shows that run's data, in a real browser.

Renders REPORT in headless Chromium twice (a fresh profile each time, no network): once
with --dump-dom (the DOM after the report's script ran, which records where each chart
landed) and once with --screenshot. Then, for every chart:
- the DOM must hold a drawn element (class "datum", positive size) for every value the
  results file RESULTS says the chart shows, with that value; a chart with none fails;
- the screenshot must show the chart's data colours inside the chart's box.

Usage: python3 perf/check_report.py RESULTS REPORT [--chromium chromium] [--shot OUT.png]
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from html.parser import HTMLParser

CHARTS = ("checkpoint-phases", "restore-phases", "throughput", "scaling")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-device-scale-factor=1", "--force-color-profile=srgb", "--hide-scrollbars"]


def chromium(binary, url, extra, timeout=120):
    profile = tempfile.mkdtemp(prefix="kybernate-chromium-")
    try:
        out = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True,
                             text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


class Charts(HTMLParser):
    """Collects every svg.chart and the datum elements inside it."""

    def __init__(self):
        super().__init__()
        self.charts, self.current, self.body = {}, None, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self.current = a.get("data-chart")
            self.charts[self.current] = {"attrs": a, "data": []}
        elif self.current and "datum" in (a.get("class") or "").split():
            self.charts[self.current]["data"].append(a)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def expected(results):
    """{chart: [(series, label, value)]} straight from the results file."""
    b = results["benchmarks"]
    out = {c: [] for c in CHARTS}
    scaling = b.get("scaling", {})
    agent = b.get("agent", {})
    for op in ("checkpoint", "restore"):
        if scaling.get("status") == "ok":
            for s in scaling["sizes"]:
                out[f"{op}-phases"] += [(p, f"{s['mib']} MiB", st["median"]) for p, st in s[op].items()
                                        if st["median"] > 0]
        elif agent.get("status") == "ok":
            out[f"{op}-phases"] += [(p, "agent bench", st["median"]) for p, st in agent["phases"][op].items()
                                    if st["median"] > 0]
    for name, doc in b.items():
        if doc.get("status") != "ok":
            continue
        for c in doc["comparisons"]:
            if c.get("bytes") and c["ours"]["median"] > 0 and c["baseline"]["median"] > 0:
                label = f"{name}: {c['metric']}"
                out["throughput"].append(("ours", label, c["bytes"] / 1e9 / c["ours"]["median"]))
                out["throughput"].append(("baseline", label, c["bytes"] / 1e9 / c["baseline"]["median"]))
    if scaling.get("status") == "ok":
        for op in ("checkpoint", "restore"):
            for p in {p for s in scaling["sizes"] for p in s[op]}:
                pts = [(s["mib"], s[op][p]["median"]) for s in scaling["sizes"] if p in s[op]]
                if max(v for _, v in pts) >= 0.005:
                    out["scaling"] += [(f"{op}: {p}", f"{m} MiB", v) for m, v in pts]
    return out


def drawn_area(d):
    if "r" in d:
        r = float(d["r"])
        return 3.14159 * r * r
    return float(d.get("width", 0)) * float(d.get("height", 0))


def read_png(path):
    """(width, height, rows of RGB tuples) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"{path} is not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise SystemExit(f"{path}: unsupported PNG (depth {depth}, colour type {colour}, interlace {interlace})")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def colours_in(png, box):
    """Counter of the RGB colours inside `box` (x, y, w, h) of the screenshot."""
    width, height, bpp, rows = png
    x0, y0, w, h = box
    x0, x1 = max(0, x0), min(width, x0 + w)
    seen = Counter()
    for y in range(max(0, y0), min(height, y0 + h)):
        seg = rows[y][x0 * bpp:x1 * bpp]
        seen.update(zip(seg[0::bpp], seg[1::bpp], seg[2::bpp]))
    return seen


def count_colour(seen, rgb, tolerance=4):
    return sum(n for c, n in seen.items() if all(abs(c[i] - rgb[i]) <= tolerance for i in range(3)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("report")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--shot", help="keep the screenshot here")
    args = parser.parse_args()
    if not shutil.which(args.chromium):
        sys.exit(f"{args.chromium} is not on PATH: run scripts/install-perf-tools.sh")
    results = json.load(open(args.results))
    url = "file://" + os.path.abspath(args.report)
    dom = Charts()
    dom.feed(chromium(args.chromium, url, ["--dump-dom"]))
    problems = []
    want = expected(results)
    for chart in CHARTS:
        if chart not in dom.charts:
            problems.append(f"chart {chart}: not in the page")
            continue
        if not want[chart]:
            problems.append(f"chart {chart}: the run has no data for it (empty chart)")
        drawn = [d for d in dom.charts[chart]["data"] if drawn_area(d) > 0]
        if not drawn:
            problems.append(f"chart {chart}: drew nothing")
        for series, label, value in want[chart]:
            hit = [d for d in drawn if d.get("data-series") == series and d.get("data-label") == label]
            if not hit:
                problems.append(f"chart {chart}: no drawn element for {series} at {label} ({value:.6g})")
            elif abs(float(hit[0]["data-value"]) - value) > 1e-6 + 1e-5 * abs(value):
                problems.append(f"chart {chart}: {series} at {label} shows {hit[0]['data-value']}, the run has "
                                f"{value:.6g}")
        print(f"dom {chart}: {len(drawn)} drawn elements, {len(want[chart])} values from the run")

    height = min(int(dom.body.get("data-height", "3000")) + 20, 12000)
    shot = args.shot or os.path.join(tempfile.mkdtemp(prefix="kybernate-shot-"), "report.png")
    chromium(args.chromium, url, [f"--window-size=1280,{height}", f"--screenshot={shot}"])
    png = read_png(shot)
    for chart, c in dom.charts.items():
        rect = c["attrs"].get("data-rect")
        if not rect:
            problems.append(f"chart {chart}: the report's script did not record its position")
            continue
        box = [int(v) for v in rect.split(",")]
        # Only the plotting area counts: the legend's swatches carry the same colours.
        box[2] = min(box[2], int(c["attrs"].get("data-plot-width", box[2])))
        seen = colours_in(png, box)
        colours = {}
        for d in c["data"]:
            colours[d["fill"]] = colours.get(d["fill"], 0) + drawn_area(d)
        for fill, area in colours.items():
            if area < 12:
                continue
            rgb = tuple(int(fill[i:i + 2], 16) for i in (1, 3, 5))
            pixels = count_colour(seen, rgb)
            if pixels < min(10, area * 0.3):
                problems.append(f"chart {chart}: colour {fill} ({area:.0f} px² of data) shows on {pixels} pixels "
                                f"of the screenshot")
            else:
                print(f"png {chart}: {fill} on {pixels} pixels ({area:.0f} px² drawn)")
    print(f"screenshot: {shot}")
    if problems:
        print("\nFAILED:\n" + "\n".join(f"- {p}" for p in problems))
        sys.exit(1)
    print("every chart drew the run's data")


if __name__ == "__main__":
    main()
