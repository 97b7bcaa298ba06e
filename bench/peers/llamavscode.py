"""llama.vscode's inline-completion client, rewritten in Python to drive llama-server in the replay bench.

What it owns: turning "document text + cursor" into llama.vscode's /infill requests, deciding, as
llama.vscode does, when to send one, when to answer from its own cache, and what to show of the
answer. What it refuses to know: the model and the server's internals (llama_server.py starts
the server; lsp_replay.py types the keystrokes and scores).

Data flow: LlamaVscodeClient looks like the part of LspClient that replay.type_session and
lsp_replay use (didOpen/didChange/didClose, inlineCompletion with $/cancelRequest, editkv/stats),
so the peer gets the same keystrokes, the same cancellation and the same latency clock as editkv:
  inlineCompletion(uri, cursor) ── wait while a request is in progress ── fim_context ──
  ResultCache.lookup ── (miss) POST /infill infill_payload(..., ring chunks) ── suggestion_lines ──
  should_discard ── update_suggestion ── the answer; then, in the background: prefetch_requests
  (the "future" suggestions), Ring.pick_near_cursor; every ring_update_ms: Ring.promote + a warm-up
  request (n_predict 0).

Facts taken from ggml-org/llama.vscode (src/completion.ts, src/llama-server.ts,
src/extra-context.ts, src/utils.ts, src/configuration.ts; defaults from package.json v0.0.12).
No code is copied; the rules are restated here and written anew:
- Settings defaults: n_prefix 256 lines, n_suffix 64 lines, n_predict 128, t_max_prompt_ms 500,
  t_max_predict_ms 500 (package.json; configuration.ts's field says 2500 but is overwritten by
  the setting), max_line_suffix 8, max_cache_keys 250, ring_n_chunks 16, ring_chunk_size 64,
  ring_scope 1024, ring_update_ms 1000; constants RING_UPDATE_MIN_TIME_LAST_COMPL 3000 ms,
  MAX_LAST_PICK_LINE_DISTANCE 32, MAX_QUEUED_CHUNKS 16, DELAY_BEFORE_COMPL_REQUEST 150 ms.
- Scheduling: no debounce and no HTTP abort. A call waits, polling every 150 ms, while an
  earlier request is in progress, and gives up (returns null) once VS Code has cancelled its
  token (a newer keystroke). A request already sent always runs to its end; VS Code throws a
  stale answer away. (llama.vim, by contrast, stops the previous curl job: `abort=True` models
  that by closing the HTTP connection of a cancelled request; llama.vscode's default is False.)
- Context: input_prefix = the n_prefix lines above the cursor line joined with "\\n", plus "\\n";
  prompt = the cursor line up to the cursor; input_suffix = the rest of the cursor line + "\\n" +
  the n_suffix lines below joined with "\\n" + "\\n"; n_indent = the cursor line's leading
  whitespace (sent only when > 0). An automatic trigger with more than max_line_suffix characters
  right of the cursor sends nothing (null).
- /infill body: input_prefix, input_suffix, input_extra (the ring's chunks {text, time,
  filename}), prompt, n_predict, top_k 40, top_p 0.99, stream false, samplers
  ["top_k", "top_p", "infill"], cache_prompt true, n_indent, t_max_prompt_ms, t_max_predict_ms.
  The ring warm-up request: empty prefix/suffix/prompt, the chunks, n_predict 0, samplers [],
  cache_prompt true, t_max_predict_ms 1.
- Answer: content split at "\\r?\\n", trailing blank lines dropped; discarded (nothing shown)
  when empty, when a one-line answer is blank or equals the line's suffix, or when it repeats
  the document below the cursor (the rules in should_discard); then cut: with non-blank text
  right of the cursor, only the first line, minus that text if it ends with it.
- Result cache: an LRU of max_cache_keys entries keyed by input_prefix|input_suffix|prompt; a
  lookup also tries every shorter prompt whose cached answer starts with the characters typed
  since, and answers the rest of it (typing along a suggestion costs no request). After a
  shown answer with a blank line suffix, two entries are prefetched in the background: the
  answer for "first line accepted" (a request; not serialized with the in-progress flag) and,
  for multi-line answers, the rest after accepting the first line (no request).
- Ring buffer: chunks of at most ring_chunk_size/2 lines (a random window of longer texts; at
  least 3 lines) are queued; every ring_update_ms, if no completion started in the last
  3000 ms, one queued chunk moves into the ring (at most ring_n_chunks, oldest out) and a
  warm-up request goes out. After each answer, if the cursor moved more than 32 lines since the
  last pick, a chunk from [line - ring_scope, line - n_prefix] and one from
  [line + n_suffix, line + n_suffix + ring_chunk_size] are queued. Files visited before typing
  (here: the record's cross-file context files) give a chunk each, evicting chunks more than
  0.9 Jaccard-similar (by lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from editkv.edit_cache.positions import Position, Range, apply_change

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # how VS Code splits a document into lines
_ANSWER_BREAK = re.compile(r"\r?\n")  # how llama.vscode splits an answer


@dataclass(frozen=True)
class Settings:
    """llama.vscode's completion settings and constants (defaults: package.json v0.0.12)."""

    n_prefix: int = 256
    n_suffix: int = 64
    n_predict: int = 128
    t_max_prompt_ms: int = 500
    t_max_predict_ms: int = 500
    max_line_suffix: int = 8
    max_cache_keys: int = 250
    ring_n_chunks: int = 16
    ring_chunk_size: int = 64
    ring_scope: int = 1024
    ring_update_ms: int = 1000
    ring_idle_ms: int = 3000  # RING_UPDATE_MIN_TIME_LAST_COMPL
    max_pick_distance: int = 32  # MAX_LAST_PICK_LINE_DISTANCE
    max_queued_chunks: int = 16  # MAX_QUEUED_CHUNKS
    wait_poll_ms: int = 150  # DELAY_BEFORE_COMPL_REQUEST
    abort: bool = False  # not llama.vscode: close a cancelled request's connection (llama.vim stops its job)

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown llama.vscode setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# ---- requests -----------------------------------------------------------------------------------


