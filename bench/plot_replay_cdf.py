"""Keystroke -> answer latency CDFs from bench/lsp_replay.py's JSON, one line per method, as SVG.

Per pace: the fraction of answered keystrokes (shown or empty) whose answer came within x ms,
x on a log scale; the legend gives each method's answered / all keystrokes (a CDF of answered
requests alone hides the dropped ones). No plotting library needed.

    python bench/plot_replay_cdf.py replay.json bench/replay_cdf_cpu.svg [--pace human] [--title TEXT]
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import math
from pathlib import Path

COLORS = ["#2b6cb0", "#dd8a3a", "#38a169", "#a0a0a0", "#805ad5"]
ANSWERED = ("shown", "empty")


def cdf_points(latencies: list[float]) -> list[tuple[float, float]]:
    """(latency, fraction of the list at or below it), one point per distinct latency."""
    xs = sorted(latencies)
    out: list[tuple[float, float]] = []
    for i, x in enumerate(xs):
        if out and out[-1][0] == x:
            out.pop()
        out.append((x, (i + 1) / len(xs)))
    return out


def svg(series: list[tuple[str, list[float], int]], title: str) -> str:
    """`series`: (label, answered latencies in ms, keystrokes in all) per method."""
    width, height, left, right, top, bottom = 640, 400, 60, 20, 40, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    every = [x for _, xs, _ in series for x in xs]
    lo = 10 ** math.floor(math.log10(max(1.0, min(every)))) if every else 1.0
    hi = 10 ** math.ceil(math.log10(max(every))) if every else 10.0

    def px(ms: float) -> float:
        return left + plot_w * (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    def py(frac: float) -> float:
        return top + plot_h * (1 - frac)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{left}" y="20" font-size="13">{html.escape(title)}</text>']
    decade = lo
    while decade <= hi:
        out.append(f'<line x1="{px(decade):.1f}" x2="{px(decade):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#ddd"/>')
        out.append(f'<text x="{px(decade):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{decade:g} ms</text>')
        decade *= 10
    for frac in (0.0, 0.5, 0.95, 1.0):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(frac):.1f}" y2="{py(frac):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(frac) + 4:.1f}" text-anchor="end">{frac:g}</text>')
    for i, (label, xs, total) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = cdf_points(xs)
        path, last = [], 0.0
        for x, f in points:  # a step function
            path.append(f"{px(x):.1f},{py(last):.1f} {px(x):.1f},{py(f):.1f}")
            last = f
        if path:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(path)}"/>')
        y = height - bottom + 34 + 14 * i
        out.append(f'<rect x="{left}" y="{y - 9}" width="12" height="10" fill="{color}"/>')
        legend = html.escape(f"{label}: {len(xs)} of {total} keystrokes answered")
        out.append(f'<text x="{left + 18}" y="{y}">{legend}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--pace", default="human")
    p.add_argument("--title", default=None)
    args = p.parse_args()
    raw = args.json.read_bytes()
    result = json.loads(gzip.decompress(raw) if args.json.suffix == ".gz" else raw)  # results are kept gzipped
    series = []
    for method in result["methods"]:
        rows = [k for k in result["keys"] if k["pace"] == args.pace and k["method"] == method]
        answered = [k["latency_ms"] for k in rows if k["outcome"] in ANSWERED and k["latency_ms"] is not None]
        series.append((method, answered, len(rows)))
    title = args.title or f"keystroke -> answer, pace {args.pace}: {result['machine']}"
    args.out.write_text(svg(series, title))


if __name__ == "__main__":
    main()
