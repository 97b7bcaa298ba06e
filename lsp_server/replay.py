"""Editing sessions typed into a language server one keystroke at a time (demo and benchmarks).

A `Session` is a document and the keystrokes of an edit. Two ways to turn a realedits record
into keystrokes:
- `record_session`: each hunk's old range deleted in one keystroke, then its new text typed
  a character at a time (an end of line is one keystroke, and indentation is typed out).
- `editor_session`: the same, typed into an editor with auto-indent (the model is spelled
  out at `editor_session`), plus the `LineProbe`s a benchmark scores suggestions at: the
  keystroke after which the cursor sits at the end of a typed line's indentation, and the
  rest of the line the user then types.
`type_session` plays a session like an editor: didChange, then an automatic inline-completion
request at the new cursor, cancelling the previous request if it is still open (VS Code
does); one keystroke every `interval_s` (or, with 0, each as soon as the last was answered),
optionally a longer pause before each new hunk. Every keystroke's record says how its
request ended, when it was sent and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from editkv.edit_cache.positions import Position, Range, apply_change, common_prefix, line_starts
from editkv.lsp_server.lsp_client import LspClient, LspError

CANCELLED = -32800
EXAMPLE = Path(__file__).resolve().parent / "examples" / "inventory.py"
EXAMPLE_AFTER = "        return sum(item.total() for item in self.items.values())\n"
EXAMPLE_TYPED = "\n    def count(self) -> int:\n        return sum(item.quantity for item in self.items.values())\n"
_BREAK = re.compile(r"\r\n|\r|\n")  # LSP's line terminators


@dataclass(frozen=True)
class Keystroke:
    """One content change and where the cursor is after it (LSP, UTF-16); `hunk`: which edit it types."""

    start: tuple[int, int]
    end: tuple[int, int]
    text: str
    cursor: tuple[int, int]
    hunk: int = 0

    @property
    def label(self) -> str:
        body = self.text.lstrip("\r\n")
        if body != self.text and not body.strip(" \t"):  # Enter, with the indentation it brings
            return "⏎" + body.replace(" ", "␣").replace("\t", "⇥")
        if self.start != self.end:
            return "<del>" if not self.text else f"<replace {self.text!r}>"
        return {"\t": "⇥", " ": "␣"}.get(self.text, self.text)


@dataclass(frozen=True)
class LineProbe:
    """A typed line to score a suggestion on: right after keystroke `key` the cursor sits at the end
    of line `line`'s indentation; the user then types `expected` (the rest of the line, rstripped)."""

    key: int
    line: int
    expected: str


@dataclass
class Session:
    """A document and the keystrokes typed into it."""

    uri: str
    text: str
    keys: list[Keystroke]
    language_id: str = "python"
    name: str = ""
    probes: list[LineProbe] = field(default_factory=list)


@dataclass
class KeyRecord:
    """How the inline-completion request after one keystroke ended."""

    index: int
    label: str
    outcome: str = "pending"  # "shown", "empty", "dropped", "cancelled", "error", "unasked" (no request)
    latency_ms: float | None = None  # keystroke sent -> response arrived
    suggestions: list[str] = field(default_factory=list)
    error: str = ""
    sent_at: float | None = None  # time.perf_counter() when the keystroke was sent
    timed_out: bool = False  # no answer within the wait's timeout (then cancelled)