def document_lines(text: str) -> list[str]:
    """The document's lines without terminators, as VS Code's lineAt(i).text gives them."""
    return _LINE_BREAK.split(text)


def utf16_index(line: str, column: int) -> int:
    """Python index of UTF-16 column `column` in `line` (JS string slicing counts UTF-16 units)."""
    units = 0
    for i, ch in enumerate(line):
        if units >= column:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(line)


@dataclass(frozen=True)
class FimContext:
    """What one request is built from: the text around the cursor, cut as llama.vscode cuts it."""

    input_prefix: str
    input_suffix: str
    prompt: str  # the cursor line up to the cursor
    line_suffix: str  # the cursor line after the cursor
    n_indent: int  # leading whitespace of the cursor line

    @property
    def key(self) -> str:
        return cache_key(self.input_prefix, self.input_suffix, self.prompt)


def fim_context(lines: list[str], line: int, column: int, settings: Settings) -> FimContext:
    """The local context at (line, UTF-16 column) of a document split by document_lines."""
    above = lines[max(0, line - settings.n_prefix) : line]
    below = lines[line + 1 : min(len(lines) - 1, line + settings.n_suffix) + 1]
    text = lines[line]
    cut = utf16_index(text, column)
    return FimContext(
        input_prefix="\n".join(above) + "\n",
        input_suffix=text[cut:] + "\n" + "\n".join(below) + "\n",
        prompt=text[:cut],
        line_suffix=text[cut:],
        n_indent=len(text) - len(text.lstrip()),
    )


def infill_payload(input_prefix: str, input_suffix: str, prompt: str, chunks: list[dict], n_indent: int,
                   settings: Settings) -> dict:
    """The JSON body of llama.vscode's /infill completion request."""
    body: dict[str, Any] = {
        "input_prefix": input_prefix, "input_suffix": input_suffix, "input_extra": list(chunks), "prompt": prompt,
        "n_predict": settings.n_predict, "top_k": 40, "top_p": 0.99, "stream": False,
        "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
    }
    if n_indent:  # llama.vscode leaves the field out when it is 0
        body["n_indent"] = n_indent
    body["t_max_prompt_ms"] = settings.t_max_prompt_ms
    body["t_max_predict_ms"] = settings.t_max_predict_ms
    return body


def warm_payload(chunks: list[dict], settings: Settings) -> dict:
    """The body of the ring-buffer update request: the chunks processed, nothing generated."""
    return {"input_prefix": "", "input_suffix": "", "input_extra": list(chunks), "prompt": "", "n_predict": 0,
            "samplers": [], "cache_prompt": True, "t_max_prompt_ms": settings.t_max_prompt_ms, "t_max_predict_ms": 1}


# ---- answers ------------------------------------------------------------------------------------


