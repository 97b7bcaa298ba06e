"""bench/realedits.py: a shard cut short (--progress) and continued with --resume gives the rows a
whole run gives, without running the records it already holds again; on the embedded model."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "import os\n\n\ndef add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
INSERTED = "def mul(a, b):\n    return a * b\n\n\n"


def _record(name: str) -> dict:
    after = BEFORE.replace("def sub", INSERTED + "def sub")
    edit = {"range": {"start": {"line": 7, "character": 0}, "end": {"line": 7, "character": 0}}, "text": INSERTED}
    targets = [{"line": line, "prefix": "    ", "expected": expected, "where": where}
               for line, expected, where in ((8, "return a * b", "at_edit"), (12, "return a - b", "below"))]
    return {"id": f"example/repo@abc1234:{name}.py", "repo": "example/repo", "path": f"{name}.py", "kind": "insert",
            "before": BEFORE, "after": after, "edits": [edit], "targets": targets}


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "realedits.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _key(row: dict) -> tuple:
    return row["id"], row["where"], row["method"], row["view"], row["pred"]


def test_a_resumed_run_adds_the_records_a_cut_short_one_left(tmp_path):
    data = tmp_path / "edits.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for name in ("ops", "more", "last"):
            f.write(json.dumps(_record(name)) + "\n")
    common = ["--data", str(data), "--views", "l2r", "--methods", "full,pie", "--max-tokens", "8"]
    whole = tmp_path / "whole.json"
    _run(*common, "--json", str(whole))
    part = tmp_path / "part.json"
    _run(*common, "--limit", "2", "--progress", "--json", str(part))  # one record of three
    first = json.loads(part.read_text())["rows"]
    assert {row["id"] for row in first} == {"example/repo@abc1234:ops.py"}
    out = _run(*common, "--progress", "--resume", "--json", str(part)).stdout
    progress = [line for line in out.splitlines() if line.startswith("  ") and " targets, " in line]
    assert len(progress) == 2  # the two records left, not the first again
    resumed = json.loads(part.read_text())
    rows = json.loads(whole.read_text())["rows"]
    assert resumed["partial"] is False and resumed["n_targets"] == 6
    assert resumed["rows"][: len(first)] == first
    assert sorted(map(_key, resumed["rows"])) == sorted(map(_key, rows))