def _units(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def _width(text: str) -> int:
    return sum(_units(ch) for ch in text)


def type_text(at: tuple[int, int], text: str, hunk: int = 0) -> Iterator[Keystroke]:
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
        yield Keystroke(start, start, unit, (line, col), hunk)


def example_session() -> Session:
    """The bundled example: a `count` method typed into inventory.py's Inventory class."""
    text = EXAMPLE.read_text(encoding="utf-8")
    offset = text.index(EXAMPLE_AFTER) + len(EXAMPLE_AFTER)
    line = text[:offset].count("\n")
    return Session(EXAMPLE.as_uri(), text, list(type_text((line, 0), EXAMPLE_TYPED)), name="inventory.py")


def record_session(record: dict) -> Session:
    """A realedits record's edits (applied in list order, bottom to top) as keystrokes."""
    keys: list[Keystroke] = []
    for hunk, edit in enumerate(record["edits"]):
        rng = edit["range"]
        start = (rng["start"]["line"], rng["start"]["character"])
        end = (rng["end"]["line"], rng["end"]["character"])
        if start != end:
            keys.append(Keystroke(start, end, "", start, hunk))
        keys.extend(type_text(start, edit["text"], hunk))
    return Session(_record_uri(record), record["before"], keys, name=record.get("id", record.get("path", "record")))


def _record_uri(record: dict) -> str:
    return f"file:///realedits/{record['repo']}/{record['path']}"


# ---- an editor with auto-indent -----------------------------------------------------------------


def editor_session(record: dict) -> Session:
    """A realedits record typed as into an editor with auto-indent, with the lines to score at.

    Each edit (list order: bottom to top, so every range is valid when its turn comes):
    1. its old range, if any, is deleted in one keystroke;
    2. an edit that inserts whole lines at the start of a line (its text ends with the line
       break the line above ends with) is typed from the end of the line above instead, Enter
       first, as people add lines;
    3. the new text is typed a character at a time, except:
       - Enter is one change: the line break plus the indentation of the line it was pressed
         on (up to the cursor); the editor copies indentation, it does not add any after ":";
       - a line that needs more indentation than Enter brought: the rest is typed, a character
         at a time; one that needs less: the surplus is deleted in one keystroke;
       - a line left empty: the next Enter takes its auto-indentation away in the same change
         (editors trim auto-inserted whitespace), so blank lines cost one keystroke;
       - the text ends in a line break (a line insertion that could not be typed as in 2):
         the indentation the last Enter brought is deleted in one keystroke.
    A `LineProbe` marks each typed line whose indentation was reached by a keystroke (the cursor
    then sits where a suggestion for the line shows), unless the rest of the line is blank or a
    comment (`#...`). Mid-line edits give no probe for their first line. Raises ValueError if the
    keystrokes do not give the record's `after` (a bug here).
    """
    editor = _Editor(record["before"])
    for hunk, edit in enumerate(record["edits"]):
        rng = edit["range"]
        start = (rng["start"]["line"], rng["start"]["character"])
        end = (rng["end"]["line"], rng["end"]["character"])
        editor.type_edit(hunk, start, end, edit["text"])
    if "after" in record and editor.text != record["after"]:
        raise ValueError(f"editor_session: typing {record.get('id')} did not give its `after` text")
    return Session(_record_uri(record), record["before"], editor.keys,
                   name=record.get("id", record.get("path", "record")), probes=editor.probes)


def _split_lines(text: str) -> list[tuple[str, str]]:
    """(content, terminator) per line; the last line's terminator is ''."""
    out, pos = [], 0
    for m in _BREAK.finditer(text):
        out.append((text[pos : m.start()], m.group()))
        pos = m.end()
    out.append((text[pos:], ""))
    return out


def _indentation(text: str) -> str:
    return text[: len(text) - len(text.lstrip(" \t"))]


def _is_scored(rest: str) -> bool:
    """Blank and comment-only lines are not scored (nothing, or nothing a model should guess)."""
    body = rest.strip()
    return bool(body) and not body.startswith("#")


class _Editor:
    """The document as the editor holds it, the keystrokes typed so far and the probes found."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.keys: list[Keystroke] = []
        self.probes: list[LineProbe] = []
        self.cursor = (0, 0)

    def line(self, n: int) -> tuple[str, str]:
        """Line n's content and its terminator."""
        starts = line_starts(self.text)
        end = starts[n + 1] if n + 1 < len(starts) else len(self.text)
        body = self.text[starts[n] : end]
        content = body.rstrip("\r\n")
        return content, body[len(content) :]

    def before_cursor(self) -> str:
        content, _ = self.line(self.cursor[0])
        out, units = [], 0
        for ch in content:
            if units >= self.cursor[1]:
                break
            out.append(ch)
            units += _units(ch)
        return "".join(out)

    def press(self, start: tuple[int, int], end: tuple[int, int], text: str, hunk: int) -> None:
        """One content change; the cursor lands after the inserted text."""
        self.text = apply_change(self.text, Range(Position(*start), Position(*end)), text)[0]
        lines = _split_lines(text)
        if len(lines) == 1:
            self.cursor = (start[0], start[1] + _width(text))
        else:
            self.cursor = (start[0] + len(lines) - 1, _width(lines[-1][0]))
        self.keys.append(Keystroke(start, end, text, self.cursor, hunk))

    def type_chars(self, text: str, hunk: int) -> None:
        for ch in text:
            self.press(self.cursor, self.cursor, ch, hunk)

    def probe(self, rest: str) -> None:
        """The last keystroke left the cursor at the end of this line's indentation."""
        if _is_scored(rest) and self.keys:
            self.probes.append(LineProbe(len(self.keys) - 1, self.cursor[0], rest.rstrip()))

    def type_edit(self, hunk: int, start: tuple[int, int], end: tuple[int, int], new: str) -> None:
        first_key = len(self.keys)
        self.cursor = start
        if start != end:
            self.press(start, end, "", hunk)
        lines = _split_lines(new)
        if start[1] == 0 and start[0] > 0 and len(lines) > 1 and lines[-1][0] == "":
            above, above_break = self.line(start[0] - 1)
            if above_break == lines[-2][1]:  # type "\n" + text from the end of the line above
                self.cursor = (start[0] - 1, _width(above))
                lines = [("", above_break)] + lines[:-2] + [(lines[-2][0], "")]
        for i, (content, brk) in enumerate(lines):
            indent = content if not content.strip() else _indentation(content)
            rest = content[len(indent) :]
            if i == 0:
                at_indentation = not self.before_cursor().strip()
                self.type_chars(indent, hunk)
                if at_indentation and (indent or (len(self.keys) > first_key and self.keys[-1].cursor == self.cursor)):
                    self.probe(rest)
            elif content or not brk:  # a blank line in the middle waits for the next Enter to trim it
                auto = self.before_cursor()
                keep = common_prefix(auto, indent)
                if keep < len(auto):
                    self.press((self.cursor[0], keep), self.cursor, "", hunk)
                self.type_chars(indent[keep:], hunk)
                self.probe(rest)
            self.type_chars(rest, hunk)
            if brk:
                before = self.before_cursor()
                auto = _indentation(before)
                line = self.cursor[0]
                if i > 0 and not content and before == auto and auto:  # trim the blank line's auto-indent
                    self.press((line, 0), self.cursor, brk + auto, hunk)
                else:
                    self.press(self.cursor, self.cursor, brk + auto, hunk)


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


InFlight = list[tuple[int, asyncio.Future, KeyRecord]]  # (message id, its answer, its record): requests still open


async def type_session(client: LspClient, session: Session, *, interval_s: float, max_keys: int | None = None,
                       timeout_s: float = 300.0, hunk_pause_s: float = 0.0, prime_timeout_s: float = 0.0,
                       on_record: Callable[[KeyRecord], None] | None = None,
                       on_key: Callable[[int], None] | None = None,
                       on_prime: Callable[[float | None], None] | None = None,
                       ask_at: Collection[int] | None = None,
                       after_answer: Callable[[int], Awaitable[None]] | None = None) -> list[KeyRecord]:
    """Open `session`'s document, type its keystrokes, close it; one record per keystroke.

    `hunk_pause_s`: the wait before the first keystroke of each later hunk (a user moving to
    the next place to edit), instead of `interval_s`. With `prime_timeout_s` > 0, one request
    at the first keystroke's position is answered (waited for up to that long) before typing
    starts: the server has read the file, as an editor's idle server would have by the time
    the user types; it is not a keystroke's record, `on_prime` gets its latency in ms (None if
    it failed or timed out): the time to the first suggestion after opening. `on_key(i)` runs right after keystroke
    i's request is sent. A request still open `timeout_s` after the last keystroke (or, with
    interval 0, after its own) is marked timed out and cancelled, as the editor would on
    moving on; the document closes once every request has its answer (or after another
    `timeout_s`).

    `ask_at`: the keystrokes that get a request (None: every one); the others are sent as changes
    only, their records keep the outcome "unasked" (with interval 0 nothing waits for them).
    `after_answer(i)` (interval 0 only): awaited once keystroke i's request is answered (or timed
    out), before the next keystroke: a further request at the same spot, as a user who stops there.

    The steps (open_document, prime, type_keys, finish_requests, close_document) are public for a
    replay that types several open documents by turns.
    """
    open_document(client, session)
    records: list[KeyRecord] = []
    in_flight: InFlight = []
    keys = session.keys[:max_keys] if max_keys else session.keys
    if prime_timeout_s > 0 and keys:
        prime_ms = await prime(client, session, prime_timeout_s, max_keys)
        if on_prime is not None:
            on_prime(prime_ms)
    await type_keys(client, session, len(keys), records, in_flight, interval_s=interval_s, timeout_s=timeout_s,
                    hunk_pause_s=hunk_pause_s, on_record=on_record, on_key=on_key, ask_at=ask_at,
                    after_answer=after_answer)
    await finish_requests(client, in_flight, timeout_s)
    close_document(client, session)
    return records


def open_document(client: LspClient, session: Session) -> None:
    """didOpen `session`'s text at version 0 (its keystroke i is version i + 1)."""
    client.notify("textDocument/didOpen", {"textDocument": {
        "uri": session.uri, "languageId": session.language_id, "version": 0, "text": session.text}})


def close_document(client: LspClient, session: Session) -> None:
    """didClose `session`'s document."""
    client.notify("textDocument/didClose", {"textDocument": {"uri": session.uri}})


async def prime(client: LspClient, session: Session, timeout_s: float, max_keys: int | None = None) -> float | None:
    """One request at the first keystroke's position, waited for up to `timeout_s`: its latency in
    ms, None if it failed or timed out (typing goes on; the first keystrokes wait longer)."""
    keys = session.keys[:max_keys] if max_keys else session.keys
    if not keys:
        return None
    primed = time.perf_counter()
    with contextlib.suppress(TimeoutError, LspError):
        await client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": session.uri}, "position": _position(keys[0].start), "context": {"triggerKind": 2}},
            timeout=timeout_s)
        return 1000 * (time.perf_counter() - primed)
    return None