def suggestion_lines(content: str) -> list[str]:
    """An answer's lines, trailing blank lines dropped."""
    lines = _ANSWER_BREAK.split(content)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def should_discard(suggestion: list[str], lines: list[str], line: int, line_prefix: str, line_suffix: str) -> bool:
    """True when llama.vscode shows nothing for these suggestion lines: blank, or a repeat of the text
    right of or below the cursor. A rule that reads past the document's end fails in llama.vscode
    (lineAt throws) and its error path shows nothing too."""
    try:
        return _discard(suggestion, lines, line, line_prefix, line_suffix)
    except IndexError:
        return True


def _discard(suggestion: list[str], lines: list[str], line: int, line_prefix: str, line_suffix: str) -> bool:
    def line_at(i: int) -> str:
        if not 0 <= i < len(lines):
            raise IndexError(i)
        return lines[i]

    if not suggestion or (len(suggestion) == 1 and not suggestion[0].strip()):
        return True
    if line == len(lines) - 1:
        return False
    rest = suggestion[1:]
    if (len(suggestion) > 1 and suggestion[0].strip() in ("", line_suffix.strip())
            and all(s == line_at(line + 1 + i) for i, s in enumerate(rest))):
        return True
    if len(suggestion) == 1 and suggestion[0] == line_suffix:
        return True
    below = line + 1
    while below < len(lines) and not lines[below].strip():
        below += 1
    if below >= len(lines):
        return False
    if line_prefix + suggestion[0] == lines[below]:
        if len(suggestion) == 1:
            return True
        if len(suggestion) == 2 and suggestion[1] == line_at(below + 1)[: len(suggestion[1])]:
            return True
        if len(suggestion) > 2 and all(s == line_at(below + 1 + i) for i, s in enumerate(rest)):
            return True
    return False


def update_suggestion(suggestion: list[str], line_suffix: str) -> str:
    """What is shown: with text right of the cursor only the first line (less that text when it ends
    with it), else every line."""
    if line_suffix.strip():
        if suggestion[0].endswith(line_suffix):
            return suggestion[0][: len(suggestion[0]) - len(line_suffix)]
        if len(suggestion) > 1:
            return suggestion[0]
    return "\n".join(suggestion)


# ---- result cache -------------------------------------------------------------------------------


def cache_key(input_prefix: str, input_suffix: str, prompt: str) -> str:
    return input_prefix + "|" + input_suffix + "|" + prompt


class ResultCache:
    """llama.vscode's LRU of shown answers, keyed by prefix|suffix|prompt."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key: str, value: str) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def lookup(self, input_prefix: str, input_suffix: str, prompt: str) -> str | None:
        """The answer for this context: cached as is, or the rest of an answer cached at a shorter
        prompt that the characters typed since agree with."""
        hit = self.get(cache_key(input_prefix, input_suffix, prompt))
        if hit is not None:
            return hit
        for i in range(len(prompt), -1, -1):
            typed = prompt[i:]
            hit = self.get(cache_key(input_prefix, input_suffix, prompt[:i]))
            if hit is not None and hit[: len(typed)] == typed:
                return hit[len(typed) :]
        return None


@dataclass(frozen=True)
class Prefetch:
    """A cache entry llama.vscode fills after showing an answer: `content` known, or asked for with
    `prompt` and `n_indent` when None."""

    input_prefix: str
    input_suffix: str
    prompt: str
    n_indent: int = 0
    content: str | None = None

    @property
    def key(self) -> str:
        return cache_key(self.input_prefix, self.input_suffix, self.prompt)


def prefetches(ctx: FimContext, suggestion: list[str], n_prefix: int) -> list[Prefetch]:
    """The "future" entries after showing `suggestion` at `ctx`, in llama.vscode's order: the answer
    once the whole suggestion is accepted (a request), then, for several lines, the rest once the
    first line is accepted (known)."""
    prefix, prompt = ctx.input_prefix, ctx.prompt + suggestion[0]
    if len(suggestion) > 1:
        prefix = ctx.input_prefix + ctx.prompt + "\n".join(suggestion[:-1]) + "\n"
        prompt = suggestion[-1]
        kept = _ANSWER_BREAK.split(prefix[:-1])
        if len(kept) > n_prefix:
            prefix = "\n".join(kept[len(kept) - n_prefix :]) + "\n"
    out = [Prefetch(prefix, ctx.input_suffix, prompt, n_indent=len(ctx.prompt) - len(ctx.prompt.lstrip()))]
    if len(suggestion) > 1:
        out.append(Prefetch(ctx.input_prefix + ctx.prompt + suggestion[0] + "\n", ctx.input_suffix, "",
                            content="\n".join(suggestion[1:])))
    return out


# ---- ring buffer of extra context ---------------------------------------------------------------


def jaccard(a: list[str], b: list[str]) -> float:
    """Jaccard similarity of two chunks' sets of lines."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


