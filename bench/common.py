"""Shared pieces of the bench/ scripts: arguments, realedits records, metrics, tables.

Every script takes `--data PATH` (default ../shared/realedits/dev.jsonl.gz), `--limit N`,
`--model`, `--device` and `--json FILE`, prints a table with the baseline and ours side by
side, measured in the same run, and can write machine-readable results.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "realedits" / "dev.jsonl.gz"


def shard_arg(value: str) -> tuple[int, int]:
    """argparse type of --shard I/N: every N-th target from the I-th."""
    i, n = (int(x) for x in value.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard must be I/N with 0 <= I < N, got {value}")
    return i, n


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every bench script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="realedits .jsonl.gz (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use at most N records/targets")
    p.add_argument("--model", default=None, help="model folder, .gguf or hub id (default: embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (default: cpu)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON to this file")
    return p


def load_records(
    path: Path, limit: int | None = None, max_file_chars: int | None = None, min_file_chars: int | None = None
) -> list[dict]:
    """realedits records in file order, optionally only those whose files are small (or large)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if max_file_chars and max(len(rec["before"]), len(rec["after"])) > max_file_chars:
                continue
            if min_file_chars and max(len(rec["before"]), len(rec["after"])) <= min_file_chars:
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def iter_targets(records: list[dict], limit: int | None = None) -> Iterator[tuple[dict, dict]]:
    """(record, target) pairs, at most `limit`."""
    n = 0
    for rec in records:
        for target in rec["targets"]:
            if limit is not None and n >= limit:
                return
            yield rec, target
            n += 1


def target_span(text: str, target: dict) -> tuple[int, int]:
    """(cursor, end of the line's text) in str offsets for a realedits target of `text`: the cursor
    after the target's `prefix` (its indentation) on line `line`."""
    from editkv.edit_cache.positions import line_starts

    starts = line_starts(text)
    line_start = starts[target["line"]]
    line_end = starts[target["line"] + 1] if target["line"] + 1 < len(starts) else len(text)
    body = text[line_start:line_end].rstrip("\r\n")
    assert body.startswith(target["prefix"]), "target prefix does not match the text"
    return line_start + len(target["prefix"]), line_start + len(body)


def next_line_start(text: str, cursor: int) -> int:
    """Where the line after the cursor's starts (len(text) on the last line): a FIM suffix's start."""
    for term in ("\r\n", "\n", "\r"):
        i = text.find(term, cursor)
        if i >= 0:
            return i + len(term)
    return len(text)


def spread(pairs: list, subset: int | None, offset: int = 0) -> list:
    """A fixed subset of `subset` items spread evenly over `pairs` (every len/N-th from `offset`)."""
    if not subset:
        return list(pairs)
    step = max(1, len(pairs) // subset)
    return list(pairs)[offset::step][:subset]


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings (insert, delete, substitute cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def exact_match(pred: str, expected: str) -> float:
    """1.0 when the predicted line equals the expected line (trailing whitespace ignored)."""
    return float(pred.rstrip() == expected.rstrip())


def edit_similarity(pred: str, expected: str) -> float:
    """1 - Levenshtein distance / longer length, in [0, 1]."""
    pred, expected = pred.rstrip(), expected.rstrip()
    longest = max(len(pred), len(expected))
    return 1.0 if longest == 0 else 1.0 - levenshtein(pred, expected) / longest


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A GitHub-markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def machine(device: str) -> str:
    """A one-line description of where the run happened."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write_json(path: Path | None, payload: dict) -> None:
    """Write results (with the time and the command line) if a path was given."""
    if path is None:
        return
    payload = {"command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a run killed mid-write leaves the last whole file
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def sync(device) -> None:
    """Wait for queued GPU work so host timers measure it."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def shard_flags(p: argparse.ArgumentParser, unit: str = "target", resume: bool = False) -> None:
    """--shard I/N, --merge JSON..., --progress: a bench run in parallel shards (`run_or_merge`)."""
    p.add_argument("--shard", type=shard_arg, default=(0, 1), metavar="I/N",
                   help=f"only every N-th {unit} from the I-th (parallel runs; --merge their JSON)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the summary of these runs' --json files together (no model is run)")
    p.add_argument("--progress", action="store_true",
                   help=f"print progress, and keep a partial --json after each {unit} (what a run cut short leaves)")
    if resume:  # (a bench whose run() starts from `resumed_rows`)
        p.add_argument("--resume", action="store_true",
                       help="with --progress: start from the rows an earlier run cut short left in --json")


def resumed_rows(args, key: str = "id") -> tuple[list[dict], set]:
    """The rows a cut-short run left in `args.json` (`--resume`) and the `key` values they cover; a
    partial JSON is written after whole records only, so a record with any row there is done."""
    if not args.resume or args.json is None or not args.json.exists():
        return [], set()
    rows = json.loads(args.json.read_text())["rows"]
    return rows, {row[key] for row in rows}


def merge_rows(runs: list[dict]) -> dict:
    """Shards of one run as one result: the first shard's fields, every shard's rows."""
    return {**runs[0], "rows": [row for r in runs for row in r["rows"]],
            "n_targets": sum(r.get("n_targets", 0) for r in runs)}


def run_or_merge(args, run, summarize, headline, merge=merge_rows) -> None:  # noqa: ANN001
    """The end of a sharded bench's main(): with --merge, print the summary of those runs' JSON
    together (no model is run); else run, print `headline(result)` and the summary, write --json."""
    if args.merge:
        print(summarize(merge([json.loads(f.read_text()) for f in args.merge])))
        return
    import torch

    torch.manual_seed(0)
    result = run(args)
    print(headline(result))
    print(summarize(result))
    write_json(args.json, result)
