#!/usr/bin/env python3
"""The self-contained HTML report of a harness run (perf/run.py): inline SVG charts, inline
style and script, no network.

Charts (each an <svg class="chart" data-chart=NAME>; every drawn value is an element with
class "datum" carrying data-series, data-label and data-value, so tests can check that the
chart drew the run's data):
- checkpoint-phases / restore-phases: a stacked bar per process size, one segment per phase
  (at least MIN_SEGMENT_PX high, so a phase of a few milliseconds stays visible);
- throughput: GB/s of ours against each baseline, for every comparison that moved bytes;
- scaling: each phase's median time against process size (log-log), with the fitted GB/s.

Usage: python3 perf/report.py perf/out/results.json [-o perf/out/report.html]
"""

import argparse
import html
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchkit import machine_text  # noqa: E402

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
ORDER = ["cuda_lock", "cuda_checkpoint", "criu_dump", "cuda_resume", "cuda_release", "cuda_unlock", "store_ram",
         "digest", "compress", "store_nvme", "drain", "upload", "store_s3", "wait_pid", "prefetch", "download",
         "verify_s3", "verify_nvme", "verify_ram", "load", "cuda_check", "criu_restore", "cuda_restore"]
W, H = 1100, 380
M = {"l": 70, "r": 300, "t": 40, "b": 50}


def esc(s):
    return html.escape(str(s), quote=True)


def phase_key(p):
    return (ORDER.index(p) if p in ORDER else len(ORDER), p)


class Colours:
    """One colour per series name, stable across the charts of a report."""

    def __init__(self):
        self.known = {}

    def __call__(self, name):
        if name not in self.known:
            self.known[name] = PALETTE[len(self.known) % len(PALETTE)]
        return self.known[name]


def nice_max(v):
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def svg_open(name, title, series_count):
    return [f'<svg class="chart" data-chart="{esc(name)}" data-series-count="{series_count}" width="{W}" '
            f'height="{H}" data-plot-width="{W - M["r"] + 10}" viewBox="0 0 {W} {H}" role="img">',
            f'<text x="{M["l"]}" y="22" class="title">{esc(title)}</text>']


