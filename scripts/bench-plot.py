#!/usr/bin/env python3
"""Plot fanout-bench results: CPU seconds per delivered GB and p99 latency against
the client count, for each element (rsmultifdsink, C multifdsink, raw writev floor).

    scripts/bench-plot.py bench.csv [-o docs/benchmark.svg] [--size 4096]
    scripts/bench-plot.py bench.csv --markdown     # median tables for docs/benchmark.md

Reads the CSV written by `cargo bench --bench fanout -- --csv bench.csv`,
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
        # Overloaded: a client kicked or lost, under 99 % delivered, or the producer
        # behind its schedule (medians over repetitions).
        med = lambda k: statistics.median(float(r[k]) for r in rows)
        over = (med("kicked") + med("lost") > 0 or med("delivered_ratio") < 0.99
                or med("push_rate_ratio") < 0.97)
        data[(transport, bitrate, sz)][(elem, "overloaded")][clients] = over
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


def panel_svg(out, x0, y0, series, title, ylabel, xr, overloaded):
    """series: {elem: {clients: value}}; overloaded: {elem: {clients: bool}}"""
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
            over = overloaded.get(elem, {}).get(c, False)
            fill = "white" if over else color
            note = " (overloaded)" if over else ""
            out.append(f'<circle cx="{sx(c):.1f}" cy="{sy(v):.1f}" r="{4 if over else 3}" fill="{fill}" '
                       f'stroke="{color}" stroke-width="1.5">'
                       f'<title>{elem} {c} clients: {v:.4g}{note}</title></circle>')


def markdown(path):
    """Median tables (one per transport, bitrate and size) and the sustain results, as
    Markdown, for docs/benchmark.md."""
    groups = defaultdict(list)
    sustain = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["mode"] in ("matrix", "raw"):
                groups[(row["transport"], row["bitrate"], int(row["size"]))].append(row)
            elif row["mode"] == "sustain":
                sustain.append(row)

    def med(rows, key):
        vals = []
        for r in rows:
            try:
                v = float(r[key])
            except ValueError:
                continue
            if math.isfinite(v):
                vals.append(v)
        return statistics.median(vals) if vals else float("nan")

    def num(v, digits=3):
        if not math.isfinite(v):
            return "-"
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if v < 1 else f"{v:.2f}"

    def ratio(a, b):
        return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "-"

    def key(k):
        transport, bitrate, size = k
        rate = float("inf") if bitrate == "max" else float(bitrate.rstrip("kMG")) * {
            "k": 1e3, "M": 1e6, "G": 1e9}.get(bitrate[-1], 1)
        return (transport != "unix", size, -rate)

    for k in sorted(groups, key=key):
        transport, bitrate, size = k
        rows = groups[k]
        reps = max(int(r["rep"]) for r in rows) + 1
        rate = "unpaced (max)" if bitrate == "max" else f"{bitrate}bit/s per client"
        print(f"\n#### {transport}, {size // 1024 if size >= 1024 else size}"
              f"{' KiB' if size >= 1024 else ' B'} buffers, {rate} (median of {reps})\n")
        print("| clients | CPU s/GB rs | C | raw | rs/C | rs/raw | p99 ms rs | C | rs/C "
              "| push p99 µs rs | C | Gbit/s rs | C | peak RSS MB rs | C | other load | notes |")
        print("|" + "---:|" * 16 + "---|")
        by_clients = defaultdict(lambda: defaultdict(list))
        for r in rows:
            by_clients[int(r["clients"])][r["element"]].append(r)
        for clients in sorted(by_clients):
            e = by_clients[clients]
            m = {el: {kk: med(e[el], kk) for kk in (
                "cpu_s_per_gb", "p99_ms", "push_p99_us", "gbit_s", "peak_rss_mb", "kicked",
                "lost", "delivered_ratio", "push_rate_ratio", "foreign_pct")} for el in e}
            get = lambda el, kk: m.get(el, {}).get(kk, float("nan"))
            notes = []
            for el in ("rs", "c", "raw"):
                if el not in m:
                    continue
                bad = []
                if get(el, "kicked") > 0:
                    bad.append(f"{get(el, 'kicked'):.0f} kicked")
                if get(el, "lost") > 0:
                    bad.append(f"{get(el, 'lost'):.0f} lost")
                if get(el, "delivered_ratio") < 0.99:
                    bad.append(f"{get(el, 'delivered_ratio') * 100:.0f}% delivered")
                if get(el, "push_rate_ratio") < 0.97:
                    bad.append(f"producer at {get(el, 'push_rate_ratio') * 100:.0f}% of the rate")
                if bad:
                    notes.append(f"{el}: " + ", ".join(bad))
            load = statistics.median(float(r["foreign_pct"]) for el in e for r in e[el])
            print(f"| {clients} | {num(get('rs', 'cpu_s_per_gb'))} | {num(get('c', 'cpu_s_per_gb'))} "
                  f"| {num(get('raw', 'cpu_s_per_gb'))} "
                  f"| {ratio(get('rs', 'cpu_s_per_gb'), get('c', 'cpu_s_per_gb'))} "
                  f"| {ratio(get('rs', 'cpu_s_per_gb'), get('raw', 'cpu_s_per_gb'))} "
                  f"| {num(get('rs', 'p99_ms'))} | {num(get('c', 'p99_ms'))} "
                  f"| {ratio(get('rs', 'p99_ms'), get('c', 'p99_ms'))} "
                  f"| {num(get('rs', 'push_p99_us'))} | {num(get('c', 'push_p99_us'))} "
                  f"| {num(get('rs', 'gbit_s'))} | {num(get('c', 'gbit_s'))} "
                  f"| {num(get('rs', 'peak_rss_mb'))} | {num(get('c', 'peak_rss_mb'))} "
                  f"| {load:.0f}% | {'; '.join(notes)} |")
    if sustain:
        print("\n#### Highest client count sustained without a kick\n")
        elems = sorted({r["element"] for r in sustain}, key=lambda x: ORDER.index(x) if x in ORDER else 9)
        print("| transport | bitrate | buffer | " + " | ".join(elems) + (" | rs/C |" if {"rs", "c"} <= set(elems) else " |"))
        print("|---|---:|---:|" + "---:|" * (len(elems) + ({"rs", "c"} <= set(elems))))
        cases = sorted({(r["transport"], r["bitrate"], r["size"]) for r in sustain},
                       key=lambda c: (c[0] != "unix", c[1]))
        for t, b, sz in cases:
            vals = {}
            cells = []
            for el in elems:
                rs = [r for r in sustain if (r["transport"], r["bitrate"], r["size"], r["element"]) == (t, b, sz, el)]
                if not rs:
                    cells.append("-")
                    continue
                n = statistics.median(int(r["clients"]) for r in rs)
                capped = any(r["status"] == "capped" for r in rs)
                vals[el] = n
                cells.append(f"{'≥ ' if capped else ''}{n:.0f}")
            line = f"| {t} | {b}bit/s | {int(sz) // 1024} KiB | " + " | ".join(cells) + " |"
            if {"rs", "c"} <= set(elems):
                line += f" {ratio(vals.get('rs', float('nan')), vals.get('c', float('nan')))} |"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("-o", "--output", default="benchmark.svg")
    ap.add_argument("--size", type=int, default=None,
                    help="buffer size to plot (default: the most common one in the CSV)")
    ap.add_argument("--title", default="fanout-bench: rsmultifdsink vs multifdsink")
    ap.add_argument("--markdown", action="store_true",
                    help="print the median tables (and sustain results) as Markdown; "
                         "with no -o given, write no plot")
    args = ap.parse_args()
    if args.markdown:
        markdown(args.csv)
        if "-o" not in sys.argv and "--output" not in sys.argv:
            return

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
    width = max(PANEL_W * len(panels), 1000)
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
            overloaded = {elem: data[panel].get((elem, "overloaded"), {}) for elem in ORDER}
            panel_svg(out, col * PANEL_W, TITLE_H + row * PANEL_H, series,
                      f"{transport}, {rate}", label, xr, overloaded)
    ly = TITLE_H + PANEL_H * len(METRICS) + 20
    x = 20
    for elem in ORDER:
        color, dash, name = STYLE[elem]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{x}" y1="{ly}" x2="{x + 30}" y2="{ly}" stroke="{color}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{x + 36}" y="{ly + 4}" font-size="12">{escape(name)}</text>')
        x += 200
    out.append(f'<circle cx="{x + 10}" cy="{ly}" r="4" fill="white" stroke="#333" stroke-width="1.5"/>')
    out.append(f'<text x="{x + 20}" y="{ly + 4}" font-size="12">overloaded: a client kicked, &lt;99% '
               f'delivered or producer behind schedule</text>')
    out.append("</svg>")
    with open(args.output, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {args.output} ({len(panels)} panels, {size} byte buffers)")


if __name__ == "__main__":
    main()
