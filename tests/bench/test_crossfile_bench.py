"""bench/crossfile.py on the embedded model: one record whose file imports another, every kind of
method through the real views (the context file an open document, its cache reused by blend)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ("def scale_points(points, factor):\n    return [(x * factor, y * factor) for x, y in points]\n\n\n"
           "def total_length(points):\n    return sum(abs(x) + abs(y) for x, y in points)\n")
AFTER = ("from helpers import scale_points, total_length\n\n\ndef report(points):\n"
         "    bigger = scale_points(points, 2)\n    return total_length(bigger)\n\n\n"
         "def main():\n    print(report([(1, 2), (3, 4)]))\n")


def _write(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    rid = "example/repo@abc1234:report.py"
    record = {"id": rid, "repo": "example/repo", "path": "report.py", "kind": "modify", "before": AFTER,
              "after": AFTER, "edits": [], "targets": [{"line": 5, "prefix": "    ",
                                                         "expected": "return total_length(bigger)"}]}
    companion = {"id": rid, "context": [{"path": "helpers.py", "blob": "b1"}], "targets": [],
                 "xfile_targets": [{"line": 4, "prefix": "    ", "expected": "bigger = scale_points(points, 2)",
                                    "names": ["scale_points"]}]}
    data = ["--data", str(_write(tmp_path / "d.jsonl.gz", [record])),
            "--crossfile", str(_write(tmp_path / "c.jsonl.gz", [companion])),
            "--blobs", str(_write(tmp_path / "b.jsonl.gz", [{"blob": "b1", "text": HELPERS}]))]
    return subprocess.run([sys.executable, str(ROOT / "bench" / "crossfile.py"), *data, *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_every_kind_of_method_runs_and_counts_its_tokens(tmp_path):
    out = tmp_path / "r.json"
    methods = "none,exact,ring,blend_r15,blend_r15_p0,blend_r15_s0"
    proc = _run(tmp_path, "--views", "fim,l2r", "--methods", methods, "--max-tokens", "6", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["set"], r["view"], r["method"]): r for r in rows}
    assert len(rows) == len(got) == 2 * 2 * 6  # two targets (xfile, ordinary), two views, six methods
    for (tset, view, method), r in got.items():
        if method == "none":
            assert r["context_tokens"] == 0
        else:  # the helper file is read as context by every other method
            assert r["context_tokens"] > 0, (tset, view, method)
        if method.startswith("blend"):  # reused, not prefilled: fewer tokens than exact prefill
            assert r["recomputed"] < got[(tset, view, "exact")]["recomputed"]
    for tset in ("xfile", "ordinary"):
        fim = {m: got[(tset, "fim", m)]["recomputed"] for m in ("blend_r15", "blend_r15_p0", "blend_r15_s0")}
        # the FIM view re-encodes the document's tokens before the cursor with the block (p0: none of
        # them); cutting the cached suffix re-encodes nothing more
        assert fim["blend_r15"] > fim["blend_r15_p0"] and fim["blend_r15_s0"] == fim["blend_r15"]
        l2r = {m: got[(tset, "l2r", m)]["recomputed"] for m in ("blend_r15", "blend_r15_p0", "blend_r15_s0")}
        assert len(set(l2r.values())) == 1  # the left-to-right view re-encodes none of them


def test_a_misspelt_method_fails_before_the_model_loads(tmp_path):
    proc = _run(tmp_path, "--methods", "none,nonee")
    assert proc.returncode != 0 and "unknown method 'nonee'" in proc.stderr
