#!/usr/bin/env python3
"""Plot fanout-bench results: CPU seconds per delivered GB and p99 latency against
the client count, for every column of the run (rsmultifdsink, its named variants,
C multifdsink, the raw writev floor).

    scripts/bench-plot.py bench.csv [-o docs/benchmark.svg] [--size 4096]
    scripts/bench-plot.py bench.csv --markdown     # median tables for docs/benchmark.md
    scripts/bench-plot.py batch.csv zc-64k.csv -o docs/benchmark.svg   # runs of several commands

Reads the CSVs written by `cargo bench --bench fanout -- --csv bench.csv` (rows of
several files are taken together, so a column measured by two commands in the same
case, such as C, gets the median of all its repetitions), takes the median over
repetitions of every (transport, stream, size, column, clients) case and
writes an SVG: one band of panels per buffer size, in it one column per transport and
stream (bitrate or rate), CPU/GB on top, p99 latency below, both axes logarithmic.
`--markdown` prints the same medians as tables, one row per column and client count
(and `--mode targets` and sustain results). Only Python's standard library is used.
"""

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from xml.sax.saxutils import escape

# The elements; every other column is a named rsmultifdsink variant, or another
# floor when its name starts with "raw" (raw-uring).
STYLE = {
    "rs": ("#d95f02", "", "rsmultifdsink"),
    "c": ("#1b6fb3", "", "multifdsink (C)"),
    "raw": ("#777777", "5,4", "raw writev floor"),
}
VARIANT_COLORS = ["#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                  "#e41a1c", "#17becf"]
VARIANT_DASHES = ["", "6,3", "2,2", "8,3,2,3"]
METRICS = [
    ("cpu_s_per_gb", "CPU s per delivered GB"),
    ("p99_ms", "p99 push-to-receive latency (ms)"),
]
MATRIX_MODES = ("matrix", "raw")

PANEL_W, PANEL_H = 330, 230
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 40, 45
BAND_H = 26
LEGEND_ROW = 22
TITLE_H = 50


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_rs(elem):
    """Whether a column is rsmultifdsink (plain or a variant), not C or a floor."""
    return elem != "c" and not elem.startswith("raw")


def columns(rows):
    """Column names in table order: rs, the variants (as they first appear), C, the
    floors."""
    seen = []
    for r in rows:
        if r["element"] not in seen:
            seen.append(r["element"])
    variants = [e for e in seen if is_rs(e) and e != "rs"]
    floors = [e for e in seen if e.startswith("raw")]
    return [e for e in ("rs",) if e in seen] + variants + [e for e in ("c",) if e in seen] + floors


def style(elem, variants):
    if elem in STYLE:
        return STYLE[elem]
    if not is_rs(elem):
        return ("#333333", "2,3", f"{elem} floor")
    i = variants.index(elem)
    return (VARIANT_COLORS[i % len(VARIANT_COLORS)],
            VARIANT_DASHES[i // len(VARIANT_COLORS) % len(VARIANT_DASHES)], f"rs {elem}")


def rate_value(bitrate):
    """'max' -> inf, '2M' -> 2e6, '8192k' -> 8.192e6 (for ordering)."""
    if bitrate == "max":
        return float("inf")
    mul = {"k": 1e3, "M": 1e6, "G": 1e9}.get(bitrate[-1], 1)
    return float(bitrate.rstrip("kMG")) * mul


def pace(row):
    """The stream as a title shows it: 'unpaced (max)', '2Mbit/s', '250/s (8192kbit/s)'."""
    if row["bitrate"] == "max":
        return "unpaced (max)"
    rate = row.get("rate") or ""
    if rate:
        return f"{float(rate):g}/s ({row['bitrate']}bit/s)"
    return f"{row['bitrate']}bit/s"


def fmt_size(size):
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def finite(rows, key):
    vals = []
    for r in rows:
        try:
            v = float(r[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(v):
            vals.append(v)
    return vals


def med(rows, key):
    vals = finite(rows, key)
    return statistics.median(vals) if vals else float("nan")


def load(rows, size):
    """{size: {(transport, pace, rate): {(elem, metric): {clients: median}}}}"""
    groups = defaultdict(list)
    for row in rows:
        if row["mode"] not in MATRIX_MODES or row["status"] != "ok":
            continue
        if size is not None and int(row["size"]) != size:
            continue
        key = (int(row["size"]), row["transport"], pace(row), rate_value(row["bitrate"]),
               row["element"], int(row["clients"]))
        groups[key].append(row)
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for (sz, transport, p, rate, elem, clients), rs in groups.items():
        panel = data[sz][(transport, p, rate)]
        for metric, _ in METRICS:
            if finite(rs, metric):
                panel[(elem, metric)][clients] = med(rs, metric)
        # Overloaded: a client kicked or lost, under 99 % delivered, or the producer
        # behind its schedule (medians over repetitions).
        panel[(elem, "overloaded")][clients] = (
            med(rs, "kicked") + med(rs, "lost") > 0 or med(rs, "delivered_ratio") < 0.99
            or med(rs, "push_rate_ratio") < 0.97)
    return data


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


def panel_svg(out, x0, y0, series, title, ylabel, xr, overloaded, styles):
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
    for elem, (color, dash, _) in styles.items():
        pts = sorted((c, v) for c, v in series.get(elem, {}).items() if v > 0 and c > 0)
        if not pts:
            continue
        path = " ".join(f"{sx(c):.1f},{sy(v):.1f}" for c, v in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>')
        for c, v in pts:
            over = overloaded.get(elem, {}).get(c, False)
            fill = "white" if over else color
            note = " (overloaded)" if over else ""
            out.append(f'<circle cx="{sx(c):.1f}" cy="{sy(v):.1f}" r="{4 if over else 3}" fill="{fill}" '
                       f'stroke="{color}" stroke-width="1.5">'
                       f'<title>{escape(elem)} {c} clients: {v:.4g}{note}</title></circle>')


def plot(rows, size, title, output):
    data = load(rows, size)
    if not data:
        sys.exit("no matrix rows with status ok" + (f" for size {size}" if size else ""))
    elems = columns([r for r in rows if r["mode"] in MATRIX_MODES])
    variants = [e for e in elems if is_rs(e) and e != "rs"]
    styles = {e: style(e, variants) for e in elems}

    def panel_key(p):
        transport, _, rate = p
        return (transport != "unix", rate)

    bands = sorted(data)
    ncols = max(len(data[sz]) for sz in bands)
    width = max(PANEL_W * ncols, 1000)
    per_row = max(1, (width - 40) // 220)
    # The columns, then the overloaded marker's note on a row of its own (it is long).
    legend_rows = math.ceil(len(elems) / per_row) + 1
    band_h = BAND_H + PANEL_H * len(METRICS)
    height = TITLE_H + band_h * len(bands) + LEGEND_ROW * legend_rows + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<text x="{width / 2:.1f}" y="42" text-anchor="middle" font-size="11">'
           f'median over repetitions, log-log; lower is better</text>']
    for b, sz in enumerate(bands):
        y0 = TITLE_H + b * band_h
        out.append(f'<text x="20" y="{y0 + 18}" font-size="14" font-weight="bold">'
                   f'{fmt_size(sz)} buffers</text>')
        panels = sorted(data[sz], key=panel_key)
        xr = log_range([c for p in panels for s in data[sz][p].values() for c in s])
        for col, panel in enumerate(panels):
            transport, p, _ = panel
            for row, (metric, label) in enumerate(METRICS):
                series = {e: data[sz][panel].get((e, metric), {}) for e in elems}
                overloaded = {e: data[sz][panel].get((e, "overloaded"), {}) for e in elems}
                panel_svg(out, col * PANEL_W, y0 + BAND_H + row * PANEL_H, series,
                          f"{transport}, {p}", label, xr, overloaded, styles)
    ly = TITLE_H + band_h * len(bands) + 14
    for i, elem in enumerate(elems + [None]):
        x = 20 + (i % per_row) * 220
        y = ly + (i // per_row) * LEGEND_ROW
        if elem is None:
            x, y = 20, ly + (legend_rows - 1) * LEGEND_ROW
            out.append(f'<circle cx="{x + 10}" cy="{y}" r="4" fill="white" stroke="#333" stroke-width="1.5"/>')
            out.append(f'<text x="{x + 20}" y="{y + 4}" font-size="12">overloaded: a client kicked, '
                       f'&lt;99% delivered or producer behind schedule</text>')
            continue
        color, dash, name = styles[elem]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 30}" y2="{y}" stroke="{color}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{x + 36}" y="{y + 4}" font-size="12">{escape(name)}</text>')
    out.append("</svg>")
    with open(output, "w") as f:
        f.write("\n".join(out) + "\n")
    npanels = sum(len(data[sz]) for sz in bands)
    print(f"wrote {output} ({npanels} panels; buffer sizes {', '.join(fmt_size(s) for s in bands)})")


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


def props_line(rows, elems):
    """Each variant's properties, from the CSV's rs_props."""
    out = []
    for e in elems:
        if not is_rs(e):
            continue
        props = {r.get("rs_props", "") for r in rows if r["element"] == e}
        text = "; ".join(sorted(p.replace(";", " ") for p in props if p))
        if text:
            out.append(f"`{e}`: {text}")
    return out


def markdown(rows):
    """Median tables (one per mode, transport, stream and size, one row per column and
    client count) and the sustain results, as Markdown, for docs/benchmark.md."""
    groups = defaultdict(list)
    sustain = [r for r in rows if r["mode"] == "sustain"]
    for row in rows:
        if row["mode"] in MATRIX_MODES + ("targets",):
            kind = "targets" if row["mode"] == "targets" else "matrix"
            groups[(kind, row["transport"], int(row["size"]), rate_value(row["bitrate"]),
                    pace(row))].append(row)

    keys = ["cpu_s_per_gb", "p99_ms", "push_p99_us", "gbit_s", "peak_rss_mb", "kicked",
            "lost", "delivered_ratio", "push_rate_ratio", "foreign_pct"]
    for k in sorted(groups, key=lambda k: (k[0] != "matrix", k[1] != "unix", k[2], -k[3])):
        kind, transport, size, _, p = k
        rs = groups[k]
        reps = max(int(r["rep"]) for r in rs) + 1
        elems = columns(rs)
        label = "" if kind == "matrix" else "targets: "
        print(f"\n#### {label}{transport}, {fmt_size(size)} buffers, {p} (median of {reps})\n")
        for line in props_line(rs, elems):
            print(f"- {line}")
        print("\n| clients | column | CPU s/GB | vs C | vs raw | p99 ms | vs C | push p99 µs "
              "| Gbit/s | peak RSS MB | other load | notes |")
        print("|---:|---|" + "---:|" * 9 + "---|")
        by_clients = defaultdict(lambda: defaultdict(list))
        for r in rs:
            by_clients[int(r["clients"])][r["element"]].append(r)
        for clients in sorted(by_clients):
            e = by_clients[clients]
            m = {el: {kk: med(e[el], kk) for kk in keys} for el in e}
            get = lambda el, kk: m.get(el, {}).get(kk, float("nan"))
            for el in [x for x in elems if x in m]:
                bad = []
                if get(el, "kicked") > 0:
                    bad.append(f"{get(el, 'kicked'):.0f} kicked")
                if get(el, "lost") > 0:
                    bad.append(f"{get(el, 'lost'):.0f} lost")
                if get(el, "delivered_ratio") < 0.99:
                    bad.append(f"{get(el, 'delivered_ratio') * 100:.0f}% delivered")
                if get(el, "push_rate_ratio") < 0.97:
                    bad.append(f"producer at {get(el, 'push_rate_ratio') * 100:.0f}% of the rate")
                failed = sum(1 for r in e[el] if r["status"] != "ok")
                if failed:
                    bad.append(f"{failed} runs failed")
                vs = lambda kk, other: ratio(get(el, kk), get(other, kk)) if is_rs(el) else ""
                print(f"| {clients} | {el} | {num(get(el, 'cpu_s_per_gb'))} | {vs('cpu_s_per_gb', 'c')} "
                      f"| {vs('cpu_s_per_gb', 'raw')} | {num(get(el, 'p99_ms'))} | {vs('p99_ms', 'c')} "
                      f"| {num(get(el, 'push_p99_us'))} | {num(get(el, 'gbit_s'))} "
                      f"| {num(get(el, 'peak_rss_mb'))} | {get(el, 'foreign_pct'):.0f}% "
                      f"| {', '.join(bad)} |")
    if sustain:
        print("\n#### Highest client count sustained without a kick\n")
        elems = columns(sustain)
        rs_cols = [e for e in elems if is_rs(e)]
        ratios = rs_cols if "c" in elems else []
        print("| transport | bitrate | buffer | " + " | ".join(elems)
              + "".join(f" | {e}/C" for e in ratios) + " |")
        print("|---|---:|---:|" + "---:|" * (len(elems) + len(ratios)))
        cases = sorted({(r["transport"], r["bitrate"], r["size"]) for r in sustain},
                       key=lambda c: (c[0] != "unix", rate_value(c[1]), int(c[2])))
        for t, b, sz in cases:
            vals = {}
            cells = []
            for el in elems:
                found = [r for r in sustain
                         if (r["transport"], r["bitrate"], r["size"], r["element"]) == (t, b, sz, el)]
                if not found:
                    cells.append("-")
                    continue
                n = statistics.median(int(r["clients"]) for r in found)
                capped = any(r["status"] == "capped" for r in found)
                vals[el] = n
                cells.append(f"{'≥ ' if capped else ''}{n:.0f}")
            line = f"| {t} | {b}bit/s | {fmt_size(int(sz))} | " + " | ".join(cells) + " |"
            for e in ratios:
                line += f" {ratio(vals.get(e, float('nan')), vals.get('c', float('nan')))} |"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="one or more CSV files of the benchmark")
    ap.add_argument("-o", "--output", default="benchmark.svg")
    ap.add_argument("--size", type=int, default=None,
                    help="plot only this buffer size (default: one band of panels per size)")
    ap.add_argument("--title", default="fanout-bench: rsmultifdsink vs multifdsink")
    ap.add_argument("--markdown", action="store_true",
                    help="print the median tables (and sustain results) as Markdown; "
                         "with no -o given, write no plot")
    args = ap.parse_args()
    rows = [row for path in args.csv for row in read(path)]
    if args.markdown:
        markdown(rows)
        if "-o" not in sys.argv and "--output" not in sys.argv:
            return
    plot(rows, args.size, args.title, args.output)


if __name__ == "__main__":
    main()
