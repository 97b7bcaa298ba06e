"""bench/lsp_replay.py: its scoring, record selection and method parsing, and smoke runs over a real
`editkv lsp` (the fake engine, and a tiny model); counts must add up, timings are never asserted."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from editkv.lsp_server.replay import editor_session  # noqa: E402
from lsp_replay import (  # noqa: E402
    KeyRow,
    LineRow,
    bucket_of,
    chars_saved,
    continues,
    dropdown_score,
    parse_methods,
    position_of,
    score_line,
    select_cases,
    summarize,
    summarize_hop,
    summarize_served,
    summarize_slow,
)

BEFORE = "import os\n\n\ndef main():\n    print(os.getcwd())\n    return 0\n"


def _edit(line, col, text):
    return {"range": {"start": {"line": line, "character": col}, "end": {"line": line, "character": col}},
            "text": text}


# bottom to top, insertions only (the document only grows): two hunks, 86 keystrokes, four scored lines
RECORD = {"id": "example/repo@abc1234:tool.py", "repo": "example/repo", "path": "tool.py", "before": BEFORE,
          "edits": [_edit(5, 0, "    for name in os.listdir():\n        print(name)\n\n    # done\n"),
                    _edit(3, 0, "def helper(x):\n    return x * 2\n\n\n")]}


def test_chars_saved_is_the_longest_right_prefix():
    assert chars_saved("return x + 1", "return x * 2") == len("return x ")
    assert chars_saved("", "return") == 0
    assert chars_saved("return x", "return x * 2") == len("return x")  # a right but short suggestion
    assert chars_saved("foo", "bar") == 0


def test_score_line_takes_the_suggestion_first_line_against_the_typed_rest():
    s = score_line("return x * 2\n    y = 3", "return x * 2  ")
    assert (s.em, s.es, s.saved) == (1.0, 1.0, len("return x * 2"))
    s = score_line("return x + 2", "return x * 2")
    assert s.em == 0.0 and s.es == pytest.approx(1 - 1 / 12) and s.saved == len("return x ")
    s = score_line("", "pass")
    assert (s.em, s.es, s.saved) == (0.0, 0.0, 0)


def test_a_dropdown_item_is_scored_as_applied_to_the_line():
    """editkv's items replace the word before the cursor with the word plus the draft: the text the
    user gets is the line with that range replaced, not the new text inserted at the cursor."""
    text = "def f(x):\n    ret\n"
    cursor = {"line": 1, "character": 7}  # after "ret"
    word = {"range": {"start": {"line": 1, "character": 4}, "end": cursor}}
    item = {"label": "return x + 1", "insertText": "wrong", "textEdit": {**word, "newText": "return x + 1"}}
    first, s = dropdown_score(item, text, cursor, "urn x + 1")
    assert first == "return x + 1" and (s.em, s.es, s.saved) == (1.0, 1.0, len("urn x + 1"))
    first, s = dropdown_score(item, text, cursor, "urn y")  # saved: only what is right past the cursor
    assert first == "return x + 1" and s.em == 0.0 and s.saved == len("urn ")
    # an InsertReplaceEdit is applied over its insert range
    replace_edit = {"textEdit": {"insert": word["range"], "replace": word["range"], "newText": "return x + 1\n  y"},
                    "label": "r"}
    assert dropdown_score(replace_edit, text, cursor, "urn x + 1")[1].em == 1.0
    # no textEdit: insertText goes in at the cursor, scored as the inline ghost text is
    first, s = dropdown_score({"label": "r", "insertText": "urn x + 1"}, text, cursor, "urn x + 1")
    assert first == "urn x + 1" and (s.em, s.saved) == (1.0, len("urn x + 1"))
    # an edit that keeps text between its end and the cursor ("et" stays after the new "r")
    first, _ = dropdown_score({"label": "r", "textEdit": {"range": {"start": {"line": 1, "character": 4},
                                                                    "end": {"line": 1, "character": 5}},
                                                          "newText": "R"}}, text, cursor, "urn")
    assert first == "Ret"


def test_buckets_and_positions():
    assert [bucket_of(n) for n in (0, 4095, 4096, 16383, 16384, 10**6)] == ["<4k", "<4k", "4-16k", "4-16k",
                                                                           ">16k", ">16k"]
    text = "x = 1\n" * 30  # 31 LSP lines
    assert [position_of({"before": text, "edits": [_edit(line, 0, "")]}) for line in (0, 10, 11, 29)] == [
        "top", "top", "middle", "bottom"]


def test_selection_spreads_over_buckets_and_positions():
    records, tokens = [], []
    for bucket_tokens in (100, 5000, 20000):
        for line in (0, 15, 29):  # top, middle, bottom of 30 lines
            for k in range(2):
                typed = "y = 2\nz = 3\n" if k else "y = 2"  # adds lines, or a word
                records.append({"id": f"r{bucket_tokens}-{line}-{k}", "before": "x = 1\n" * 30,
                                "edits": [_edit(line, 0, typed)]})
                tokens.append(bucket_tokens)
    picked = select_cases(records, tokens, 9, useful=lambda i: "\n" in records[i]["edits"][0]["text"])
    cells = {(bucket_of(tokens[i]), position_of(records[i])) for i in picked}
    assert len(picked) == 9 == len(cells)  # every bucket x position once
    assert all("\n" in records[i]["edits"][0]["text"] for i in picked)  # the ones with lines to score
    assert len(select_cases(records, tokens, 18)) == 18
    first = [bucket_of(tokens[i]) for i in select_cases(records, tokens, 3)]
    assert first == ["<4k", "4-16k", ">16k"]
    assert select_cases(records, tokens, 4, order="file") == [0, 1, 2, 3]
    assert sorted(select_cases(records, tokens, None)) == list(range(len(records)))


def test_methods_from_the_command_line():
    methods = parse_methods("full,default", ['nobudget={"staleBudget": 0}', 'full={"maxTokens": 8}'])
    assert [(m.name, m.settings) for m in methods] == [
        ("full", {"cacheMode": "recompute", "maxTokens": 8}), ("default", {}), ("nobudget", {"staleBudget": 0})]
    methods = parse_methods("full,default", [], '{"maxTokens": 8, "cacheMode": "pie"}')
    assert [m.settings for m in methods] == [{"maxTokens": 8, "cacheMode": "recompute"},
                                            {"maxTokens": 8, "cacheMode": "pie"}]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("full,fast", [])
    with pytest.raises(ValueError, match="not JSON"):
        parse_methods("full", ["x={staleBudget: 0}"])
    with pytest.raises(ValueError, match="expected NAME"):
        parse_methods("full", ["x=[1]"])


def test_summaries_count_and_compare_with_full():
    def key(method, outcome, latency, tokens):
        return KeyRow("service", method, "r", "<4k", "top", 0, "a", outcome, latency, False, False, tokens)

    keys = [key("full", "shown", 100.0, 1000), key("full", "dropped", 50.0, 1000),
            key("pie", "shown", 10.0, 10), key("pie", "cancelled", None, 30)]
    lines = [LineRow("service", "pie", "r", "<4k", "top", 0, "abcd", "abxx", True, 0.0, 0.5, 2)]
    by = {(s["method"], s["group"]): s for s in summarize(keys, lines)}
    pie = by["pie", "all"]
    assert (pie["keystrokes"], pie["answered"], pie["dropped"], pie["cancelled"], pie["other"]) == (2, 1, 0, 1, 0)
    assert pie["p50_ms"] == 10.0 and pie["p50_ms_vs_full"] == 10.0  # only answered requests' latencies
    assert pie["tokens_per_key"] == 20 and pie["tokens_per_key_vs_full"] == 50.0
    assert pie["lines"] == 1 and pie["es"] == 0.5 and pie["saved_fraction"] == 0.5
    assert by["full", "all"]["lines"] == 0 and by["full", "all"]["em"] is None
    assert set(g for _, g in by) == {"all", "size <4k", "pos top"}


def test_slow_keys_are_told_apart_by_their_likeliest_cause():
    def key(i, label, latency, tokens, record="r", outcome="shown"):
        return KeyRow("human", "pie", record, "<4k", "top", i, label, outcome, latency, False, False, tokens)

    keys = [key(0, "a", 80.0, 10),  # a file's first key
            key(1, "b", 5.0, 4000), key(2, "c", 70.0, 10),  # after 4,000 tokens of work
            key(3, "\u23ce\u2423\u2423", 60.0, 10), key(4, ":", 55.0, 10),  # a line start, a colon
            key(5, "d", 51.0, 10), key(6, "e", None, 10, outcome="dropped"),
            key(7, "f", 66.0, 3500),  # work from it to the next key (began with it, or after its answer)
            key(0, "x", 20.0, 10, record="s")]  # another file: its first key, fast
    (cell,) = summarize_slow(keys)
    assert (cell["keys"], cell["slow"]) == (8, 6)
    assert (cell["first_key"], cell["after_work"], cell["line_start"], cell["with_work"], cell["other"]) == \
        (1, 1, 2, 1, 1)


def test_the_served_breakdown_leaves_typed_along_answers_out():
    rows = [{"pace": "human", "method": "pie", "strategy": "speculative", "wait_ms": 30.0, "total_ms": 10.0},
            {"pace": "human", "method": "pie", "strategy": "speculative", "wait_ms": 10.0, "total_ms": 20.0},
            {"pace": "human", "method": "pie", "strategy": "typed_along", "wait_ms": 0.1, "total_ms": 0.0}]
    (row,) = summarize_served(rows)
    assert (row["requests"], row["typed_along"]) == (2, 1)
    assert row["wait_ms_mean"] == 20.0 and row["total_ms_mean"] == 15.0


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "edits.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(RECORD) + "\n")
    return path


def _bench(*args, timeout=240):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lsp_replay.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_on_the_fake_engine(data, tmp_path):
    out = tmp_path / "replay.json"
    proc = _bench("--fake", "--data", str(data), "--max-keys", "90", "--interval-ms", "5", "--hunk-pause-ms", "20",
                  "--methods", "full,default", "--method-settings", 'nobudget={"staleBudget": 0}',
                  "--json", str(out))
    assert "pace service" in proc.stdout and "pace human" in proc.stdout and "p99 ms" in proc.stdout
    result = json.loads(out.read_text())
    assert result["partial"] is False  # (written after every record with True, then whole)
    assert result["methods"] == ["full", "default", "nobudget"]
    assert result["method_settings"]["nobudget"] == {"staleBudget": 0}
    session = editor_session(RECORD)
    played = min(90, len(session.keys))
    probes = [p for p in session.probes if p.key < played]
    assert played == 86 and len(probes) == 4 and result["cases"][0]["keys"] == len(session.keys)
    summary = {(s["pace"], s["method"], s["group"]): s for s in result["summary"]}
    for pace in ("service", "human"):
        for method in result["methods"]:
            s = summary[pace, method, "all"]
            assert s["keystrokes"] == played
            assert s["answered"] + s["dropped"] + s["cancelled"] == s["keystrokes"] and s["other"] == 0
            assert s["lines"] == len(probes) and s["tokens_per_key"] is None  # the fake engine encodes nothing
            rows = [r for r in result["lines"] if r["pace"] == pace and r["method"] == method]
            assert sorted(r["expected"] for r in rows) == sorted(p.expected for p in probes)
            assert summary[pace, method, "size <4k"]["keystrokes"] == played
    for method in result["methods"]:  # at service pace every answer comes before the next key: all shown
        s = summary["service", method, "all"]
        assert s["answered"] == s["keystrokes"] and s["lines_shown"] == s["lines"] and s["late"] == 0
    assert summary["service", "full", "all"]["p50_ms_vs_full"] == 1.0
    # one first request per file opened, per pace and method, reported apart from the keystrokes
    assert len(result["opens"]) == 2 * len(result["methods"]) and all(o["first_ms"] > 0 for o in result["opens"])
    first = {(f["pace"], f["method"], f["group"]): f for f in result["first_suggestion"]}
    assert first["human", "default", "all"]["answered"] == 1 and "first suggestion after opening" in proc.stdout


def test_smoke_on_a_tiny_model_counts_the_tokens_each_method_encodes(data, tmp_path):
    from helpers import make_checkpoint

    model = make_checkpoint(tmp_path / "tiny", "llama")
    out = tmp_path / "replay.json"
    _bench("--model", str(model), "--data", str(data), "--max-keys", "8", "--pace", "service",
           "--methods", "full,default", "--json", str(out))
    result = json.loads(out.read_text())
    file_tokens = result["cases"][0]["tokens"]
    full = [k for k in result["keys"] if k["method"] == "full"]
    assert len(full) == 8 and all(k["outcome"] in ("shown", "empty") for k in full)
    # the whole (growing) file every keystroke, plus the view's own tokens; not a running total. A
    # keystroke's count may hold the ones before it (a request the server finished after answering
    # from typing along counts when it ends: a fresh clone's run had one key at 3.02 files), so the
    # bounds are on the sum and, well under a running total's last key (8 files), on the largest
    counts = [k["encoded_tokens"] for k in full]
    assert len(full) * file_tokens <= sum(counts) <= 2 * len(full) * file_tokens
    assert max(counts) < len(full) // 2 * file_tokens
    summary = {(s["method"], s["group"]): s for s in result["summary"]}
    assert 0 < summary["default", "all"]["tokens_per_key"] < summary["full", "all"]["tokens_per_key"] / 2
    assert summary["default", "all"]["tokens_per_key_vs_full"] > 2


def test_a_cross_file_method_gets_the_records_context_files(data, tmp_path):
    """`crossFile` on: the record's cross-file files (the companion beside --data) are opened in
    editkv beside the record's file, and its requests show them (the server's context counters)."""
    from helpers import make_checkpoint

    helper = "def double(x):\n    return 2 * x\n\n\nLIMIT = 10\n"
    with gzip.open(tmp_path / "edits-crossfile.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": RECORD["id"], "context": [{"path": "helpers.py", "blob": "b1"}]}) + "\n")
    with gzip.open(tmp_path / "edits-blobs.jsonl.gz", "wt") as f:
        f.write(json.dumps({"blob": "b1", "text": helper}) + "\n")
    model = make_checkpoint(tmp_path / "tiny", "llama")
    out = tmp_path / "replay.json"
    _bench("--model", str(model), "--data", str(data), "--max-keys", "8", "--pace", "service",
           "--methods", "default,xfile", "--method-settings", 'xfile={"crossFile": true}', "--baseline", "default",
           "--json", str(out))
    result = json.loads(out.read_text())
    served = {m: [r for r in result["served_requests"] if r["method"] == m] for m in ("default", "xfile")}
    assert served["xfile"] and all(r["context_files"] == 1 and r["context_reused_tokens"] > 0 for r in served["xfile"])
    assert served["default"] and not any("context_files" in r for r in served["default"])


def test_the_lines_pace_asks_at_the_scored_lines_only(data, tmp_path):
    """--pace lines: every keystroke reaches the server as a change, but only the scored lines'
    keystrokes get a request, each answered before typing goes on."""
    from helpers import make_checkpoint

    model = make_checkpoint(tmp_path / "tiny", "llama")
    out = tmp_path / "replay.json"
    proc = _bench("--model", str(model), "--data", str(data), "--max-keys", "0", "--pace", "lines",
                  "--methods", "full,default", "--json", str(out))
    assert "pace lines" in proc.stdout and "pace human" not in proc.stdout
    result = json.loads(out.read_text())
    session = editor_session(RECORD)
    probe_keys = sorted(p.key for p in session.probes)
    for method in ("full", "default"):
        keys = [k for k in result["keys"] if k["method"] == method]
        assert sorted(k["index"] for k in keys) == probe_keys
        assert all(k["outcome"] in ("shown", "empty") for k in keys)
        lines = [r for r in result["lines"] if r["method"] == method]
        assert sorted(r["key"] for r in lines) == probe_keys and all(not r.get("late") for r in keys)


def test_the_dropdown_is_asked_at_every_scored_line(data, tmp_path):
    """--pace lines --dropdown on the fake engine: one invoked completion request per scored line,
    its items (the fake's numbered drafts at the cursor) applied and scored, the counts consistent."""
    out = tmp_path / "replay.json"
    proc = _bench("--fake", "--data", str(data), "--max-keys", "0", "--pace", "lines", "--dropdown",
                  "--methods", "default,two", "--method-settings", 'two={"numDrafts": 2}', "--json", str(out))
    assert "dropdown (--dropdown)" in proc.stdout
    result = json.loads(out.read_text())
    session = editor_session(RECORD)
    for method, drafts in (("default", 3), ("two", 2)):
        rows = [r for r in result["dropdown_lines"] if r["method"] == method]
        assert sorted(r["key"] for r in rows) == sorted(p.key for p in session.probes)
        for r in rows:
            line, character = session.keys[r["key"]].cursor
            assert r["outcome"] == "answered" and r["items"] == drafts and r["latency_ms"] > 0
            assert r["texts"][0] == f"<fake {line}:{character}>" and r["first_em"] == r["best_em"] == 0.0
        summary = {s["group"]: s for s in result["dropdown"] if s["method"] == method}
        s = summary["all"]
        assert s["pace"] == "lines" and s["requests"] == len(session.probes) >= s["answered"] == s["with_items"]
        assert s["items_mean"] == drafts and 0.0 <= s["best_es"] <= 1.0
        assert summary["size <4k"]["requests"] == s["requests"]


def test_hop_summary_counts_latencies_captures_and_memory_after_the_first_round():
    def key(rnd, outcome, latency):
        return KeyRow("hop", "default", "r", "<4k", "top", 0, "a", outcome, latency, False, False, None, rnd)

    keys = [key(1, "shown", 100.0), key(1, "dropped", 5.0), key(2, "shown", 10.0), key(2, "empty", 20.0),
            key(2, "cancelled", None)]
    mib = 2**20
    samples = [{"round": r, "device_allocated_bytes": m * mib, "device_max_allocated_bytes": 9 * mib,
                "kv_pool_bytes": 4 * mib, "graph_captures": None} for r, m in ((1, 5), (1, 8), (2, 7), (2, 6))]
    served = [{"round": 1, "graph_captures": 3}, {"round": 2, "graph_captures": 1}, {"round": 2}]
    h = summarize_hop(keys, samples, {"all": 4, "after_round1": 1}, served)
    assert (h["keystrokes"], h["answered"], h["dropped"], h["cancelled"], h["other"]) == (5, 3, 1, 1, 0)
    assert (h["p50_ms"], h["p95_ms"]) == (20.0, 100.0) and h["p95_over_p50"] == 5.0
    assert h["after_round1"]["keystrokes"] == 3 and h["after_round1"]["p95_over_p50"] == 2.0
    assert h["request_graph_captures"] == {"all": 4, "after_round1": 1, "requests_sampled": 3}
    allocated = h["memory"]["device_allocated_bytes"]
    assert allocated == {"first": 5 * mib, "max": 8 * mib, "last": 6 * mib, "spread_after_round1": mib}
    assert h["memory"]["kv_pool_bytes"] == 4 * mib and h["memory"]["samples"] == samples
    none = summarize_hop(keys, [{**m, "device_allocated_bytes": None} for m in samples], {}, [])
    assert set(none["memory"]["device_allocated_bytes"].values()) == {None}


def test_an_answer_continues_the_ghost_text_only_when_it_is_that_text_less_the_key_typed():
    from editkv.lsp_server.replay import KeyRecord, Keystroke

    def typed(text, col):
        return Keystroke((0, col), (0, col), text, (0, col + len(text)))

    keys = [typed("r", 0), typed("e", 1), typed("t", 2), typed("x", 3), Keystroke((0, 3), (0, 4), "", (0, 3))]
    records = [KeyRecord(0, "r", "shown", 9.0, ["eturn x"]), KeyRecord(1, "e", "shown", 2.0, ["turn x"]),
               KeyRecord(2, "t", "shown", 30.0, ["urn y"]), KeyRecord(3, "x", "shown", 3.0, ["rn y"]),
               KeyRecord(4, "<del>", "shown", 3.0, ["urn y"])]
    # key 1 typed "e" into "eturn x" and got "turn x"; key 2 got a new text; key 3 typed "x", not "u";
    # key 4 deleted; key 0 has nothing before it
    assert [continues(records, keys, i) for i in range(5)] == [False, True, False, False, False]
    records[0].outcome = "dropped"
    assert not continues(records, keys, 1)


def test_the_hop_summary_splits_off_the_answers_that_continue_the_ghost_text():
    def key(rnd, latency, continued):
        return KeyRow("hop", "default", "r", "<4k", "top", 0, "a", "shown", latency, False, False, None, rnd, continued)

    keys = [key(1, 40.0, False), key(2, 2.0, True), key(2, 3.0, True), key(2, 30.0, False), key(2, 45.0, False)]
    h = summarize_hop(keys, [], {}, [])
    assert h["continued"] == 2 and h["p50_ms"] == 30.0
    assert (h["not_continued"]["answered"], h["not_continued"]["p50_ms"], h["not_continued"]["p95_ms"]) == \
        (3, 40.0, 45.0)
    assert h["not_continued_after_round1"]["answered"] == 2 and h["not_continued_after_round1"]["p50_ms"] == 30.0


def test_the_hop_pace_types_open_documents_by_turns(tmp_path):
    """--pace hop on the fake engine: every document opened (each under its own URI: two of the
    records share a path) and read once, then --keys-per-turn keystrokes of each in turn for
    --rounds rounds; every keystroke accounted for, memory fields there (None off CUDA)."""
    records = [{**RECORD, "id": f"example/repo@abc{k}:tool.py"} for k in range(2)]
    records.append({**RECORD, "id": "example/repo@abc9:other.py", "path": "other.py",
                    "before": BEFORE + "\n\nX = 1\n" * 3})
    data = tmp_path / "edits.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "replay.json"
    proc = _bench("--fake", "--data", str(data), "--pace", "hop", "--docs", "3", "--rounds", "2", "--keys-per-turn",
                  "2", "--interval-ms", "5", "--hunk-pause-ms", "20", "--methods", "default,full", "--json", str(out))
    assert "pace hop" in proc.stdout and "p95/p50 after round 1" in proc.stdout and "typed along" in proc.stdout
    result = json.loads(out.read_text())
    assert result["partial"] is False and result["paces"][0]["name"] == "hop" and result["records"] == 3
    for method in ("default", "full"):
        keys = [k for k in result["keys"] if k["method"] == method]
        assert len(keys) == 3 * 2 * 2
        for r in records:  # each document: its first four keystrokes, two a round
            mine = [k for k in keys if k["record"] == r["id"]]
            assert [(k["index"], k["round"]) for k in mine] == [(0, 1), (1, 1), (2, 2), (3, 2)]
        opened = [o for o in result["opens"] if o["method"] == method]
        assert sorted(o["record"] for o in opened) == sorted(r["id"] for r in records)
        assert all(o["first_ms"] is not None for o in opened)  # a request on a document the server has
        hop = result["hop"][method]
        assert (hop["documents"], hop["opened"], hop["rounds"], hop["keys_per_turn"]) == (3, 3, 2, 2)  # open at the end
        assert hop["keystrokes"] == len(keys) and hop["other"] == 0 and hop["timed_out"] == 0
        assert hop["answered"] + hop["dropped"] + hop["cancelled"] == hop["keystrokes"]
        assert hop["after_round1"]["keystrokes"] == 6
        # the fake's answers name the cursor, so none continues the one before
        assert hop["continued"] == 0 and hop["not_continued"]["answered"] == hop["answered"]
        assert hop["graph_captures"] == {"all": None, "after_round1": None}  # the fake has no graphs
        memory = hop["memory"]
        assert len(memory["samples"]) == 3 * 2  # one a turn
        assert all(set(m) >= {"round", "record", "device_allocated_bytes", "device_max_allocated_bytes",
                              "kv_pool_bytes", "graph_captures"} for m in memory["samples"])
        assert memory["device_allocated_bytes"] == dict.fromkeys(("first", "max", "last", "spread_after_round1"))
        summary = {s["group"]: s for s in result["summary"] if s["method"] == method and s["pace"] == "hop"}
        assert summary["all"]["keystrokes"] == len(keys)
