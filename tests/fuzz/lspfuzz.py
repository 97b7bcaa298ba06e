"""Random LSP sessions against a real `editkv lsp` process, checked against a model of the client.

`ClientModel` is what an editor knows: each open document's text as the server should have it
(kept with its own UTF-16 position arithmetic, written apart from edit_cache/positions.py so the
two can disagree), and whether the server should have put it out of sync (a change that did not
fit) or refused it (NUL bytes). `Fuzzer` draws operations (open, close, multi-range changes with
CRLF/LF mixes and astral characters, undo of the last change, out-of-range and inverted ranges,
version gaps, completions anywhere, cancels, requests superseded by a change, settings changes,
reloads), sends them over stdio, checks every answer, and after each operation asks
`editkv/debugDocument` whether the server's text, tokens, sync state and memory agree with the
model; every `kv_every` operations also whether the document's KV equals a fresh prefill after
refreshing it. Draws go through a `Draw` (hypothesis' data in the stateful tests, a seeded
random.Random in the long run), so both run the same operations.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from editkv.lsp_server.lsp_client import LspClient, LspError, server_command, server_env

INVALID_PARAMS, REQUEST_CANCELLED, REQUEST_FAILED = -32602, -32800, -32803
KV_TOLERANCE = 1e-3  # fp32 tiny model: PIE's re-rotation and chunking differ from a fresh prefill by ~1e-5
TIMEOUT_S = 120.0  # a request unanswered this long: the server is wedged
_WORD = re.compile(r"\w*\Z")  # (not "$", which also matches before a final newline)
PIECES = ["x", "y = 1", "def f(a, b):", "    return a", "\tpass", " ", "    ", "(", ")", "[", "]", ":", ".",
          "é", "✓", "😀", "𝔘𝔫", "\n", "\r\n", "\r", "\n\n", "# comment", "'''", "\"s\"", "class A:", "import os",
          "if x:\n    y()\n", "for i in range(3):\r\n    print(i)\r\n"]
TEXTS = ["", "x = 1\n", "def greet(name):\n    return 'hi ' + name\n",
         "class P:\r\n    def __init__(self, x):\r\n        self.x = x\r\n",
         "s = '😀 é ✓'\nt = '𝔘𝔫𝔦'\n\n", "a = [\n    1,\n    2,\n]\rb = 3\r\n"]


class Divergence(AssertionError):
    """The server disagrees with the client model (or did not answer)."""


# ---- the client's model of the text: its own UTF-16 position arithmetic -------------------------


def _lines(text: str) -> list[tuple[int, int]]:
    """(start, end of the line's body) per line; terminators are \\r\\n, \\r, \\n."""
    out, start, i = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            end = i
            i += 2 if text.startswith("\r\n", i) else 1
            out.append((start, end))
            start = i
        else:
            i += 1
    out.append((start, len(text)))
    return out


def _units(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def offset_of(text: str, line: int, character: int) -> int | None:
    """str index of a UTF-16 position: past the line's end = its end; inside a surrogate pair =
    that character's start; a line past the text's end: None (does not fit)."""
    lines = _lines(text)
    if line >= len(lines):
        return None
    start, end = lines[line]
    units = 0
    for i in range(start, end):
        w = _units(text[i])
        if units + w > character:
            return i
        units += w
    return end


def position_of(text: str, offset: int) -> tuple[int, int]:
    for n, (start, end) in enumerate(_lines(text)):
        if start <= offset <= end:
            return n, sum(_units(c) for c in text[start:offset])
    raise ValueError(offset)


def apply_changes(text: str, changes: list[tuple[tuple[int, int, int, int] | None, str]]) -> str | None:
    """The text after `changes` in order (ranges as (line, char, end line, end char)); None if one does not fit."""
    for rng, new in changes:
        if rng is None:
            text = new
            continue
        a, b = offset_of(text, rng[0], rng[1]), offset_of(text, rng[2], rng[3])
        if a is None or b is None or b < a:
            return None
        text = text[:a] + new + text[b:]
    return text


def _inverse(old: str, new: str, changes: list) -> list | None:
    """The change that turns `new` back into `old` (one incremental change only; None otherwise,
    or when the edit's ends fall inside a \r\n of the new text, where no position can name them)."""
    if len(changes) != 1 or changes[0][0] is None:
        return None
    rng, inserted = changes[0]
    a, b = offset_of(old, rng[0], rng[1]), offset_of(old, rng[2], rng[3])
    try:
        return [((*position_of(new, a), *position_of(new, a + len(inserted))), old[a:b])]
    except ValueError:
        return None


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


@dataclass
class ClientDoc:
    """One open document as the server should hold it."""

    uri: str
    text: str
    version: int = 0
    opened: str = ""
    out_of_sync: bool = False
    refused: bool = False
    undo: list[list] = field(default_factory=list)  # inverse changes of the changes applied, last last
    history: list = field(default_factory=list)  # every didChange since the didOpen (for reproducing a failure)

    def receive(self, changes: list) -> None:
        """What the server does with a didChange (lsp_server/worker.py `_change`)."""
        self.history.append(changes)
        if self.refused:
            return
        if self.out_of_sync:
            whole = [i for i, (rng, _) in enumerate(changes) if rng is None]
            if not whole:
                return
            changes = changes[whole[-1]:]
        new = apply_changes(self.text, changes)
        if new is None:
            self.out_of_sync = True
            self.undo.clear()
            return
        inverse = None if self.out_of_sync else _inverse(self.text, new, changes)
        if inverse is None:
            self.undo.clear()
        else:
            self.undo.append(inverse)
        self.out_of_sync = False
        self.text = new
        if "\x00" in new:
            self.refused = True


# ---- drawing -----------------------------------------------------------------------------------


class Draw:
    """Random choices: a seeded random.Random, or (subclass) hypothesis' data."""

    def __init__(self, rng) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: list) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.int(0, 999) < p * 1000


class HypothesisDraw(Draw):
    """Draws from hypothesis' `data` (so that failures shrink)."""

    def __init__(self, data) -> None:
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self.data.draw(st.integers(lo, hi))


# ---- the session -------------------------------------------------------------------------------


@dataclass
class Counters:
    ops: int = 0
    checks: int = 0
    kv_checks: int = 0
    kv_checks_all_layers: int = 0  # of documents within the model's context
    completions: int = 0
    errors_expected: int = 0
    out_of_sync: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    max_kv_diff: float = 0.0


class Session:
    """One `editkv lsp` process and an event loop to talk to it from synchronous code."""

    def __init__(self, *args: str, options: dict | None = None, env: dict | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.args, self.options = args, {"statsFile": False, "debounceMs": 0, **(options or {})}
        # suggestion statistics go to a temporary folder, not the user's cache; one intra-op thread
        # (as tests/conftest.py sets for the suite): on a busy 2-core machine a second one spinning
        # makes each tiny forward ten times slower
        self.env = {**server_env(), "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="editkv-fuzz-"),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self.client: LspClient = self.run(self._start())

    async def _start(self) -> LspClient:
        client = await LspClient.start(server_command(*self.args), env=self.env)
        await client.initialize(options=self.options)
        await client.wait_ready(300)
        return client

    def run(self, coro, timeout: float = TIMEOUT_S) -> Any:
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise Divergence(f"no answer in {timeout:.0f} s: the server is wedged; stderr:\n"
                             f"{self.client.stderr_text()[-3000:]}") from None

    def request(self, method: str, params: Any) -> Any:
        return self.run(self.client.request(method, params, timeout=TIMEOUT_S))

    def request_then(self, method: str, params: Any, then) -> Any:
        """Send a request, call `then(request id)` before anything else is read (a cancel, a
        change that supersedes it), then wait for the answer."""
        async def race():
            msg_id, future = self.client.send_request(method, params)
            then(msg_id)
            return await future

        return self.run(race())

    def close(self) -> int | None:
        code = self.run(self.client.close(timeout=60))  # (a loaded 2-core machine tears torch down slowly)
        self.loop.close()
        return code

    def rss_mb(self) -> float:
        with open(f"/proc/{self.client.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


SETTINGS = {
    "cacheMode": ["pie", "pie", "pie", "conflict", "prefix_reuse", "recompute"],
    "staleBudget": [0, 4, 64, 4096],
    "idleRefreshMs": [0, 1, 20, 1000],
    "kvBudgetMb": [0, 1, 1, 64],
    "maxTokens": [1, 2, 4, 8],
    "numDrafts": [1, 2, 3],
    "view": ["auto", "fim", "l2r"],
    "speculation": [True, False],
    "superposed": [True, False],
    "multiline": ["auto", "never", "always"],
}


class Fuzzer:
    """Draws operations, sends them, checks answers and invariants (see the module docstring)."""

    def __init__(self, session: Session, *, fake: bool, prefix: str = "file:///fuzz/", max_docs: int = 3,
                 kv_every: int = 0, reloads: bool = False) -> None:
        self.s = session
        self.fake = fake
        self.prefix = prefix
        self.max_docs = max_docs
        self.kv_every = kv_every
        self.reloads = reloads
        self.docs: dict[str, ClientDoc] = {}
        self.closed: list[str] = []
        self.names = 0
        self.settings: dict[str, Any] = dict(session.options)  # as the server has them
        self.device = "cpu"
        self.counters = Counters()
        self.log: list[str] = []  # the operations so far (printed on a divergence)
        self.dump: str | None = os.environ.get("EDITKV_FUZZ_DUMP")  # where a failure writes the documents' stories

    # ---- operations ---------------------------------------------------------------------------

    def step(self, draw: Draw) -> None:
        """One random operation (weighted), then the invariants."""
        if not self.docs:
            return self.op_open(draw)
        ops = [(self.op_change, 40), (self.op_undo, 6), (self.op_complete, 14), (self.op_cancel, 4),
               (self.op_supersede, 4), (self.op_open, 4), (self.op_close, 3), (self.op_configure, 3),
               (self.op_out_of_range, 3), (self.op_resync, 2)]
        if self.reloads:
            ops.append((self.op_reload, 1))
        total = sum(w for _, w in ops)
        pick = draw.int(0, total - 1)
        for op, weight in ops:
            if pick < weight:
                return op(draw)
            pick -= weight

    def _note(self, name: str, detail: Any = "") -> None:
        self.counters.ops += 1
        self.counters.by_op[name] = self.counters.by_op.get(name, 0) + 1
        self.log.append(f"{name} {detail}"[:400])
        if len(self.log) > 200:
            del self.log[:100]

    def _text(self, draw: Draw, pieces: int = 4) -> str:
        out = "".join(draw.choice(PIECES) for _ in range(draw.int(0, pieces)))
        if draw.chance(0.003):
            out += "\x00"
        return out

    def op_open(self, draw: Draw) -> None:
        if self.docs and draw.chance(0.15):  # a new didOpen of an open document starts it over (resyncs it)
            uri = draw.choice(sorted(self.docs))
        elif len(self.docs) >= self.max_docs:
            return self.op_close(draw)
        elif self.closed and draw.chance(0.5):
            uri = self.closed.pop(draw.int(0, len(self.closed) - 1))
        else:
            uri = f"{self.prefix}d{self.names}.py"
            self.names += 1
        text = draw.choice(TEXTS) + self._text(draw, 6)
        doc = self.docs[uri] = ClientDoc(uri, text, version=draw.int(0, 5), opened=text)
        doc.refused = "\x00" in text
        self._note("open", (uri, text))
        self.s.client.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": doc.version, "text": text}})
        self.check(doc)

    def op_close(self, draw: Draw) -> None:
        if not self.docs:
            return self.op_open(draw)
        uri = draw.choice(sorted(self.docs))
        self._note("close", uri)
        del self.docs[uri]
        self.closed.append(uri)
        self.s.client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        try:  # it is gone: the debug request must say so
            self.s.request("editkv/debugDocument", {"uri": uri})
        except LspError as err:
            if err.code != INVALID_PARAMS:
                raise Divergence(f"debugDocument of a closed document: {err}") from None
        else:
            raise Divergence(f"{uri} was closed but the server still has it")

    def _position(self, draw: Draw, text: str, fit: bool = True) -> tuple[int, int]:
        lines = _lines(text)
        line = draw.int(0, len(lines) - 1)
        start, end = lines[line]
        width = sum(_units(c) for c in text[start:end])
        character = draw.int(0, width + (2 if fit else 40))  # past the end: the end (LSP), inside a pair: snaps
        if not fit:
            line += draw.int(len(lines) - line, len(lines) - line + 3)
        return line, character

    def _range(self, draw: Draw, text: str) -> tuple[int, int, int, int]:
        a, b = self._position(draw, text), self._position(draw, text)
        if (offset_of(text, *a), a) > (offset_of(text, *b), b):
            a, b = b, a
        if draw.chance(0.4):
            b = a  # an insertion
        return (*a, *b)

    def _send_change(self, doc: ClientDoc, changes: list, draw: Draw) -> None:
        doc.version += draw.choice([1, 1, 1, 2, 7, -1])  # version gaps (and one going back) are not errors
        self.s.client.notify("textDocument/didChange", {
            "textDocument": {"uri": doc.uri, "version": doc.version},
            "contentChanges": [{"text": t} if r is None else {"range": _lsp_range(r), "text": t} for r, t in changes]})
        was = doc.out_of_sync
        doc.receive(changes)
        if doc.out_of_sync and not was:
            self.counters.out_of_sync += 1

    def op_change(self, draw: Draw) -> None:
        if not self.docs:
            return self.op_open(draw)
        doc = self.docs[draw.choice(sorted(self.docs))]
        text = doc.text
        changes = []
        for _ in range(draw.choice([1, 1, 1, 2, 3])):
            rng = self._range(draw, text)
            new = self._text(draw)
            changes.append((rng, new))
            text = apply_changes(text, [(rng, new)]) or text  # the next range is drawn on the text it applies to
        self._note("change", (doc.uri, changes))
        self._send_change(doc, changes, draw)
        self.check(doc)

    def op_undo(self, draw: Draw) -> None:
        """Undo-like reversal: the inverse of the document's last change (a typed word deleted, a deletion restored)."""
        candidates = [d for d in self.docs.values() if d.undo and not d.out_of_sync]
        if not candidates:
            return self.op_change(draw)
        doc = draw.choice(sorted(candidates, key=lambda d: d.uri))
        changes = doc.undo.pop()
        keep = list(doc.undo)
        self._note("undo", (doc.uri, changes))
        self._send_change(doc, changes, draw)
        doc.undo = keep  # (an undo is not itself undone)
        self.check(doc)

    def op_out_of_range(self, draw: Draw) -> None:
        """A change that does not fit: a line past the end, or an end before its start."""
        if not self.docs:
            return self.op_open(draw)
        doc = self.docs[draw.choice(sorted(self.docs))]
        if draw.chance(0.5):
            rng = (*self._position(draw, doc.text, fit=False), *self._position(draw, doc.text, fit=False))
        else:
            a, b = self._position(draw, doc.text), self._position(draw, doc.text)
            oa, ob = offset_of(doc.text, *a), offset_of(doc.text, *b)
            if oa == ob:
                rng = (*a, *_lines_past(doc.text))
            else:
                rng = (*b, *a) if oa < ob else (*a, *b)
        changes = [(self._range(draw, doc.text), self._text(draw))] if draw.chance(0.5) else []
        changes.append((rng, self._text(draw)))
        self._note("out_of_range", (doc.uri, changes))
        self._send_change(doc, changes, draw)
        self.check(doc)

    def op_resync(self, draw: Draw) -> None:
        """A full-text change (what an editor sends to resync), sometimes followed by incremental ones."""
        if not self.docs:
            return self.op_open(draw)
        doc = self.docs[draw.choice(sorted(self.docs))]
        text = draw.choice(TEXTS) + self._text(draw, 6)
        changes: list = [(None, text)]
        if draw.chance(0.5):
            changes.append((self._range(draw, text), self._text(draw)))
        if draw.chance(0.3):
            changes.insert(0, ((*_lines_past(doc.text), *_lines_past(doc.text)), "lost"))
        self._note("resync", (doc.uri, changes))
        self._send_change(doc, changes, draw)
        self.check(doc)

    def _completion_params(self, draw: Draw, doc: ClientDoc) -> tuple[str, dict, bool]:
        kind = draw.choice(["inline", "inline", "completion"])
        line, character = self._position(draw, doc.text, fit=not draw.chance(0.1))
        params: dict[str, Any] = {"textDocument": {"uri": doc.uri}, "position": {"line": line, "character": character}}
        invoked = kind == "inline" and draw.chance(0.3)
        if kind == "inline":
            params["context"] = {"triggerKind": 1 if invoked else 2}
        return kind, params, invoked

    def op_complete(self, draw: Draw) -> None:
        if not self.docs:
            return self.op_open(draw)
        closed = self.closed and draw.chance(0.05)
        doc = ClientDoc(self.closed[-1], "") if closed else self.docs[draw.choice(sorted(self.docs))]
        kind, params, invoked = self._completion_params(draw, doc)
        self._note("complete", (kind, params))
        method = "textDocument/inlineCompletion" if kind == "inline" else "textDocument/completion"
        try:
            result, error = self.s.request(method, params), None
        except LspError as err:
            result, error = None, err
        self.counters.completions += 1
        self.check_completion(doc, kind, params, invoked, result, error, closed=closed)
        if not closed:
            self.check(doc)

    def op_cancel(self, draw: Draw) -> None:
        """A request cancelled right after it was sent: an answer, or RequestCancelled."""
        if not self.docs:
            return self.op_open(draw)
        doc = self.docs[draw.choice(sorted(self.docs))]
        kind, params, invoked = self._completion_params(draw, doc)
        self._note("cancel", (kind, params))
        method = "textDocument/inlineCompletion" if kind == "inline" else "textDocument/completion"
        try:
            result, error = self.s.request_then(method, params, self.s.client.cancel), None
        except LspError as err:
            result, error = None, err
        if error is not None and error.code == REQUEST_CANCELLED:
            return self.check(doc)
        self.check_completion(doc, kind, params, invoked, result, error, dropped_ok=True)
        self.check(doc)

    def op_supersede(self, draw: Draw) -> None:
        """A request followed at once by a change to its document: answered for the old text, or dropped."""
        if not self.docs:
            return self.op_open(draw)
        doc = self.docs[draw.choice(sorted(self.docs))]
        before = ClientDoc(doc.uri, doc.text, out_of_sync=doc.out_of_sync, refused=doc.refused)
        kind, params, invoked = self._completion_params(draw, doc)
        method = "textDocument/inlineCompletion" if kind == "inline" else "textDocument/completion"
        rng = self._range(draw, doc.text)
        changes = [(rng, self._text(draw))]
        self._note("supersede", (kind, params, changes))
        try:
            result, error = self.s.request_then(method, params, lambda _: self._send_change(doc, changes, draw)), None
        except LspError as err:
            result, error = None, err
        self.check_completion(before, kind, params, invoked, result, error, dropped_ok=True)
        self.check(doc)

    def op_configure(self, draw: Draw) -> None:
        names = sorted(SETTINGS)
        picked = sorted({draw.choice(names) for _ in range(draw.int(1, 3))})
        change = {name: draw.choice(SETTINGS[name]) for name in picked}
        if draw.chance(0.1):
            change["maxTokens"] = "many"  # a bad value: reported, the current one kept
        self._note("configure", change)
        self.s.client.notify("workspace/didChangeConfiguration", {"settings": {"editkv": change}})
        self.settings.update({k: v for k, v in change.items() if v != "many"})  # (a bad value changes nothing)
        if self.docs:
            self.check(self.docs[draw.choice(sorted(self.docs))])

    def op_reload(self, draw: Draw) -> None:
        """A settings change that reloads the model ("auto" and "cpu" are the same device here,
        but a different key): documents survive, the old model is freed first."""
        self.device = "auto" if self.device == "cpu" else "cpu"
        self._note("reload", self.device)
        self.s.client.notify("workspace/didChangeConfiguration", {"settings": {"editkv": {"device": self.device}}})
        self.s.run(self.s.client.wait_ready(300))
        for doc in list(self.docs.values()):
            self.check(doc)

    # ---- checks -------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        if self.dump:  # every open document's story, to replay the failure
            with open(self.dump, "w") as out:
                json.dump({"message": message, "settings": self.settings, "log": self.log,
                           "docs": {u: {"opened": d.opened, "history": d.history} for u, d in self.docs.items()}},
                          out, indent=1)
        raise Divergence(f"{message}\nlast operations:\n  " + "\n  ".join(self.log[-12:]))

    def check(self, doc: ClientDoc) -> None:
        """The server's copy of `doc` against the model; its tokens, memory, and now and then its KV."""
        self.counters.checks += 1
        kv = bool(self.kv_every) and not self.fake and self.counters.ops % self.kv_every == 0
        got = self.s.request("editkv/debugDocument", {"uri": doc.uri, "kv": kv})
        if bool(got["refused"]) != doc.refused:
            self.fail(f"{doc.uri}: refused={got['refused']!r}, expected {doc.refused}")
        if doc.refused:
            return
        if bool(got["out_of_sync"]) != doc.out_of_sync:
            self.fail(f"{doc.uri}: out_of_sync={got['out_of_sync']!r}, expected {doc.out_of_sync}")
        if got["text_sha256"] != sha(doc.text):
            self.fail(f"{doc.uri}: the server's text differs from the client's ({got['text_length']} vs "
                      f"{len(doc.text)} chars)\nclient: {doc.text!r}")
        backend = got["backend"]
        if doc.out_of_sync or backend is None:
            return
        if backend["text_sha256"] != got["text_sha256"]:
            self.fail(f"{doc.uri}: the backend's text differs from the worker's")
        if self.fake:
            return
        if not (backend["tokens_fresh"] and backend["starts_fresh"]):
            self.fail(f"{doc.uri}: tokens differ from a fresh tokenization: {backend}")
        budget = backend["budget_bytes"]
        if budget is not None and backend["total_kv_bytes"] > budget and backend["encoded_documents"] > 1:
            self.fail(f"resident KV {backend['total_kv_bytes']} B over the budget {budget} B with "
                      f"{backend['encoded_documents']} documents encoded")
        if backend["graphs"] is not None and backend["graphs"] > backend["max_graphs"]:
            self.fail(f"{backend['graphs']} graphs held, bound {backend['max_graphs']}")
        if kv and backend.get("kv_layer0_max_diff") is not None:
            self.counters.kv_checks += 1
            layer0 = backend["kv_layer0_max_diff"]
            if not layer0 <= KV_TOLERANCE:
                self.fail(f"{doc.uri}: layer-0 KV differs from a fresh prefill by {layer0} "
                          f"({backend['tokens']} tokens)")
            diff = backend["kv_max_diff"]
            if diff is None:  # longer than the model's context: only layer 0 is exact by design
                return
            self.counters.kv_checks_all_layers += 1
            self.counters.max_kv_diff = max(self.counters.max_kv_diff, diff)
            if not diff <= KV_TOLERANCE:
                self.fail(f"{doc.uri}: KV differs from a fresh prefill by {diff} after refresh "
                          f"(mode {backend['mode']})")

    def check_completion(self, doc: ClientDoc, kind: str, params: dict, invoked: bool, result: Any,
                         error: LspError | None, *, closed: bool = False, dropped_ok: bool = False) -> None:
        """An answer, or the proper error, for the document as the model has it."""
        line, character = params["position"]["line"], params["position"]["character"]
        if closed:
            expected_error = INVALID_PARAMS
        elif doc.refused:
            expected_error = None
        elif doc.out_of_sync:
            expected_error = REQUEST_FAILED
        elif offset_of(doc.text, line, character) is None:
            expected_error = INVALID_PARAMS
        else:
            expected_error = None
        if error is not None:
            if error.code != expected_error:
                self.fail(f"{kind} at {line}:{character} of {doc.uri}: error {error.code} {error.message!r}, "
                          f"expected {expected_error or 'an answer'}")
            self.counters.errors_expected += 1
            return
        if expected_error is not None and not (dropped_ok and _empty(result)):
            self.fail(f"{kind} at {line}:{character}: answered {json.dumps(result)[:300]}, "
                      f"expected error {expected_error}")
        if _empty(result) or doc.refused:
            if doc.refused and not _empty(result):
                self.fail(f"a refused document got suggestions: {result}")
            return
        items = result["items"] if isinstance(result, dict) else result
        if kind == "inline" and len(items) > (self.settings.get("numDrafts", 3) if invoked else 1):
            self.fail(f"inline: {len(items)} items")
        offset = offset_of(doc.text, line, character)
        cursor = position_of(doc.text, offset)
        word = _WORD.search(doc.text[:offset]).group(0)
        for item in items:
            if kind == "inline":
                rng = item["range"]
                if (rng["start"]["line"], rng["start"]["character"]) != cursor:
                    self.fail(f"inline item at {rng['start']}, the cursor is at {cursor}")
                text = item["insertText"]
            else:
                edit = item["textEdit"]
                if (edit["range"]["end"]["line"], edit["range"]["end"]["character"]) != cursor:
                    self.fail(f"completion item ends at {edit['range']['end']}, the cursor is at {cursor}")
                if not edit["newText"].startswith(word):
                    self.fail(f"completion item {edit['newText']!r} does not start with the word {word!r}")
                text = edit["newText"][len(word):]
            fake = f"<fake {line}:{character}>"  # (post-processing may cut what repeats the text after the cursor)
            if self.fake and not (text.startswith(fake) or (text and fake.startswith(text))):
                self.fail(f"fake completion {text!r} for {line}:{character}")

    def check_all(self) -> None:
        for doc in list(self.docs.values()):
            self.check(doc)

    def close_all(self) -> None:
        for uri in list(self.docs):
            self.s.client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        self.docs.clear()


def _empty(result: Any) -> bool:
    if result is None:
        return True
    items = result.get("items") if isinstance(result, dict) else result
    return not items


def _lines_past(text: str) -> tuple[int, int]:
    return len(_lines(text)) + 2, 0


def _lsp_range(r: tuple[int, int, int, int]) -> dict:
    return {"start": {"line": r[0], "character": r[1]}, "end": {"line": r[2], "character": r[3]}}


def run_random(fuzzer: Fuzzer, rng, ops: int, *, progress_s: float = 0, on_progress=None) -> Counters:
    """`ops` operations drawn from `rng` (a random.Random), the invariants after each."""
    draw = Draw(rng)
    last = time.monotonic()
    while fuzzer.counters.ops < ops:
        fuzzer.step(draw)
        if on_progress is not None and progress_s and time.monotonic() - last > progress_s:
            last = time.monotonic()
            on_progress(fuzzer)
    fuzzer.check_all()
    return fuzzer.counters
