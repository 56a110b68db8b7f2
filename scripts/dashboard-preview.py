#!/usr/bin/env python3
"""Renders deploy/grafana/cellgate.json's panels as one HTML page of SVG
charts, from a live Prometheus (its HTTP API), laid out as Grafana lays out
the dashboard (gridPos). Used by scripts/dashboard-screenshot.sh for the
screenshot in docs/metrics.md: Grafana itself is not in the registries this
project builds from, so this shows the dashboard's own queries on real data.

  scripts/dashboard-preview.py --prometheus http://127.0.0.1:9090 \
      --minutes 3 --out /tmp/preview.html
"""
import argparse
import html
import json
import re
import sys
import time
import urllib.parse
import urllib.request

COLOURS = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1",
           "#ba43a9", "#705da0", "#508642", "#cca300", "#447ebc", "#c15c17"]
CELL_W, ROW_H = 64, 34  # pixels per grid unit (24 columns wide)


def query_range(prom, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{q}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"prometheus refused {expr!r}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def fmt_value(v, unit):
    if unit == "percentunit":
        return f"{v * 100:.1f}%"
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "reqps":
        return f"{v:.0f}/s" if abs(v) >= 10 else f"{v:.2f}/s"
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2f}"


def chart(panel, series, start, end, w, h):
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    pad_l, pad_r, pad_t, pad_b = 64, 12, 30, 22
    legend_rows = min(len(series), 6)
    plot_h = h - pad_t - pad_b - 16 * ((legend_rows + 1) // 2)
    plot_w = w - pad_l - pad_r
    values = [v for _, pts in series for _, v in pts]
    lo, hi = (min(values + [0.0]), max(values + [0.0])) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        hi = lo + 1
    out = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">',
           f'<rect width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>',
           f'<text x="10" y="19" fill="#d8d9da" font-size="13" font-weight="600">{html.escape(panel["title"])}</text>']
    for i in range(5):
        y = pad_t + plot_h - plot_h * i / 4
        val = lo + (hi - lo) * i / 4
        out.append(f'<line x1="{pad_l}" x2="{w - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>')
        out.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" fill="#8e8e8e" font-size="10" text-anchor="end">{fmt_value(val, unit)}</text>')
    for i in range(4):
        t = start + (end - start) * i / 3
        x = pad_l + plot_w * i / 3
        out.append(f'<text x="{x:.1f}" y="{pad_t + plot_h + 14}" fill="#8e8e8e" font-size="10" text-anchor="middle">{time.strftime("%H:%M:%S", time.gmtime(t))}</text>')
    for n, (name, pts) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        path = " ".join(
            f'{"M" if k == 0 else "L"}{pad_l + plot_w * (t - start) / (end - start):.1f},{pad_t + plot_h - plot_h * (v - lo) / (hi - lo):.1f}'
            for k, (t, v) in enumerate(pts))
        if path:
            out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if n < 12:
            lx = 10 + (n % 2) * (w // 2)
            ly = pad_t + plot_h + 30 + 16 * (n // 2)
            if ly < h - 4:
                out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{colour}"/>')
                out.append(f'<text x="{lx + 14}" y="{ly - 3}" fill="#c7d0d9" font-size="10">{html.escape(name[:60])}</text>')
    if not series:
        out.append(f'<text x="{w / 2}" y="{pad_t + plot_h / 2}" fill="#8e8e8e" font-size="12" text-anchor="middle">No data</text>')
    out.append("</svg>")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dashboard", default="deploy/grafana/cellgate.json")
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL (loopback)")
    ap.add_argument("--minutes", type=float, default=3.0, help="time range to show, ending now")
    ap.add_argument("--rate-interval", default="10s", help="what $__rate_interval stands for")
    ap.add_argument("--out", required=True, help="HTML file to write")
    a = ap.parse_args()
    dash = json.load(open(a.dashboard))
    end = time.time()
    start = end - a.minutes * 60
    step = max(1, int(a.minutes * 60 / 120))
    cells = []
    for p in dash["panels"]:
        g = p["gridPos"]
        w, h = g["w"] * CELL_W - 8, g["h"] * ROW_H - 8
        series = []
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", a.rate_interval).replace('"$cell"', '".*"')
            for r in query_range(a.prometheus, expr, start, end, step):
                pts = [(float(ts), float(v)) for ts, v in r["values"] if v not in ("NaN", "+Inf", "-Inf")]
                series.append((legend(t.get("legendFormat", ""), r["metric"]), pts))
        series.sort(key=lambda s: s[0])
        cells.append(f'<div style="position:absolute;left:{g["x"] * CELL_W + 4}px;top:{g["y"] * ROW_H + 52}px">{chart(p, series, start, end, w, h)}</div>')
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"]) * ROW_H + 60
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(dash["title"])}</title></head>'
            f'<body style="margin:0;background:#111217;font-family:Inter,Helvetica,Arial,sans-serif;width:{24 * CELL_W + 8}px;height:{height}px;position:relative">'
            f'<div style="position:absolute;left:12px;top:12px;color:#d8d9da;font-size:18px">{html.escape(dash["title"])} '
            f'<span style="color:#8e8e8e;font-size:12px">— deploy/grafana/cellgate.json, last {a.minutes:g} min, cell = All</span></div>'
            + "".join(cells) + "</body></html>")
    open(a.out, "w").write(page)
    print(f"wrote {a.out} ({len(dash['panels'])} panels)", file=sys.stderr)


if __name__ == "__main__":
    main()