def empty(name, title, why):
    return "\n".join(svg_open(name, title, 0) + [
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="empty">no data: {esc(why)}</text>', "</svg>"])


def legend(out, names, colours, notes=None):
    x, y = W - M["r"] + 20, M["t"] + 5
    for i, n in enumerate(names):
        out.append(f'<rect x="{x}" y="{y + i * 20}" width="14" height="14" fill="{colours(n)}"/>')
        note = f" — {notes[n]}" if notes and notes.get(n) else ""
        out.append(f'<text x="{x + 20}" y="{y + i * 20 + 12}" class="legend">{esc(n)}{esc(note)}</text>')


def y_axis(out, top, unit, fmt="{:g}"):
    ph = H - M["t"] - M["b"]
    for i in range(6):
        v = top * i / 5
        y = H - M["b"] - ph * i / 5
        out.append(f'<line x1="{M["l"]}" x2="{W - M["r"]}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{M["l"] - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{fmt.format(v)}</text>')
    out.append(f'<text x="14" y="{M["t"] + ph / 2}" class="axis" transform="rotate(-90 14 {M["t"] + ph / 2})" '
               f'text-anchor="middle">{esc(unit)}</text>')


MIN_SEGMENT_PX = 3


def stacked(name, title, bars, colours):
    """bars: [(label, {phase: seconds})]."""
    phases = sorted({p for _, ph in bars for p, v in ph.items() if v > 0}, key=phase_key)
    if not bars or not phases:
        return empty(name, title, "no phase timings in this run")
    top = nice_max(max(sum(ph.values()) for _, ph in bars) * 1000)
    out = svg_open(name, title, len(phases))
    y_axis(out, top, "ms (median)")
    pw, ph_ = W - M["l"] - M["r"], H - M["t"] - M["b"]
    slot = pw / len(bars)
    bw = min(90, slot * 0.6)
    for i, (label, phs) in enumerate(bars):
        x = M["l"] + slot * i + (slot - bw) / 2
        base = H - M["b"]
        total = 0.0
        for p in phases:
            v = phs.get(p, 0.0)
            if v <= 0:
                continue
            # A phase of a few milliseconds would be a sliver thinner than a pixel that the
            # browser blends into its neighbours; it is drawn MIN_SEGMENT_PX high instead.
            h = max(ph_ * v * 1000 / top, MIN_SEGMENT_PX)
            base -= h
            total += v
            out.append(f'<rect class="datum" data-series="{esc(p)}" data-label="{esc(label)}" data-value="{v:.6f}" '
                       f'x="{x:.1f}" y="{base:.2f}" width="{bw:.1f}" height="{h:.2f}" fill="{colours(p)}">'
                       f'<title>{esc(label)} {esc(p)}: {v * 1000:.0f} ms</title></rect>')
        out.append(f'<text x="{x + bw / 2:.1f}" y="{base - 5:.1f}" text-anchor="middle" class="tick">'
                   f'{total * 1000:.0f} ms</text>')
        out.append(f'<text x="{x + bw / 2:.1f}" y="{H - M["b"] + 18}" text-anchor="middle" class="tick">'
                   f'{esc(label)}</text>')
    legend(out, phases, colours)
    out.append("</svg>")
    return "\n".join(out)


def throughput(benchmarks, colours):
    rows = []
    for bname, doc in benchmarks.items():
        if doc.get("status") != "ok":
            continue
        for c in doc["comparisons"]:
            if c.get("bytes") and c["ours"]["median"] > 0 and c["baseline"]["median"] > 0:
                rows.append((f"{bname}: {c['metric']}", c["bytes"] / 1e9 / c["ours"]["median"],
                             c["bytes"] / 1e9 / c["baseline"]["median"], c["ours"]["label"], c["baseline"]["label"]))
    title = "Throughput against each baseline (GB/s of image, medians; higher is better)"
    if not rows:
        return empty("throughput", title, "no benchmark reported bytes moved")
    height = M["t"] + 30 * 2 * len(rows) + 30
    top = nice_max(max(max(r[1], r[2]) for r in rows))
    out = [f'<svg class="chart" data-chart="throughput" data-series-count="2" width="{W}" height="{height}" '
           f'data-plot-width="{W}" viewBox="0 0 {W} {height}" role="img">',
           f'<text x="20" y="22" class="title">{esc(title)}</text>']
    left, right = 400, W - 150
    for i in range(6):
        x = left + (right - left) * i / 5
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{M["t"]}" y2="{height - 25}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" class="tick">{top * i / 5:g}</text>')
    for i, (label, ours, base, ol, bl) in enumerate(rows):
        y = M["t"] + i * 60
        out.append(f'<text x="{left - 8}" y="{y + 24}" text-anchor="end" class="tick">{esc(label[:60])}</text>')
        for j, (series, v) in enumerate((("ours", ours), ("baseline", base))):
            w = (right - left) * v / top
            out.append(f'<rect class="datum" data-series="{series}" data-label="{esc(label)}" data-value="{v:.6f}" '
                       f'x="{left}" y="{y + j * 24 + 2}" width="{w:.1f}" height="20" fill="{colours(series)}">'
                       f'<title>{esc(ol if j == 0 else bl)}: {v:.2f} GB/s</title></rect>')
            out.append(f'<text x="{left + w + 5:.1f}" y="{y + j * 24 + 17}" class="tick">{esc(ol if j == 0 else bl)}'
                       f' {v:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def scaling_lines(doc, colours):
    title = "Scaling: median time per phase against process size (log–log), fitted GB/s"
    if not doc or doc.get("status") != "ok" or len(doc.get("sizes", [])) < 2:
        return empty("scaling", title, "the scaling benchmark did not run")
    series = {}
    for op in ("checkpoint", "restore"):
        for p in {p for s in doc["sizes"] for p in s[op]}:
            pts = [(s["mib"], s[op][p]["median"]) for s in doc["sizes"] if p in s[op]]
            if max(v for _, v in pts) >= 0.005:
                series[f"{op}: {p}"] = (op, p, pts)
    if not series:
        return empty("scaling", title, "every phase took under 5 ms")
    names = sorted(series, key=lambda n: (series[n][0], phase_key(series[n][1])))
    xs = [s["mib"] for s in doc["sizes"]]
    x0, x1 = math.log2(min(xs)), math.log2(max(xs))
    vals = [max(v, 0.001) for n in names for _, v in series[n][2]]
    y0, y1 = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    y1 = max(y1, y0 + 1)
    pw, ph = W - M["l"] - M["r"], H - M["t"] - M["b"]

    def px(mib):
        return M["l"] + pw * ((math.log2(mib) - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(sec):
        return H - M["b"] - ph * (math.log10(max(sec, 0.001)) - y0) / (y1 - y0)

    out = svg_open("scaling", title, len(names))
    for e in range(y0, y1 + 1):
        y = py(10 ** e)
        out.append(f'<line x1="{M["l"]}" x2="{W - M["r"]}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        tick = f"{10 ** e * 1000:g} ms" if e < 0 else f"{10 ** e:g} s"
        out.append(f'<text x="{M["l"] - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{tick}</text>')
    for mib in xs:
        out.append(f'<text x="{px(mib):.1f}" y="{H - M["b"] + 18}" text-anchor="middle" class="tick">'
                   f'{mib} MiB</text>')
    notes = {}

    def colour(n):
        return colours(series[n][1])

    for n in names:
        op, p, pts = series[n]
        fit = doc.get("fits", {}).get(op, {}).get(p, {})
        notes[n] = f"{fit['gb_per_s']:.2f} GB/s" if fit.get("gb_per_s") else "flat"
        dash = ' stroke-dasharray="6 4"' if op == "restore" else ""
        path = " ".join(f"{px(m):.1f},{py(v):.1f}" for m, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour(n)}" stroke-width="2"{dash}/>')
        for m, v in pts:
            out.append(f'<circle class="datum" data-series="{esc(n)}" data-label="{m} MiB" data-value="{v:.6f}" '
                       f'cx="{px(m):.1f}" cy="{py(v):.1f}" r="5" fill="{colour(n)}">'
                       f'<title>{esc(n)} at {m} MiB: {v * 1000:.0f} ms</title></circle>')
    legend(out, names, colour, notes)
    out.append("</svg>")
    return "\n".join(out)


def phase_bars(benchmarks, op):
    scaling = benchmarks.get("scaling", {})
    if scaling.get("status") == "ok" and scaling.get("sizes"):
        return [(f"{s['mib']} MiB", {p: st["median"] for p, st in s[op].items()}) for s in scaling["sizes"]]
    agent = benchmarks.get("agent", {})
    if agent.get("status") == "ok" and agent.get("phases", {}).get(op):
        return [("agent bench", {p: st["median"] for p, st in agent["phases"][op].items()})]
    return []


def tables(results):
    out = ['<h2>Ratios against the baselines of this run</h2>', '<table><tr><th>benchmark</th><th>metric</th>'
           '<th>ours (s)</th><th>baseline (s)</th><th>ratio</th></tr>']
    for name, doc in results["benchmarks"].items():
        if doc.get("status") != "ok":
            out.append(f'<tr class="absent"><td>{esc(name)}</td><td colspan="4">{esc(doc.get("status"))}'
                       f'{": " + esc(doc["reason"]) if doc.get("reason") else ""} — {esc(doc.get("description", ""))}'
                       f'</td></tr>')
            continue
        for c in doc["comparisons"]:
            o, b = c["ours"], c["baseline"]
            r = o["median"] / b["median"] if b["median"] else float("nan")
            out.append(f'<tr><td>{esc(name)}</td><td>{esc(c["metric"])}</td><td>{esc(o["label"])} '
                       f'{o["median"]:.3f} ({o["min"]:.3f}–{o["max"]:.3f})</td><td>{esc(b["label"])} '
                       f'{b["median"]:.3f} ({b["min"]:.3f}–{b["max"]:.3f})</td><td>{r:.2f}×</td></tr>')
    out.append("</table>")
    scaling = results["benchmarks"].get("scaling", {})
    if scaling.get("status") == "ok":
        out.append("<h2>Fitted throughput per phase (scaling run)</h2><table><tr><th>operation</th><th>phase</th>"
                   "<th>GB/s</th><th>intercept (ms)</th><th>r²</th></tr>")
        for op, phases in scaling["fits"].items():
            for p, f in sorted(phases.items(), key=lambda kv: phase_key(kv[0])):
                gbs = f"{f['gb_per_s']:.2f}" if f["gb_per_s"] else "flat"
                out.append(f"<tr><td>{op}</td><td>{esc(p)}</td><td>{gbs}</td><td>{f['intercept_s'] * 1000:.0f}</td>"
                           f"<td>{f['r2']:.2f}</td></tr>")
        out.append("</table>")
    out.append("<h2>Exact commands</h2><ul>")
    out.append(f"<li>harness: <code>{esc(results['command'])}</code></li>")
    for name, doc in results["benchmarks"].items():
        out.append(f"<li>{esc(name)}: " + (f"<code>{esc(doc['command'])}</code>" if doc.get("status") == "ok"
                                           else esc(doc.get("status"))) + "</li>")
    out.append("</ul>")
    return "\n".join(out)


STYLE = """
body { font: 14px/1.4 sans-serif; margin: 20px; color: #222; background: #fff; width: 1140px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
.meta { color: #555; margin-bottom: 12px; }
rect.datum { shape-rendering: crispEdges; }
svg.chart { display: block; margin: 10px 0 18px; border: 1px solid #ddd; background: #fff; }
.title { font-size: 15px; font-weight: bold; fill: #222; } .tick { font-size: 12px; fill: #444; }
.legend { font-size: 12px; fill: #222; } .axis { font-size: 12px; fill: #444; }
.empty { font-size: 16px; fill: #b00; } line.grid { stroke: #e6e6e6; stroke-width: 1; }
table { border-collapse: collapse; margin-bottom: 10px; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; } tr.absent td { color: #888; font-style: italic; }
code { font-size: 12px; }
"""

# Records where each chart landed on the page, so a headless-browser test can find it in a
# screenshot (--dump-dom shows the DOM after this script ran).
SCRIPT = """
document.querySelectorAll('svg.chart').forEach(function (svg) {
  var r = svg.getBoundingClientRect();
  svg.setAttribute('data-rect', [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]
    .map(Math.round).join(','));
  svg.setAttribute('data-drawn', svg.querySelectorAll('.datum').length);
});
document.body.setAttribute('data-height', Math.ceil(document.documentElement.scrollHeight));
"""


def render(results):
    colours = Colours()
    b = results["benchmarks"]
    m = results["machine"]
    absent = [n for n, d in b.items() if d.get("status") == "not present"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Kybernate benchmarks {esc(results['date'])}</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>Kybernate benchmarks</h1>",
        f'<div class="meta">{esc(results["date"])} · {esc(machine_text(m))} · <code>{esc(results["command"])}</code>'
        + (f" · not present: {esc(', '.join(absent))}" if absent else "") + "</div>",
        stacked("checkpoint-phases", "Checkpoint: phase breakdown per process size (median ms)",
                phase_bars(b, "checkpoint"), colours),
        stacked("restore-phases", "Restore: phase breakdown per process size (median ms)",
                phase_bars(b, "restore"), colours),
        throughput(b, colours),
        scaling_lines(b.get("scaling"), colours),
        tables(results),
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    results = json.load(open(args.results))
    out = args.output or args.results.rsplit("/", 1)[0] + "/report.html"
    with open(out, "w") as f:
        f.write(render(results))
    print(out)


if __name__ == "__main__":
    main()
