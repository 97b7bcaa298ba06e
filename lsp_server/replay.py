"""Editing sessions typed into a language server one keystroke at a time (demo and benchmarks).

A `Session` is a document and the keystrokes of an edit: a selection deleted in one
keystroke, then the new text typed character by character (an end of line is one
keystroke). `type_session` plays it like an editor: didChange, then an inline-completion
request at the new cursor, cancelling the previous request if it is still open (VS Code
does); one keystroke every `interval_s` (or, with 0, each as soon as the last was answered).
Every keystroke's record says how its request ended and how long it took.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from editkv.lsp_server.lsp_client import LspClient, LspError

CANCELLED = -32800
EXAMPLE = Path(__file__).resolve().parent / "examples" / "inventory.py"
EXAMPLE_AFTER = "        return sum(item.total() for item in self.items.values())\n"
EXAMPLE_TYPED = "\n    def count(self) -> int:\n        return sum(item.quantity for item in self.items.values())\n"


@dataclass(frozen=True)
class Keystroke:
    """One content change and where the cursor is after it (LSP, UTF-16)."""

    start: tuple[int, int]
    end: tuple[int, int]
    text: str
    cursor: tuple[int, int]

    @property
    def label(self) -> str:
        if self.start != self.end:
            return "<del>" if not self.text else f"<replace {self.text!r}>"
        return {"\n": "⏎", "\r\n": "⏎", "\t": "⇥", " ": "␣"}.get(self.text, self.text)


@dataclass
class Session:
    """A document and the keystrokes typed into it."""

    uri: str
    text: str
    keys: list[Keystroke]
    language_id: str = "python"
    name: str = ""


@dataclass
class KeyRecord:
    """How the inline-completion request after one keystroke ended."""

    index: int
    label: str
    outcome: str = "pending"  # "shown", "empty", "dropped", "cancelled", "error"
    latency_ms: float | None = None  # keystroke sent -> response arrived
    suggestions: list[str] = field(default_factory=list)
    error: str = ""


def _units(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def type_text(at: tuple[int, int], text: str) -> Iterator[Keystroke]:
    """Keystrokes typing `text` at `at`: one per character, one per line end."""
    line, col = at
    i = 0
    while i < len(text):
        unit = "\r\n" if text.startswith("\r\n", i) else text[i]
        i += len(unit)
        start = (line, col)
        if unit in ("\r\n", "\n", "\r"):
            line, col = line + 1, 0
        else:
            col += _units(unit)
        yield Keystroke(start, start, unit, (line, col))


def example_session() -> Session:
    """The bundled example: a `count` method typed into inventory.py's Inventory class."""
    text = EXAMPLE.read_text(encoding="utf-8")
    offset = text.index(EXAMPLE_AFTER) + len(EXAMPLE_AFTER)
    line = text[:offset].count("\n")
    return Session(EXAMPLE.as_uri(), text, list(type_text((line, 0), EXAMPLE_TYPED)), name="inventory.py")


def record_session(record: dict) -> Session:
    """A realedits record's edits (applied in list order, bottom to top) as keystrokes."""
    keys: list[Keystroke] = []
    for edit in record["edits"]:
        rng = edit["range"]
        start = (rng["start"]["line"], rng["start"]["character"])
        end = (rng["end"]["line"], rng["end"]["character"])
        if start != end:
            keys.append(Keystroke(start, end, "", start))
        keys.extend(type_text(start, edit["text"]))
    name = record.get("id", record.get("path", "record"))
    return Session(f"file:///realedits/{record['repo']}/{record['path']}", record["before"], keys, name=name)


def load_records(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` records of a realedits .jsonl.gz (or plain .jsonl) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def _position(p: tuple[int, int]) -> dict:
    return {"line": p[0], "character": p[1]}


async def type_session(client: LspClient, session: Session, *, interval_s: float, max_keys: int | None = None,
                       timeout_s: float = 300.0,
                       on_record: Callable[[KeyRecord], None] | None = None) -> list[KeyRecord]:
    """Open `session`'s document, type its keystrokes, close it; one record per keystroke."""
    uri = session.uri
    client.notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": session.language_id, "version": 0, "text": session.text}})
    records: list[KeyRecord] = []
    open_requests: list[tuple[int, asyncio.Future, float, KeyRecord]] = []
    keys = session.keys[:max_keys] if max_keys else session.keys
    for i, key in enumerate(keys):
        sent = time.perf_counter()
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": i + 1},
            "contentChanges": [{"range": {"start": _position(key.start), "end": _position(key.end)}, "text": key.text}],
        })
        for msg_id, future, _, _ in open_requests:
            if not future.done():
                client.cancel(msg_id)
        msg_id, future = client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": _position(key.cursor), "context": {"triggerKind": 2}})
        record = KeyRecord(i, key.label)
        records.append(record)
        open_requests = [r for r in open_requests if not r[1].done()] + [(msg_id, future, sent, record)]
        future.add_done_callback(lambda f, m=msg_id, s=sent, r=record: _finish(client, f, m, s, r, on_record))
        if interval_s <= 0:
            await asyncio.wait([future], timeout=timeout_s)
        else:
            await asyncio.sleep(max(0.0, sent + interval_s - time.perf_counter()))
    pending = [f for _, f, _, _ in open_requests if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    return records


def _finish(client: LspClient, future: asyncio.Future, msg_id: int, sent: float, record: KeyRecord,
            on_record: Callable[[KeyRecord], None] | None) -> None:
    arrived = client.arrived.get(msg_id, time.perf_counter())
    record.latency_ms = 1000 * (arrived - sent)
    if future.cancelled():
        record.outcome = "error"
    elif (err := future.exception()) is not None:
        cancelled = isinstance(err, LspError) and err.code == CANCELLED
        record.outcome = "cancelled" if cancelled else "error"
        record.error = "" if cancelled else str(err)
    else:
        result = future.result()
        if result is None:
            record.outcome = "dropped"
        else:
            items = result["items"] if isinstance(result, dict) else result
            record.suggestions = [item["insertText"] if isinstance(item["insertText"], str)
                                  else item["insertText"].get("value", "") for item in items]
            record.outcome = "shown" if record.suggestions else "empty"
    if on_record is not None:
        on_record(record)


def summarize(records: list[KeyRecord]) -> dict:
    """Counts per outcome and latency percentiles of the answered (shown or empty) requests."""
    from editkv.lsp_server.stats import percentile

    answered = [r.latency_ms for r in records if r.outcome in ("shown", "empty") and r.latency_ms is not None]
    shown = [r.latency_ms for r in records if r.outcome == "shown" and r.latency_ms is not None]
    counts = {k: sum(r.outcome == k for r in records) for k in ("shown", "empty", "dropped", "cancelled", "error")}
    n = len(records)
    return {
        "keystrokes": n, **counts,
        "stale_fraction": (counts["dropped"] + counts["cancelled"]) / n if n else 0.0,
        "answered_p50_ms": percentile(answered, 50), "answered_p95_ms": percentile(answered, 95),
        "answered_p99_ms": percentile(answered, 99), "shown_p50_ms": percentile(shown, 50),
        "shown_p95_ms": percentile(shown, 95),
    }