@dataclass
class Ring:
    """The chunks sent as input_extra, and the queue they wait in."""

    settings: Settings
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    chunks: list[dict] = field(default_factory=list)
    chunk_lines: list[list[str]] = field(default_factory=list)
    queued: list[dict] = field(default_factory=list)
    queued_lines: list[list[str]] = field(default_factory=list)
    last_pick_line: int = -9999
    evicted: int = 0

    def pick(self, lines: list[str], filename: str, evict: bool, now_ms: float) -> None:
        """Queue a chunk of `lines`: all of them when short, else a random window of half a chunk."""
        s = self.settings
        if s.ring_n_chunks <= 0 or len(lines) < 3:
            return
        half = s.ring_chunk_size // 2
        if len(lines) + 1 < s.ring_chunk_size:
            picked = list(lines)
        else:
            start = int(self.rng.random() * max(0, len(lines) - half + 1))
            picked = lines[start : min(start + half, len(lines))]
        text = "\n".join(picked) + "\n"
        if evict:
            if any(c["text"] == text for c in self.chunks + self.queued):
                return
            for i in range(len(self.chunks) - 1, -1, -1):
                if jaccard(self.chunk_lines[i], picked) > 0.9:
                    del self.chunks[i], self.chunk_lines[i]
                    self.evicted += 1
            for i in range(len(self.queued) - 1, -1, -1):
                if jaccard(self.queued_lines[i], picked) > 0.9:
                    del self.queued[i], self.queued_lines[i]
                    self.evicted += 1
        if len(self.queued) >= s.max_queued_chunks:
            del self.queued[0], self.queued_lines[0]
        self.queued.append({"text": text, "time": int(now_ms), "filename": filename})
        self.queued_lines.append(picked)

    def promote(self) -> bool:
        """Move the oldest queued chunk into the ring (oldest ring chunks out); False if none queued."""
        if not self.queued:
            return False
        self.chunks.append(self.queued.pop(0))
        self.chunk_lines.append(self.queued_lines.pop(0))
        while len(self.chunks) > self.settings.ring_n_chunks:
            del self.chunks[0], self.chunk_lines[0]
        return True

    def pick_near_cursor(self, lines: list[str], line: int, filename: str, now_ms: float) -> None:
        """After an answer: once the cursor moved far enough, queue a chunk from well above the prefix
        and one from just below the suffix."""
        s = self.settings
        if abs(line - self.last_pick_line) <= s.max_pick_distance:
            return
        last = len(lines) - 1
        self.pick(lines[max(0, line - s.ring_scope) : max(0, line - s.n_prefix) + 1], filename, False, now_ms)
        lo, hi = min(last, line + s.n_suffix), min(last, line + s.n_suffix + s.ring_chunk_size)
        self.pick(lines[lo : hi + 1], filename, False, now_ms)
        self.last_pick_line = line


# ---- the client ---------------------------------------------------------------------------------


class PeerError(Exception):
    """llama-server answered with an error, or the connection failed."""


@dataclass
class InfillCall:
    """One HTTP request to llama-server and what it cost."""

    kind: str  # "keystroke", "prefetch" or "ring"
    prompt_n: int | None  # prompt tokens the server processed (timings.prompt_n)
    cache_n: int | None  # prompt tokens it took from its cache (timings.cache_n)
    predicted_n: int | None
    ms: float
    aborted: bool = False


@dataclass
class _Token:
    """VS Code's CancellationToken for one inline-completion call, and the connection to abort."""

    cancelled: bool = False
    writer: asyncio.StreamWriter | None = None