async def type_keys(client: LspClient, session: Session, stop: int, records: list[KeyRecord], in_flight: InFlight, *,
                    interval_s: float, timeout_s: float = 300.0, hunk_pause_s: float = 0.0,
                    on_record: Callable[[KeyRecord], None] | None = None,
                    on_key: Callable[[int], None] | None = None,
                    ask_at: Collection[int] | None = None,
                    after_answer: Callable[[int], Awaitable[None]] | None = None) -> None:
    """Type `session`'s keystrokes from the next one (`len(records)`: the document's records so far)
    up to `stop`, as type_session does, each one's record appended to `records`. `in_flight` holds
    the requests still open, of this document or others: each keystroke cancels those (the editor
    moved on), and its own request joins them."""
    if after_answer is not None and interval_s > 0:
        raise ValueError("type_keys: after_answer needs interval 0 (each request answered before the next key)")
    keys = session.keys
    for i in range(len(records), stop):
        key = keys[i]
        if i and hunk_pause_s > 0 and key.hunk != keys[i - 1].hunk:  # from the last keystroke (or answer)
            since = records[-1].sent_at if interval_s > 0 else time.perf_counter()
            await asyncio.sleep(max(0.0, since + hunk_pause_s - time.perf_counter()))
        elif i and interval_s > 0:
            await asyncio.sleep(max(0.0, records[-1].sent_at + interval_s - time.perf_counter()))
        sent = time.perf_counter()
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": session.uri, "version": i + 1},
            "contentChanges": [{"range": {"start": _position(key.start), "end": _position(key.end)}, "text": key.text}],
        })
        if ask_at is not None and i not in ask_at:
            records.append(KeyRecord(i, key.label, outcome="unasked", sent_at=sent))
            if on_key is not None:
                on_key(i)
            continue
        for msg_id, future, _ in in_flight:
            if not future.done():
                client.cancel(msg_id)
        msg_id, future = client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": session.uri}, "position": _position(key.cursor), "context": {"triggerKind": 2}})
        record = KeyRecord(i, key.label, sent_at=sent)
        records.append(record)
        in_flight[:] = [r for r in in_flight if not r[1].done()] + [(msg_id, future, record)]
        future.add_done_callback(lambda f, m=msg_id, s=sent, r=record: _finish(client, f, m, s, r, on_record))
        if on_key is not None:
            on_key(i)
        if interval_s <= 0:
            await asyncio.wait([future], timeout=timeout_s)
            record.timed_out = not future.done()
            if after_answer is not None:
                await after_answer(i)


async def finish_requests(client: LspClient, in_flight: InFlight, timeout_s: float) -> None:
    """Wait up to `timeout_s` for the requests still open; the ones that stay open are marked timed
    out and cancelled, then waited for once more (their cancellation's answer)."""
    late = [(m, f, r) for m, f, r in in_flight if not f.done()]
    if late:
        await asyncio.wait([f for _, f, _ in late], timeout=timeout_s)
    for msg_id, future, record in late:
        if not future.done():
            record.timed_out = True
            client.cancel(msg_id)
    if late:
        await asyncio.wait([f for _, f, _ in late], timeout=timeout_s)
    in_flight.clear()


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
