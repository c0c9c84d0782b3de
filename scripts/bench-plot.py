#!/usr/bin/env python3
"""Plot fanout-bench results: CPU seconds per delivered GB and p99 latency against
the client count, for each element (rsmultifdsink, C multifdsink, raw writev floor).

    scripts/bench-plot.py bench.csv [-o docs/benchmark.svg] [--size 4096]

Reads the CSV written by `cargo run --release --example fanout-bench -- --csv bench.csv`,
takes the median over repetitions of every (transport, bitrate, element, clients) case
and writes an SVG: one column per transport and bitrate, CPU/GB on top, p99 latency
below, both axes logarithmic. Only Python's standard library is used.
"""

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from xml.sax.saxutils import escape

STYLE = {
    "rs": ("#d95f02", "", "rsmultifdsink"),
    "c": ("#1b6fb3", "", "multifdsink (C)"),
    "raw": ("#777777", "5,4", "raw writev floor"),
}
ORDER = ["rs", "c", "raw"]
METRICS = [
    ("cpu_s_per_gb", "CPU s per delivered GB"),
    ("p99_ms", "p99 push-to-receive latency (ms)"),
]

PANEL_W, PANEL_H = 330, 230
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 40, 45
LEGEND_H = 40
TITLE_H = 50


def load(path, size):
    groups = defaultdict(list)
    sizes = set()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["mode"] not in ("matrix", "raw") or row["status"] != "ok":
                continue
            sizes.add(int(row["size"]))
            if size is not None and int(row["size"]) != size:
                continue
            key = (row["transport"], row["bitrate"], row["size"], row["element"], int(row["clients"]))
            groups[key].append(row)
    data = defaultdict(lambda: defaultdict(dict))
    for (transport, bitrate, sz, elem, clients), rows in groups.items():
        for metric, _ in METRICS:
            vals = []
            for r in rows:
                try:
                    v = float(r[metric])
                except ValueError:
                    continue
                if math.isfinite(v):
                    vals.append(v)
            if vals:
                panel = (transport, bitrate, sz)
                data[panel][(elem, metric)][clients] = statistics.median(vals)
    return data, sizes


def nice_ticks(lo, hi):
    """1-2-5 ticks per decade between lo and hi (log axis)."""
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo * 0.9999 <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    if len(ticks) > 8:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith("1")]
    return ticks


def fmt(v):
    if v >= 1000:
        return f"{v / 1000:g}k"
    if v >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def log_range(values):
    vals = [v for v in values if v > 0]
    if not vals:
        return 0.1, 1.0
    lo, hi = min(vals), max(vals)
    lo = 10 ** math.floor(math.log10(lo))
    hi = 10 ** math.ceil(math.log10(hi))
    if lo == hi:
        hi = lo * 10
    return lo, hi


def panel_svg(out, x0, y0, series, title, ylabel, xr):
    """series: {elem: {clients: value}}"""
    pw = PANEL_W - MARGIN_L - MARGIN_R
    ph = PANEL_H - MARGIN_T - MARGIN_B
    ox, oy = x0 + MARGIN_L, y0 + MARGIN_T
    yr = log_range([v for s in series.values() for v in s.values()])

    def sx(v):
        return ox + (math.log10(v) - math.log10(xr[0])) / (math.log10(xr[1]) - math.log10(xr[0])) * pw

    def sy(v):
        return oy + ph - (math.log10(v) - math.log10(yr[0])) / (math.log10(yr[1]) - math.log10(yr[0])) * ph

    out.append(f'<text x="{x0 + PANEL_W / 2:.1f}" y="{y0 + 22}" text-anchor="middle" '
               f'font-size="13" font-weight="bold">{escape(title)}</text>')
    out.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    for t in nice_ticks(*yr):
        y = sy(t)
        out.append(f'<line x1="{ox}" y1="{y:.1f}" x2="{ox + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ox - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{fmt(t)}</text>')
    for t in nice_ticks(*xr):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{oy}" x2="{x:.1f}" y2="{oy + ph}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{oy + ph + 14}" text-anchor="middle" font-size="10">{fmt(t)}</text>')
    out.append(f'<text x="{ox + pw / 2:.1f}" y="{oy + ph + 32}" text-anchor="middle" font-size="11">clients</text>')
    out.append(f'<text transform="translate({x0 + 16},{oy + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle" font-size="11">{escape(ylabel)}</text>')
    for elem in ORDER:
        pts = sorted((c, v) for c, v in series.get(elem, {}).items() if v > 0 and c > 0)
        if not pts:
            continue
        color, dash, _ = STYLE.get(elem, ("#000", "", elem))
        path = " ".join(f"{sx(c):.1f},{sy(v):.1f}" for c, v in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>')
        for c, v in pts:
            out.append(f'<circle cx="{sx(c):.1f}" cy="{sy(v):.1f}" r="3" fill="{color}">'
                       f'<title>{elem} {c} clients: {v:.4g}</title></circle>')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("-o", "--output", default="benchmark.svg")
    ap.add_argument("--size", type=int, default=None,
                    help="buffer size to plot (default: the most common one in the CSV)")
    ap.add_argument("--title", default="fanout-bench: rsmultifdsink vs multifdsink")
    args = ap.parse_args()

    size = args.size
    if size is None:
        _, sizes = load(args.csv, None)
        if not sizes:
            sys.exit("no matrix rows with status ok in " + args.csv)
        counts = defaultdict(int)
        with open(args.csv, newline="") as f:
            for row in csv.DictReader(f):
                if row["mode"] in ("matrix", "raw"):
                    counts[int(row["size"])] += 1
        size = max(counts, key=counts.get)
    data, _ = load(args.csv, size)
    if not data:
        sys.exit(f"no matrix rows for size {size} in {args.csv}")

    def panel_key(p):
        transport, bitrate, _ = p
        rate = float("inf") if bitrate == "max" else float(bitrate.rstrip("kMG")) * {
            "k": 1e3, "M": 1e6, "G": 1e9}.get(bitrate[-1], 1)
        return (transport != "unix", rate)

    panels = sorted(data, key=panel_key)
    xr = log_range([c for p in panels for s in data[p].values() for c in s])
    width = PANEL_W * len(panels)
    height = TITLE_H + PANEL_H * len(METRICS) + LEGEND_H
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           f'{escape(args.title)}</text>',
           f'<text x="{width / 2:.1f}" y="42" text-anchor="middle" font-size="11">'
           f'{size} byte buffers, median over repetitions, log-log; lower is better</text>']
    for col, panel in enumerate(panels):
        transport, bitrate, _ = panel
        rate = "unpaced (max)" if bitrate == "max" else f"{bitrate}bit/s per client"
        for row, (metric, label) in enumerate(METRICS):
            series = {elem: data[panel].get((elem, metric), {}) for elem in ORDER}
            panel_svg(out, col * PANEL_W, TITLE_H + row * PANEL_H, series,
                      f"{transport}, {rate}", label, xr)
    ly = TITLE_H + PANEL_H * len(METRICS) + 20
    x = 20
    for elem in ORDER:
        color, dash, name = STYLE[elem]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{x}" y1="{ly}" x2="{x + 30}" y2="{ly}" stroke="{color}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{x + 36}" y="{ly + 4}" font-size="12">{escape(name)}</text>')
        x += 200
    out.append("</svg>")
    with open(args.output, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {args.output} ({len(panels)} panels, {size} byte buffers)")


if __name__ == "__main__":
    main()
