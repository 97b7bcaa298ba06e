"""Plot bench/latency_gpu.py's JSON as an SVG bar chart (no plotting library needed).

Per (model, context): keystroke-to-16-token p50 of editkv and of the transformers baselines,
on a log scale.

    python bench/plot_latency.py bench/results_latency_h100.json bench/latency_h100.svg
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SERIES = [("total_p50", "editkv", "#2b6cb0"), ("transformers_lookup_p50", "transformers + prompt lookup", "#dd8a3a"),
          ("transformers_p50", "transformers", "#a0a0a0")]


def svg(results: list[dict], title: str) -> str:
    width, height, left, bottom, top = 60 + 70 * len(results), 420, 60, 90, 40
    plot_h = height - bottom - top
    lo, hi = 1.0, 10 ** math.ceil(math.log10(max(r[k] for r in results for k, _, _ in SERIES)))

    def y(ms: float) -> float:
        return top + plot_h * (1 - (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{left}" y="20" font-size="13">{title}</text>']
    decade = lo
    while decade <= hi:
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(decade):.1f}" y2="{y(decade):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(decade) + 4:.1f}" text-anchor="end">{decade:g} ms</text>')
        decade *= 10
    for i, r in enumerate(results):
        x0 = left + 10 + 70 * i
        for j, (key, _, color) in enumerate(SERIES):
            top_y = y(r[key])
            out.append(f'<rect x="{x0 + 18 * j}" y="{top_y:.1f}" width="16" height="{top + plot_h - top_y:.1f}" '
                       f'fill="{color}"><title>{r[key]:.1f} ms</title></rect>')
        label = f'{r["model"]} {r["context"] // 1000}k'
        out.append(f'<text transform="translate({x0 + 27},{top + plot_h + 10}) rotate(40)">{label}</text>')
    for j, (_, name, color) in enumerate(SERIES):
        out.append(f'<rect x="{left + 200 * j}" y="{height - 18}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{left + 200 * j + 14}" y="{height - 9}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(source.read_text())
    target.write_text(svg(data["results"], f"Keystroke to 16-token suggestion, p50 ({data['machine']})"))


if __name__ == "__main__":
    main()
