"""bench/adadec.py realedits: shards write per-target rows (a partial file after each target with
--progress) and --merge summarizes the shards' rows together, on the embedded model."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AFTER = ("import os\n\n\ndef add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
         "def mul(a, b):\n    return a * b\n")
RECORD = {"id": "example/repo@abc1234:ops.py", "repo": "example/repo", "path": "ops.py", "after": AFTER,
          "targets": [{"line": line, "prefix": "    ", "expected": expected}
                      for line, expected in ((4, "return a + b"), (8, "return a - b"), (12, "return a * b"))]}


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adadec.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_shards_merge_into_the_whole_runs_summary(tmp_path):
    data = tmp_path / "edits.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write(json.dumps(RECORD) + "\n")
    common = ["realedits", "--data", str(data), "--subset", "3", "--views", "fim", "--beams", "0",
              "--max-tokens", "8"]
    whole = tmp_path / "whole.json"
    _run(*common, "--json", str(whole))
    parts = [tmp_path / f"part{i}.json" for i in range(2)]
    for i, part in enumerate(parts):
        _run(*common, "--shard", f"{i}/2", "--progress", "--json", str(part))
    rows = json.loads(whole.read_text())["rows"]
    shard_rows = [row for part in parts for row in json.loads(part.read_text())["rows"]]
    assert json.loads(parts[0].read_text())["partial"] is False
    assert sorted(r["target"] for r in shard_rows) == sorted(r["target"] for r in rows)
    def by_target(rs):
        return [(r["text"], r["em"]) for r in sorted(rs, key=lambda r: (r["method"], r["target"]))]

    assert by_target(shard_rows) == by_target(rows)
    merged = _run("realedits", "--merge", *map(str, parts)).stdout
    assert "realedits, fim view, 3 targets" in merged and "| greedy | 3 |" in merged and "| adadec 2x2 | 3 |" in merged
