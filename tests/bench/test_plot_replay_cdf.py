"""The latency CDF plot's steps."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from plot_replay_cdf import cdf_points, svg  # noqa: E402


def test_cdf_steps_once_per_distinct_latency():
    assert cdf_points([30.0, 10.0, 10.0, 20.0]) == [(10.0, 0.5), (20.0, 0.75), (30.0, 1.0)]
    assert cdf_points([]) == []


def test_svg_has_a_line_and_a_legend_per_method():
    out = svg([("default", [12.0, 40.0], 3), ("llama & co", [300.0], 3)], "a <title>")
    assert out.count("<polyline") == 2
    assert "2 of 3 keystrokes answered" in out and "llama &amp; co" in out and "a &lt;title&gt;" in out
