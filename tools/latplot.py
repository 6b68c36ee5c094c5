#!/usr/bin/env python3
"""Latency-by-percentile plots, HdrHistogram style, written as SVG with no dependency.

    python3 tools/latplot.py [--logy] OUT.svg "TITLE" LABEL=RUN.json [LABEL=RUN.json ...]

Each RUN.json is the one JSON line `tools/loadgen` prints (fanout, floor, rest); its `lat_dist`
is the curve: `[[percentile, microseconds], ...]`. The x axis is 1/(1-p) on a log scale (0 %,
90 %, 99 %, 99.9 %, ... equally spaced), the y axis is the latency (linear, from 0). The
maximum (percentile 100) is marked with a dot at the right end of each curve; curves whose
label contains "floor" are dashed. A run without
`lat_dist` (an older loadgen) or with `"ok": false` is reported and skipped.
With --logy (or when the curves' medians differ more than 20-fold, e.g. a floor that could not
keep up) the y axis is logarithmic. `tools/plots.sh` runs the fan-out scenarios and calls this
for each.
"""

import json
import math
import sys

COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
DASHES = ["", "6,3", "2,3", "8,3,2,3"]
W, H = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def x_of(p):
    """log10(1 / (1 - p)): 0 at p = 0, 1 at 90 %, 2 at 99 %, ..."""
    return -math.log10(max(1e-12, 1.0 - p / 100.0))


def fmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def nice_step(span, target=6):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def load(spec):
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"argument {spec!r}: expected LABEL=FILE.json")
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip().startswith("{")]
    if not lines:
        print(f"latplot: {path}: no JSON line, skipped", file=sys.stderr)
        return None
    run = json.loads(lines[-1])
    dist = run.get("lat_dist")
    if run.get("ok") is False or not dist:
        print(f"latplot: {path}: no lat_dist (failed run or old loadgen), skipped", file=sys.stderr)
        return None
    pts = [(float(p), float(us)) for p, us in dist if float(p) < 100.0]
    mx = next((float(us) for p, us in dist if float(p) >= 100.0), pts[-1][1] if pts else 0.0)
    return label, pts, mx, run


def plot(out, title, series, logy=False):
    xmax = max(x_of(p) for _, pts, _, _ in series for p, _ in pts)
    xmax = max(1.0, math.ceil(xmax - 1e-9))
    ymax_us = max(max(us for _, us in pts) for _, pts, _, _ in series)
    # The y axis ends a little above the highest curve point (the maxima may be far above;
    # they are drawn clipped at the top with their value written next to them).
    ms = ymax_us >= 2000
    unit, div = ("ms", 1000.0) if ms else ("µs", 1.0)
    top = ymax_us / div * 1.08
    step = nice_step(top)
    top = math.ceil(top / step) * step
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    medians = [next((us for p, us in pts if p >= 50), 0) for _, pts, _, _ in series]
    if min(medians) > 0 and max(medians) / min(medians) > 20:
        logy = True
    lo = 0.0
    if logy:
        ymin_us = min(us for _, pts, _, _ in series for _, us in pts if us > 0)
        lo = math.floor(math.log10(max(ymin_us / div, 1e-3)))
        top = 10 ** math.ceil(math.log10(ymax_us / div * 1.08))

    def sx(x):
        return LEFT + pw * x / xmax

    def sy(v):
        v = min(v / div, top)
        if logy:
            f = (math.log10(max(v, 10 ** lo)) - lo) / (math.log10(top) - lo)
            return TOP + ph * (1 - f)
        return TOP + ph * (1 - v / top)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{esc(title)}</text>']
    # Grid and axes.
    for d in range(int(xmax) + 1):
        x = sx(d)
        label = f"{100 * (1 - 10.0 ** -d):.{max(0, d - 2)}f}%"
        o.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#ddd"/>')
        o.append(f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">{label}</text>')
    ticks = []
    if logy:
        e = lo
        while 10 ** e <= top * 1.0001:
            ticks.append(10 ** e)
            e += 1
    else:
        v = 0.0
        while v <= top + 1e-9:
            ticks.append(v)
            v += step
    for v in ticks:
        y = sy(v * div)
        o.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        o.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    o.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    o.append(f'<text x="{LEFT + pw / 2}" y="{H - 22}" text-anchor="middle">percentile '
             '(log scale of 1/(1-p))</text>')
    o.append(f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {TOP + ph / 2})">latency ({unit}{", log scale" if logy else ""})</text>')
    # Curves, with a white box behind the legend so that curves under it stay readable.
    o.append(f'<rect x="{LEFT + 4}" y="{TOP + 3}" width="{pw * 0.62:.0f}" height="{16 * len(series) + 6}" '
             'fill="white" fill-opacity="0.8" stroke="#ccc"/>')
    legends = []
    for i, (label, pts, mx, run) in enumerate(series):
        c, dash = COLOURS[i % len(COLOURS)], DASHES[(i // len(COLOURS)) % len(DASHES)]
        if "floor" in label and not dash:
            dash = "6,3"  # floors dashed, servers solid
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x_of(p)):.1f},{sy(us):.1f}"
                        for j, (p, us) in enumerate(pts))
        da = f' stroke-dasharray="{dash}"' if dash else ""
        o.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="1.8"{da}/>')
        lx, ly = sx(x_of(pts[-1][0])), sy(mx)
        o.append(f'<circle cx="{lx:.1f}" cy="{ly:.1f}" r="3" fill="{c}"/>')
        p50 = next((us for p, us in pts if p >= 50), 0)
        p99 = next((us for p, us in pts if p >= 99), pts[-1][1])
        n = run.get("lat_count", "?")
        legend = (f"{label}: p50 {fmt(p50 / div)} p99 {fmt(p99 / div)} max {fmt(mx / div)} {unit}"
                  f" (n={n})")
        ly2 = TOP + 16 + 16 * i
        legends.append(f'<line x1="{LEFT + 10}" y1="{ly2 - 4}" x2="{LEFT + 34}" y2="{ly2 - 4}" '
                       f'stroke="{c}" stroke-width="2"{da}/>')
        legends.append(f'<text x="{LEFT + 40}" y="{ly2}">{esc(legend)}</text>')
    # The legend box goes above the curves, its text above the box.
    box = next(j for j, line in enumerate(o) if line.startswith(f'<rect x="{LEFT + 4}"'))
    o.append(o.pop(box))
    o.extend(legends)
    o.append("</svg>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(o) + "\n")


def main(argv):
    logy = len(argv) > 1 and argv[1] == "--logy"
    if logy:
        argv = argv[:1] + argv[2:]
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    out, title = argv[1], argv[2]
    series = [s for s in (load(a) for a in argv[3:]) if s and s[1]]
    if not series:
        print(f"latplot: nothing to plot for {out}", file=sys.stderr)
        return 1
    plot(out, title, series, logy)
    print(f"latplot: wrote {out} ({len(series)} curves)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
