"""Soak: many documents open for a long replay under a small KV budget, through a real `editkv lsp`.

Documents are opened, typed into keystroke by keystroke (one didChange each), completed at the
cursor now and then, closed and reopened; after every completion `editkv/debugDocument` says how
much KV is resident (never over the budget, unless the one document being served is larger by
itself), how many graphs (or, with EDITKV_GRAPHS=static on the CPU, graph keys) are held (never
over their bound), and the server's memory is sampled: after warm-up it must stay flat; at the
end pygls' bookkeeping of handlers holds nothing (it once kept a future per keystroke).

The default run is short; `-m fuzz_long` runs the long one: EDITKV_SOAK_DOCS (200),
EDITKV_SOAK_OPS (6000), EDITKV_SOAK_DEVICE (cpu; "cuda" on a GPU machine: graphs on, and the
device memory is checked too), EDITKV_SOAK_GRAPHS ("static" exercises the graph bound on the
CPU; slow there, as Triton's interpreter runs the kernels), EDITKV_SOAK_SETTINGS (JSON settings
on top of the soak's), EDITKV_SOAK_REPORT (a JSON summary).
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from helpers import make_checkpoint
from lspfuzz import Divergence, Session, sha

BUDGET_MB = 1
WORDS = ["value", "result", "items", "self", "count", "name", "index", "data", "total", "path"]


def source(rng: random.Random, lines: int) -> str:
    """A Python-like file of about `lines` lines."""
    out = []
    while len(out) < lines:
        name = rng.choice(WORDS)
        out += [f"def {name}_{len(out)}({rng.choice(WORDS)}, {rng.choice(WORDS)}):",
                f"    {rng.choice(WORDS)} = {rng.choice(WORDS)} + {rng.randint(0, 99)}",
                f"    return {rng.choice(WORDS)}", ""]
    return "\n".join(out) + "\n"


def soak(checkpoint, *, docs: int, ops: int, device: str = "cpu", graphs: str | None = None, seed: int = 0) -> dict:
    """Run the replay; returns what it measured (raises Divergence on a broken bound)."""
    env = {"EDITKV_GRAPHS": graphs} if graphs else {}
    session = Session("--device", device, env=env, options={
        "model": str(checkpoint), "kvBudgetMb": BUDGET_MB, "maxTokens": 4, "idleRefreshMs": 20, "numDrafts": 2,
        **json.loads(os.environ.get("EDITKV_SOAK_SETTINGS", "{}"))})
    rng = random.Random(seed)
    budget = BUDGET_MB * 2**20
    texts: dict[str, str] = {}
    versions: dict[str, int] = {}
    rss: list[tuple[int, float]] = []
    device_mem: list[tuple[int, int]] = []
    peak_kv = peak_graphs = max_graphs = completions = evicted_seen = 0
    started = time.monotonic()

    def open_doc(uri: str) -> None:
        texts[uri] = source(rng, rng.randint(6, 40))
        versions[uri] = 0
        session.client.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 0, "text": texts[uri]}})

    try:
        for i in range(docs):
            open_doc(f"file:///soak/m{i}.py")
        uris = sorted(texts)
        for op in range(ops):
            # recently edited files come back more often (a working set), the rest now and then
            uri = uris[min(int(rng.expovariate(1 / 12)), len(uris) - 1)] if rng.random() < 0.8 else rng.choice(uris)
            if rng.random() < 0.02:  # closed and opened again
                session.client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
                open_doc(uri)
            text = texts[uri]
            line = rng.randint(0, text.count("\n") - 1)
            at = [i for i, c in enumerate(text) if c == "\n"][line]  # the end of that line
            character = at - (text.rfind("\n", 0, at) + 1)
            word = rng.choice(["  # ", " + ", "x", ".attr", "(1)"]) + rng.choice(WORDS)
            for k, ch in enumerate(word):  # typed keystroke by keystroke
                versions[uri] += 1
                session.client.notify("textDocument/didChange", {
                    "textDocument": {"uri": uri, "version": versions[uri]},
                    "contentChanges": [{"range": {"start": {"line": line, "character": character + k},
                                                  "end": {"line": line, "character": character + k}}, "text": ch}]})
            texts[uri] = text[:at] + word + text[at:]
            uris.remove(uri)
            uris.insert(0, uri)
            if op % 2 == 0:
                session.request("textDocument/inlineCompletion", {
                    "textDocument": {"uri": uri}, "position": {"line": line, "character": character + len(word)},
                    "context": {"triggerKind": 2}})
                completions += 1
                got = session.request("editkv/debugDocument", {"uri": uri})
                backend = got["backend"]
                if got["text_sha256"] != sha(texts[uri]) or backend["text_sha256"] != got["text_sha256"]:
                    raise Divergence(f"{uri}: the server's text differs from the client's")
                total, largest = backend["total_kv_bytes"], backend["largest_kv_bytes"]
                if total > budget and not (backend["encoded_documents"] == 1 and total == largest):
                    raise Divergence(f"resident KV {total} B over the budget {budget} B "
                                     f"({backend['encoded_documents']} documents encoded)")
                evicted_seen = max(evicted_seen, docs - backend["encoded_documents"])
                peak_kv = max(peak_kv, total)
                if backend["graphs"] is not None:
                    max_graphs = backend["max_graphs"]
                    peak_graphs = max(peak_graphs, backend["graphs"])
                    if backend["graphs"] > max_graphs:
                        raise Divergence(f"{backend['graphs']} graphs held, bound {max_graphs}")
                if backend["device_allocated"] is not None:
                    device_mem.append((op, backend["device_allocated"]))
            if op % 25 == 0:
                rss.append((op, session.rss_mb()))
        stats = session.request("editkv/stats", None)
    finally:
        code = session.close()
    assert code == 0
    warm = [m for op, m in rss if op >= ops // 3]
    result = {
        "docs": docs, "ops": ops, "device": device, "graphs_mode": graphs or "default", "seed": seed,
        "seconds": round(time.monotonic() - started, 1), "completions": completions,
        "kv_budget_bytes": budget, "peak_resident_kv_bytes": peak_kv, "evictions": stats["backend"]["evictions"],
        "handlers_in_flight": stats["handlers_in_flight"],  # pygls' bookkeeping (was one per keystroke)
        "peak_graphs": peak_graphs if max_graphs else None, "max_graphs": max_graphs or None,
        "rss_mb_first": rss[0][1], "rss_mb_after_warmup": warm[0], "rss_mb_end": warm[-1],
        "rss_mb_max_after_warmup": max(warm),
        "rss_mb_series": [(op, round(m, 1)) for op, m in rss[:: max(1, len(rss) // 40)]],
        "device_mb_after_warmup": next((m / 2**20 for op, m in device_mem if op >= ops // 3), None),
        "device_mb_max_after_warmup": max((m / 2**20 for op, m in device_mem if op >= ops // 3), default=None),
    }
    return result


def check_flat(result: dict, rss_slack_mb: float, device_slack_mb: float = 64) -> None:
    assert result["evictions"] > 0  # the budget was small enough to matter
    # a bound, not a timing: at the end nothing is in flight, whatever was sent before
    assert result["handlers_in_flight"] <= 2, result["handlers_in_flight"]
    assert result["rss_mb_max_after_warmup"] <= result["rss_mb_after_warmup"] + rss_slack_mb, result
    if result["device_mb_after_warmup"] is not None:
        assert result["device_mb_max_after_warmup"] <= result["device_mb_after_warmup"] + device_slack_mb, result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("soak-qwen2"), "qwen2")


def test_short_soak_stays_within_the_kv_budget_and_flat(checkpoint):
    result = soak(checkpoint, docs=16, ops=48)
    check_flat(result, rss_slack_mb=40)


@pytest.mark.fuzz_long
def test_soak(checkpoint):
    result = soak(checkpoint, docs=int(os.environ.get("EDITKV_SOAK_DOCS", "200")),
                  ops=int(os.environ.get("EDITKV_SOAK_OPS", "6000")),
                  device=os.environ.get("EDITKV_SOAK_DEVICE", "cpu"), graphs=os.environ.get("EDITKV_SOAK_GRAPHS"))
    print(json.dumps(result))
    if os.environ.get("EDITKV_SOAK_REPORT"):
        with open(os.environ["EDITKV_SOAK_REPORT"], "w") as out:
            json.dump(result, out, indent=1)
    check_flat(result, rss_slack_mb=25)