class LlamaVscodeClient:
    """The part of LspClient the replay uses, answered as llama.vscode answers VS Code, by llama-server."""

    def __init__(self, host: str, port: int, settings: Settings, description: str = "llama-server") -> None:
        self.host, self.port = host, port
        self.settings = settings
        self.description = description
        self.arrived: dict[int | str, float] = {}
        self.calls: list[InfillCall] = []  # every HTTP request; the bench takes them record by record
        self.cache_hits = 0
        self._docs: dict[str, str] = {}
        self._tokens: dict[int, _Token] = {}
        self._next_id = 0
        self._in_progress = False
        self._tasks: set[asyncio.Task] = set()
        self._results = ResultCache(settings.max_cache_keys)  # one LRU for the whole editor, as in llama.vscode
        self._ring = Ring(settings)
        self._ring_task: asyncio.Task | None = None
        self._last_start = 0.0
        self._prompt_tokens = 0
        self._group = 0  # prompt tokens of the latest foreground request and the background work it started

    # -- the record's cross-file context -----------------------------------------------------------

    def begin_record(self, files: list[tuple[str, str]], seed: str) -> None:
        """A fresh ring holding a chunk of each file visited before typing (as after idle ring updates),
        and a warm-up request for it, as the last ring update sends."""
        self._ring = Ring(self.settings, random.Random(seed))
        now = time.time() * 1000
        for path, text in files:
            self._ring.pick(document_lines(text), path, True, now)
        while self._ring.promote():
            pass
        if self._ring.chunks:
            self._spawn(self._warm())
        if self._ring_task is None:
            self._ring_task = asyncio.get_running_loop().create_task(self._ring_updates())

    # -- LspClient's surface -----------------------------------------------------------------------

    def notify(self, method: str, params: Any = None) -> None:
        doc = params["textDocument"]
        if method == "textDocument/didOpen":
            self._docs[doc["uri"]] = doc["text"]
        elif method == "textDocument/didChange":
            text = self._docs[doc["uri"]]
            for change in params["contentChanges"]:
                rng = change.get("range")
                text = apply_change(text, Range(Position(**rng["start"]), Position(**rng["end"])) if rng else None,
                                    change["text"])[0]
            self._docs[doc["uri"]] = text
        elif method == "textDocument/didClose":
            self._docs.pop(doc["uri"], None)

    def send_request(self, method: str, params: Any = None) -> tuple[int, asyncio.Future]:
        self._next_id += 1
        msg_id = self._next_id
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if method == "editkv/stats":
            self.arrived[msg_id] = time.perf_counter()
            future.set_result(self._stats())
        elif method == "textDocument/inlineCompletion":
            token = self._tokens[msg_id] = _Token()
            pos = params["position"]
            automatic = params.get("context", {}).get("triggerKind", 2) == 2
            self._spawn(self._answer(msg_id, future, params["textDocument"]["uri"], pos["line"], pos["character"],
                                     automatic, token))
        else:
            future.set_exception(PeerError(f"the llama.vscode peer does not serve {method}"))
        return msg_id, future

    async def request(self, method: str, params: Any = None, timeout: float = 60.0) -> Any:
        if method == "editkv/stats":  # the bench reads it once the record's work is done: wait for it all
            await self.idle(timeout)
            return self._stats()
        msg_id, future = self.send_request(method, params)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self.cancel(msg_id)
            raise

    def cancel(self, msg_id: int) -> None:
        token = self._tokens.get(msg_id)
        if token is None:
            return
        token.cancelled = True
        if self.settings.abort and token.writer is not None:
            token.writer.close()

    def messages(self, method: str = "window/showMessage") -> list[Any]:
        return []

    async def idle(self, timeout: float = 600.0) -> None:
        """Until every request this client started has ended."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))

    async def close(self, timeout: float = 10.0) -> None:
        if self._ring_task is not None:
            self._ring_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ring_task
        await self.idle(timeout)

    # -- llama.vscode's provider -------------------------------------------------------------------

    async def _answer(self, msg_id: int, future: asyncio.Future, uri: str, line: int, column: int, automatic: bool,
                      token: _Token) -> None:
        try:
            result = await self._provide(uri, line, column, automatic, token)
        except Exception as err:  # noqa: BLE001 (the bench records it as the request's error)
            result = err
        self._tokens.pop(msg_id, None)
        self.arrived[msg_id] = time.perf_counter()
        if not future.done():
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _provide(self, uri: str, line: int, column: int, automatic: bool, token: _Token) -> dict | None:
        s = self.settings
        while self._in_progress:
            await asyncio.sleep(s.wait_poll_ms / 1000)
            if token.cancelled:
                return None
        self._in_progress = True
        try:
            self._last_start = time.monotonic()
            lines = document_lines(self._docs[uri])
            ctx = fim_context(lines, line, column, s)
            if automatic and len(ctx.line_suffix) > s.max_line_suffix:
                return None
            cache = self._results
            content = cache.lookup(ctx.input_prefix, ctx.input_suffix, ctx.prompt)
            cached = content is not None
            if cached:
                self.cache_hits += 1
            else:
                if token.cancelled:
                    return None
                self._group = 0
                try:
                    data = await self._post("keystroke", infill_payload(ctx.input_prefix, ctx.input_suffix, ctx.prompt,
                                                                        self._ring.chunks, ctx.n_indent, s), token)
                except PeerError:
                    return {"items": []}  # llama.vscode's error path shows nothing
                if data is None:  # aborted (abort=True only)
                    return None
                content = data.get("content")
            if content is None or not content.strip():
                return {"items": []}
            suggestion = suggestion_lines(content)
            if should_discard(suggestion, lines, line, ctx.prompt, ctx.line_suffix):
                return {"items": []}
            shown = update_suggestion(suggestion, ctx.line_suffix)
            if not cached:
                cache.put(ctx.key, shown)
            self._spawn(self._after(uri, ctx, suggestion, lines, line, token))
            return {"items": [{"insertText": shown}]}
        finally:
            self._in_progress = False

    async def _after(self, uri: str, ctx: FimContext, suggestion: list[str], lines: list[str], line: int,
                     token: _Token) -> None:
        """What llama.vscode does right after returning an answer (its setTimeout(..., 0))."""
        await asyncio.sleep(0)
        cache = self._results
        if not token.cancelled and not ctx.line_suffix.strip():
            for item in prefetches(ctx, suggestion, self.settings.n_prefix):
                if cache.get(item.key) is not None:
                    continue
                content = item.content
                if content is None:
                    try:
                        data = await self._post("prefetch", infill_payload(
                            item.input_prefix, item.input_suffix, item.prompt, self._ring.chunks, item.n_indent,
                            self.settings))
                    except PeerError:
                        continue
                    if data is None or not (data.get("content") or "").strip():
                        continue
                    content = "\n".join(suggestion_lines(data["content"]))
                cache.put(item.key, content)
        if not token.cancelled:
            self._ring.pick_near_cursor(lines, line, uri, time.time() * 1000)

    async def _ring_updates(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.ring_update_ms / 1000)
            if self._ring.queued and time.monotonic() - self._last_start >= s.ring_idle_ms / 1000:
                self._ring.promote()
                self._spawn(self._warm())

    async def _warm(self) -> None:
        with contextlib.suppress(PeerError):
            await self._post("ring", warm_payload(self._ring.chunks, self.settings))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stats(self) -> dict:
        return {"backend": {"description": self.description, "encoded_tokens": self._prompt_tokens,
                            "idle_refreshed_tokens": 0, "last_request": {"encoded_tokens": self._group}}}

    # -- HTTP --------------------------------------------------------------------------------------

    async def _post(self, kind: str, body: dict, token: _Token | None = None) -> dict | None:
        """POST /infill; the answer's JSON, or None if the connection was closed by an abort."""
        started = time.perf_counter()
        payload = json.dumps(body).encode()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as err:
            raise PeerError(f"llama-server at {self.host}:{self.port}: {err}") from None
        if token is not None:
            token.writer = writer
        head = (f"POST /infill HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + payload)
            await writer.drain()
            raw = await reader.read()
        except (ConnectionError, OSError):
            raw = b""
        finally:
            writer.close()
            if token is not None:
                token.writer = None
        if not raw and token is not None and token.cancelled and self.settings.abort:
            self.calls.append(InfillCall(kind, None, None, None, 1000 * (time.perf_counter() - started), True))
            return None
        status, data = parse_response(raw)
        timings = data.get("timings") or {} if isinstance(data, dict) else {}
        prompt_n = timings.get("prompt_n")
        self.calls.append(InfillCall(kind, prompt_n, timings.get("cache_n"), timings.get("predicted_n"),
                                     1000 * (time.perf_counter() - started)))
        if prompt_n:
            self._prompt_tokens += prompt_n
            self._group += prompt_n
        if status != 200:
            raise PeerError(f"llama-server answered {status}: {str(data)[:300]}")
        return data


def parse_response(raw: bytes) -> tuple[int, Any]:
    """Status and JSON body of a whole HTTP/1.1 response (Content-Length or chunked)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise PeerError(f"llama-server closed the connection without an answer ({len(raw)} bytes)")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    try:
        return status, json.loads(body) if body else {}
    except json.JSONDecodeError:
        return status, {"error": body[:300].decode("utf-8", "replace")}
