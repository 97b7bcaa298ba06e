"""Realedits typed into `editkv lsp` as an editor types them: latency, work and suggestion quality per setting.

Data flow:
  records ── select_cases: tokens of `before` (the model's tokenizer) -> file-size bucket; line of
             the first edit typed -> position third; a subset spread over both ──> Case
  Case ──── replay.editor_session (an editor with auto-indent) ──> keystrokes + LineProbes
  per pace, per record, per method (one `editkv lsp` process per method, its settings sent as
  initializationOptions; the method order rotates record by record, so machine noise falls on all):
      didOpen `before`, one untimed request (the file read once, as idle work would have by the
      time the user starts typing), then replay.type_session: per keystroke a didChange, an
      automatic inlineCompletion (triggerKind 2) and `$/cancelRequest` for one still open;
      `editkv/stats` right after each keystroke reads the server's running count of tokens it
      ran through the model (requests, plus idle refresh): differences -> tokens per keystroke
  ──> KeyRow per keystroke, LineRow per scored line ── summarize: per pace, method and group
  (all, file-size bucket, edit position), ratios against `full` from the same run ──> tables, JSON.

Paces: "service" sends each keystroke once the last one is answered (service time); "human"
types one every --interval-ms and pauses --hunk-pause-ms before each later hunk, so the
server's debounce, dropping and idle refresh do their work as in an editor. "lines" (quality
only, not in "both") types every keystroke as a change but asks for a suggestion only at the
scored lines, each waited for: the suggestion quality of many lines at little cost, with the
cache state the typing left (its latencies are not a pace's).

--dropdown (lines pace only; off by default): at each scored line, once its inline request is
answered, a `textDocument/completion` request at the same position as an editor's explicit
invocation (triggerKind 1), waited for (up to --timeout, then cancelled) before typing goes on.
editkv answers it with up to `numDrafts` drafts (beam search where CUDA graphs replay, superposed
decoding on the CPU; a method's settings can pin `numDrafts` and `beamSearch`, e.g.
--methods default --method-settings 'superposed={"beamSearch": false}'). Each item is applied as
an editor applies it (its textEdit: editkv's replaces the word before the cursor with the word
plus the draft; else insertText at the cursor) and its first line scored as the inline suggestion
is, against the line the user then typed (dropdown_score). Per pace, method and group: requests,
answered, items per answer, latency p50 / p95 (request sent -> answer, answered only), first
item's EM, best-of-k EM (any item exact) and best ES, the last three over every request. JSON:
"dropdown" (those rows) and "dropdown_lines" (one per scored line). Peers get no dropdown. The
dropdown's model work joins its keystroke's tokens per keystroke.

"hop" (issue 24; not in "both") keeps many files open and moves between them, as a user working
across a project does: --docs records (default 50, the spread subset below, so files of every
size; replaces --limit) are opened at once, each under a URI of its own, and each read once by
an untimed request; then round robin, each document's turn types its next --keys-per-turn
keystrokes (5) at the human pace (--interval-ms, --hunk-pause-ms within a document; the first
keystroke of a turn --hop-pause-ms after the turn before, default --interval-ms), each with its
automatic request, which cancels the requests still open, the previous document's too; --rounds
rounds (4), a document sitting its turns out once its keystrokes (up to --max-keys) are typed.
One server per method, the methods one after another. Besides the usual table (round 1 is the
warm-up: every document's first requests), per method: p50 / p95 / p99 and p95 / p50 over every
keystroke and after round 1, and the same without the answers that continue the ghost text shown
before less the key typed (typed along: "others", the keys the model answered); CUDA graphs
captured after round 1 and in all (the server's running
count, `graph_captures` in editkv/stats, which idle captures join; the JSON also sums the sampled
requests' own `graph_captures`); the device memory editkv/stats reports (allocated, the allocator's
peak, the KV pool's buffer; None off CUDA), sampled with the stats poll of each turn's last
keystroke: first, max, last and the spread (max - min) after round 1. Flat memory: last about
first, a spread near 0. JSON: "hop", per method. Peers are left out; cross-file companion files
are not opened (the other open documents are there to be used).

Reported per pace, method and group: keystrokes; answered (a suggestion, or an empty answer),
dropped (the server answered null: a newer keystroke superseded the request), cancelled
(RequestCancelled after our $/cancelRequest), late (answered after the next keystroke was
sent: the editor had moved on and showed nothing); latency from keystroke sent to answer,
answered requests only; tokens per keystroke: what the server ran through the model between
this keystroke's and the next one's (the last one's: until the server is idle again), i.e.
prefill, repair, refreshes, idle refresh and the view's own tokens, not generated tokens; from
`editkv/stats` (backend.encoded_tokens + backend.idle_refreshed_tokens, counted when a request
ends, so a group's mean is exact and a single keystroke's value may include work the one
before it started); "vs full": full's value / this method's, same pace and group.

Quality: at each LineProbe (the cursor at the end of a typed line's indentation, see
replay.editor_session) the ghost text the editor would show, i.e. the first line of the answer
to that keystroke's request if it came before the next keystroke (else nothing), against the
rest of the line the user then typed: exact match, edit similarity (1 - Levenshtein / longer
length, characters) and characters saved (the longest prefix of the typed text the suggestion
gets right: what accepting it up to its first wrong character saves). Blank and comment-only
lines are not scored.

Default subset (--order spread): records round-robin over the size buckets (< 4k, 4k-16k,
> 16k tokens; dev.jsonl.gz has 234 / 363 / 3 records in them). The k-th record of bucket b
(b = 0, 1, 2) is wanted at position (top, middle, bottom third)[(k + b) % 3], so 9 records
spread over every bucket x position; it is the bucket's first record, in sha256(id) order
(mixes the repositories), at that position with a line to score within --max-keys
keystrokes, else the first with such a line elsewhere, else its first at that position.
--order file takes records in file order.

Peers (issue 23): a method whose settings name a "peer" is not `editkv lsp`. "llama" starts
llama.cpp's llama-server (build b11434, bench/peers/llama_server.py builds it) on 127.0.0.1 with
llama.vscode's launch flags (-b 1024 -ub 1024 --cache-reuse 256, -c --peer-ctx, -t --threads,
-ngl 99 on CUDA) and the same GGUF as --model, and drives it with bench/peers/llamavscode.py, a
rewrite of llama.vscode's client (its context limits, /infill body, in-progress wait, result
cache, prefetches, discard rules and ring buffer: that module's docstring). The peer gets the
same keystrokes through the same type_session: its "dropped" are calls llama.vscode gave up (a
newer keystroke while it waited, or too much text right of the cursor), latency is keystroke ->
its answer as for editkv (answers from its own cache count, at their near-zero latency), and
tokens per keystroke are the prompt tokens llama-server processed (timings.prompt_n, over the
keystroke's requests, prefetches and ring updates). Its ring buffer starts each record with a
chunk of each of the record's cross-file context files (--crossfile), as llama.vscode's would
after the user visited them. editkv gets the same files only in a method whose settings turn
`crossFile` on: they are opened beside the record's file and read once before it. A further table gives the
peer's prompt tokens per keystroke request, answers from its cache and background requests.

The editor: methods talk to `editkv lsp` as a bare LSP client (Neovim, any LSP editor) unless
their settings say `"client": "vscode"` (the method "vscode": the defaults so): then requests go
through bench/vscode_client.py, the VS Code extension's typing along, which answers a request
that types the ghost text in the editor, without the server (the JSON's editor_answers counts
them) — the like-for-like comparison with llama.vscode, whose cache answers count the same way.

    python bench/lsp_replay.py --limit 6 --max-keys 40 --pace human --methods full,default --timeout 60
    python bench/lsp_replay.py --limit 4 --max-keys 40 --pace human --methods default,llama \
        --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf --threads 2
    python bench/lsp_replay.py --pace lines --dropdown --limit 9 --methods default \
        --method-settings 'superposed={"beamSearch": false}' --device cuda --json dropdown.json
    python bench/lsp_replay.py --pace hop --docs 50 --rounds 4 --keys-per-turn 5 --methods default,full \
        --device cuda --model qwen2.5-coder-0.5b-instruct-q4.gguf --json hop.json
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from common import edit_similarity, exact_match, load_records, machine, parser, table, write_json
from editkv.edit_cache.positions import Position, Range, apply_change, common_prefix, to_offset, to_position
from editkv.lsp_server.backend import DEVICE_STATS
from editkv.lsp_server.lsp_client import LspClient, LspError, server_command, server_env
from editkv.lsp_server.replay import (
    CANCELLED,
    InFlight,
    KeyRecord,
    Keystroke,
    Session,
    close_document,
    editor_session,
    finish_requests,
    open_document,
    prime,
    type_keys,
    type_session,
)
from editkv.lsp_server.stats import percentile
from peers.llama_server import BUILD as PEER_BUILD
from peers.llama_server import LlamaServer, binary
from peers.llama_server import PeerError as PeerStartError
from peers.llamavscode import LlamaVscodeClient, Settings
from vscode_client import ExtensionClient

METHODS: dict[str, dict] = {
    "default": {},  # the server's defaults, whatever they are
    "full": {"cacheMode": "recompute"},  # the document's KV dropped before every request: the baseline
    "prefix_reuse": {"cacheMode": "prefix_reuse"},  # re-encode from the first changed token (llama.cpp, vLLM)
    "pie": {"cacheMode": "pie"},  # PIE repair, pinned even if the default changes
    "llama": {"peer": "llama-server"},  # llama-server driven as llama.vscode drives it (bench/peers/)
    # the server's defaults behind editkv's VS Code extension: typing along answered in the editor
    # (bench/vscode_client.py), as llama.vscode answers from its own cache
    "vscode": {"client": "vscode"},
}
CLIENT = "client"  # "vscode": the method's requests go through the extension's typing along; not a server setting
PEER = "peer"  # a method whose settings name a peer is not `editkv lsp`; its other settings are llama.vscode's
# (bench/peers/llamavscode.Settings), and "threads": the server's -t for this method (default --threads)
BASELINE = "full"
BUCKETS = (("<4k", 4096), ("4-16k", 16384), (">16k", None))  # tokens of `before`, upper bounds exclusive
POSITIONS = ("top", "middle", "bottom")
PACES = ("service", "human", "lines", "hop")
ANSWERED = ("shown", "empty")
WARM_URI = "file:///lsp_replay/warm_up.py"
STARTS: list[dict] = []  # each editkv server's start: seconds to ready after initialize, its warm-up
WARM_TEXT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


class BenchError(Exception):
    """Something the user has to fix (a model that does not load, a bad setting)."""


@dataclass(frozen=True)
class Method:
    """A name for a set of server settings (initializationOptions)."""

    name: str
    settings: dict


@dataclass(frozen=True)
class Pace:
    """How fast keystrokes come: interval 0 = each after the last answer."""

    name: str
    interval_ms: float
    hunk_pause_ms: float


@dataclass
class Case:
    """One record ready to replay."""

    record_id: str
    session: Session
    tokens: int
    bucket: str
    position: str
    context: list[tuple[str, str]] = field(default_factory=list)  # (path, text) of cross-file files (wants_context)


@dataclass
class Where:
    """Where a row was measured: the pace, the method, the record and its file-size / edit-position groups."""

    pace: str
    method: str
    record: str
    bucket: str
    position: str


@dataclass
class ScoredLine(Where):
    """A scored line of one replay: the keystroke it was asked at and the line the user then typed."""

    key: int
    expected: str


@dataclass
class KeyRow(Where):
    """One keystroke of one replay."""

    index: int
    label: str
    outcome: str  # replay.KeyRecord outcomes: shown, empty, dropped, cancelled, error, pending
    latency_ms: float | None
    late: bool  # answered after the next keystroke was sent: the editor had moved on
    timed_out: bool
    encoded_tokens: int | None  # tokens the server encoded from this keystroke to the next
    round: int | None = None  # hop pace: the round it was typed in (1 = warm-up)
    # hop pace: the answer is the ghost text shown before, less what this keystroke typed (typed
    # along: the server's cache of it, or the model writing the same)
    continued: bool = False


@dataclass
class OpenRow(Where):
    """The first request after a record's file was opened (untimed among the keystrokes)."""

    tokens: int
    first_ms: float | None  # didOpen's request at the first keystroke's position -> its answer


@dataclass
class LineRow(ScoredLine):
    """One scored line of one replay."""

    suggestion: str  # the first line of what was shown ("" when nothing was)
    shown: bool
    em: float
    es: float
    saved: int


@dataclass
class DropdownRow(ScoredLine):
    """The dropdown (textDocument/completion, invoked) at one scored line of one replay (--dropdown)."""

    outcome: str  # "answered" (a list, maybe empty), "cancelled", "error", "timed_out"
    latency_ms: float | None  # request sent -> its answer
    items: int  # the answer's items (0 unless answered)
    texts: list[str]  # each item's first line as it reads once applied (see dropdown_score), in the server's order
    first_em: float
    best_em: float  # 1 when any item is exact
    best_es: float
    first_saved: int


@dataclass(frozen=True)
class LineScore:
    """A suggestion's first line against the rest of the line the user typed."""

    em: float
    es: float
    saved: int


# ---- scoring ------------------------------------------------------------------------------------


def chars_saved(suggestion: str, typed: str) -> int:
    """Characters of `typed` that accepting `suggestion` up to its first wrong character gives."""
    return common_prefix(suggestion, typed)


def score_line(suggestion: str, typed: str) -> LineScore:
    """EM, ES and characters saved of a suggestion's first line for the typed rest of a line."""
    first = suggestion.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
    typed = typed.rstrip()
    return LineScore(exact_match(first, typed), edit_similarity(first, typed), chars_saved(first.rstrip(), typed))


def item_edit(item: dict, cursor: dict) -> tuple[dict, dict, str]:
    """(start, end, new text) of a CompletionItem as an editor applies it: its textEdit (the `insert`
    range of an InsertReplaceEdit, an editor's default), else insertText or label at the cursor (no
    word range guessed; editkv always sends a textEdit). Snippet syntax is taken as plain text
    (editkv's items are PlainText)."""
    edit = item.get("textEdit")
    if edit is not None:
        rng = edit.get("range") or edit["insert"]
        return rng["start"], rng["end"], edit["newText"]
    text = item.get("insertText")
    return cursor, cursor, item["label"] if text is None else text


def dropdown_score(item: dict, text: str, cursor: dict, typed: str) -> tuple[str, LineScore]:
    """A dropdown item applied to the document `text` (cursor at `cursor`, LSP UTF-16) against the
    rest of the line the user then typed: (the item's first line as compared, its score).

    The comparison starts where the item's edit starts, or at the cursor if later: an item that
    replaces the word before the cursor (editkv's: the word plus the suggestion) is compared, from
    the word's start, with that word plus `typed`; an item inserted at the cursor is scored exactly
    as score_line scores inline ghost text. Text right of the cursor is left out on both sides (as
    for the inline suggestion). Characters saved do not count the ones already left of the cursor."""
    start, end, new = item_edit(item, cursor)
    s, e, c = (to_offset(text, Position(p["line"], p["character"])) for p in (start, end, cursor))
    result = (text[c:s] if s > c else "") + new + (text[e:c] if e < c else "")
    base = min(s, c)
    score = score_line(result, text[base:c] + typed)
    first = result.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
    return first, replace(score, saved=max(0, score.saved - (c - base)))


# ---- which records ------------------------------------------------------------------------------


def bucket_of(tokens: int) -> str:
    for name, bound in BUCKETS:
        if bound is None or tokens < bound:
            return name
    raise AssertionError("the last bucket has no bound")


def position_of(record: dict) -> str:
    """Third of `before` (by line) where the first edit typed starts (edits go bottom to top)."""
    lines = max(1, record["before"].count("\n") + 1)
    line = record["edits"][0]["range"]["start"]["line"]
    return POSITIONS[min(2, 3 * line // lines)]


def select_cases(records: list[dict], tokens: list[int], limit: int | None, order: str = "spread",
                 useful: Callable[[int], bool] = lambda i: True) -> list[int]:
    """Indices of the records to replay (see the module docstring for the rule); `useful(i)`: record i
    has a line to score (asked lazily, in preference order)."""
    if order == "file":
        return list(range(len(records)))[:limit]
    key = {i: hashlib.sha256(r["id"].encode()).hexdigest() for i, r in enumerate(records)}
    left = {name: sorted((i for i in range(len(records)) if bucket_of(tokens[i]) == name), key=key.get)
            for name, _ in BUCKETS}
    taken: dict[str, int] = {name: 0 for name, _ in BUCKETS}
    out: list[int] = []
    want = len(records) if limit is None else min(limit, len(records))
    while len(out) < want:
        for b, (name, _) in enumerate(BUCKETS):
            if not left[name] or len(out) >= want:
                continue
            position = POSITIONS[(taken[name] + b) % 3]
            ranked = sorted(left[name], key=lambda i, p=position: position_of(records[i]) != p)  # stable
            pick = next((i for i in ranked if useful(i)), ranked[0])
            left[name].remove(pick)
            taken[name] += 1
            out.append(pick)
    return out


def token_counter(model: str | None) -> Callable[[list[str]], list[int]]:
    """Token counts of texts with `model`'s tokenizer (the embedded model's when None)."""
    from editkv.engine.loading import DEFAULT_MODEL_DIR

    path = Path(model) if model else DEFAULT_MODEL_DIR
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from editkv.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        return lambda texts: [len(ids) for ids in tok.encode_batch(texts)]
    from transformers import AutoTokenizer  # a .gguf file or a hub id

    hf = (AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if path.suffix == ".gguf"
          else AutoTokenizer.from_pretrained(str(model)))
    return lambda texts: [len(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]


def build_cases(records: list[dict], count: Callable[[list[str]], list[int]], limit: int | None,
                order: str, max_keys: int | None) -> list[Case]:
    tokens = count([r["before"] for r in records])
    sessions: dict[int, Session] = {}

    def session(i: int) -> Session:
        if i not in sessions:
            sessions[i] = editor_session(records[i])
        return sessions[i]

    def useful(i: int) -> bool:
        return any(max_keys is None or p.key < max_keys for p in session(i).probes)

    return [Case(records[i]["id"], session(i), tokens[i], bucket_of(tokens[i]), position_of(records[i]))
            for i in select_cases(records, tokens, limit, order, useful)]


# ---- the servers --------------------------------------------------------------------------------


async def start_server(args, method: Method, cache_home: str) -> LspClient | ExtensionClient:
    """`editkv lsp` with `method`'s settings, model loaded and warmed up; BenchError on bad settings."""
    flags = ["--device", args.device] + (["--model", args.model] if args.model else [])
    flags += (["--dtype", args.dtype] if args.dtype else []) + (["--fake"] if args.fake else [])
    env = server_env()
    env["XDG_CACHE_HOME"] = cache_home  # statsFile keeps its default without writing to the user's cache
    client = await LspClient.start(server_command(*flags), env=env)
    settings = {k: v for k, v in method.settings.items() if k != CLIENT}
    if method.settings.get(CLIENT, "lsp") not in ("lsp", "vscode"):
        await client.close()
        raise BenchError(f"method {method.name}: client must be lsp or vscode, not {method.settings[CLIENT]!r}")
    await client.initialize(options=settings or None)
    started = time.perf_counter()
    try:
        ready = await client.wait_ready()
    except LspError as err:
        await client.close()
        raise BenchError(f"the server could not load the model: {err.message}") from None
    problems = [m["message"] for m in client.messages() if "editkv." in m.get("message", "")]
    if problems:
        await client.close()
        raise BenchError(f"method {method.name} {json.dumps(method.settings)}: {problems[0]}")
    STARTS.append({"method": method.name, "ready_s": round(time.perf_counter() - started, 2),
                   "warm_up": ready["backend"].get("warm_up")})  # the load's warm-up: what it took
    print(f"{method.name}: ready in {STARTS[-1]['ready_s']} s, warm-up {STARTS[-1]['warm_up']}", file=sys.stderr)
    await settle(client)
    return ExtensionClient(client) if method.settings.get(CLIENT) == "vscode" else client


async def start_peer(args, method: Method, servers: list[LlamaServer]) -> LlamaVscodeClient:
    """llama-server on 127.0.0.1 (llama.vscode's launch flags, the same GGUF) and a llama.vscode client for it."""
    try:
        settings = Settings.from_dict({k: v for k, v in method.settings.items() if k not in (PEER, "threads")})
    except (TypeError, ValueError) as err:
        raise BenchError(f"method {method.name}: {err}") from None
    cuda = args.device.startswith("cuda")
    exe = Path(args.peer_bin) if args.peer_bin else binary(cuda)
    if not exe.is_file():
        raise BenchError(f"no llama-server at {exe}: build it with `python bench/peers/llama_server.py build"
                         f"{' --cuda' if cuda else ''}` or pass --peer-bin")
    if not args.model or not str(args.model).endswith(".gguf"):
        raise BenchError(f"method {method.name} needs --model FILE.gguf (llama-server reads GGUF only)")
    log = Path(args.peer_log).with_suffix(f".{method.name}.log") if args.peer_log else None  # one per peer method
    server = LlamaServer(exe, Path(args.model), ctx=args.peer_ctx, threads=method.settings.get("threads", args.threads),
                         gpu_layers=99 if cuda else None, log=log)
    servers.append(server)
    try:
        await asyncio.to_thread(server.start)
    except PeerStartError as err:
        raise BenchError(str(err)) from None
    flags = " ".join(server.cmd[server.cmd.index("-c"):])
    client = LlamaVscodeClient("127.0.0.1", server.port, settings,
                               description=f"llama-server {PEER_BUILD} {Path(args.model).name} ({flags})")
    await settle(client)
    return client


async def start_servers(args, methods: list[Method], cache_home: str,
                        servers: list[LlamaServer]) -> dict[str, LspClient | LlamaVscodeClient]:
    """One server per method, started side by side (loading overlaps); all or none. Peers' processes
    go to `servers` (the caller stops them)."""
    for method in methods:
        what = method.settings[PEER] if PEER in method.settings else "editkv lsp"
        print(f"starting {what} for {method.name} {json.dumps(method.settings)} ...", file=sys.stderr)
    started = await asyncio.gather(*(start_peer(args, m, servers) if PEER in m.settings
                                     else start_server(args, m, cache_home) for m in methods), return_exceptions=True)
    failed = [s for s in started if isinstance(s, BaseException)]
    if failed:
        for client in started:
            if isinstance(client, LspClient | LlamaVscodeClient | ExtensionClient):
                await client.close()
        raise failed[0]
    return {m.name: c for m, c in zip(methods, started, strict=True)}


async def open_context(client: LspClient, case: Case, timeout_s: float) -> list[str]:
    """A method with `crossFile` on: the record's cross-file context files opened in editkv, beside
    the record's file (its repository's folder), and each read once by an untimed request at its
    end (as a user's earlier visit would have); their uris, to close after the record."""
    root = case.session.uri[: case.session.uri.rfind("/realedits/") + len("/realedits/")]
    repo = case.record_id.split("@")[0]
    uris = []
    for path, text in case.context:
        uri = f"{root}{repo}/{path}"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 0,
                                                                "text": text}})
        at = to_position(text, len(text))
        end = {"line": at.line, "character": at.character}
        await client.request("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": end,
                             "context": {"triggerKind": 2}}, timeout=timeout_s)
        uris.append(uri)
    return uris


def wants_context(method: Method) -> bool:
    """Whether a method is given the records' cross-file context files: llama.vscode's ring
    buffer, or editkv with `crossFile` on."""
    return PEER in method.settings or bool(method.settings.get("crossFile"))


async def settle(client: LspClient, timeout_s: float = 600.0) -> None:
    """One request on a small throwaway document: first-call costs land here, and it queues behind
    whatever the engine worker still does (cancelled requests finish their repair first), so the
    next replay, on this server or another, starts on an idle one."""
    client.notify("textDocument/didOpen", {"textDocument": {"uri": WARM_URI, "languageId": "python", "version": 0,
                                                            "text": WARM_TEXT}})
    await client.request("textDocument/inlineCompletion", {"textDocument": {"uri": WARM_URI},
                         "position": {"line": 4, "character": 0}, "context": {"triggerKind": 2}}, timeout=timeout_s)
    client.notify("textDocument/didClose", {"textDocument": {"uri": WARM_URI}})


def _encoded_so_far(stats: dict) -> int | None:
    backend = stats["backend"]
    if backend.get("encoded_tokens") is None:  # the fake backend encodes nothing
        return None
    return backend["encoded_tokens"] + backend.get("idle_refreshed_tokens", 0)


async def _settled_stats(client: LspClient, timeout_s: float) -> tuple[dict, int | None]:
    """The server's stats once its work is done, and its encoded-token count less settle's own
    request: work still running for a replay (a repair is not interrupted) ends before settle's
    request runs; settle's tokens (the last request the server served) are not the replay's."""
    await settle(client)
    final = await client.request("editkv/stats", timeout=timeout_s)
    end = _encoded_so_far(final)
    if end is not None:
        end -= (final["backend"]["last_request"] or {}).get("encoded_tokens", 0)
    return final, end


async def replay_case(client: LspClient, method: Method, case: Case, pace: Pace, args,
                      opens: list[OpenRow] | None = None, requests: list[dict] | None = None,
                      dropdown: list[DropdownRow] | None = None) -> tuple[list[KeyRow], list[LineRow]]:
    """Type one record into one server at one pace; its keystroke and line rows (the first
    request after opening goes to `opens`; the per-request stats the server reported after the
    keystrokes, each once, to `requests`). With `dropdown` (lines pace only): after each scored
    line's inline request, a dropdown request at the same spot, waited for, its row to `dropdown`."""
    polls: list[asyncio.Future] = []
    where = (pace.name, method.name, case.record_id, case.bucket, case.position)
    answers: dict[int, tuple[str, float | None, list[dict]]] = {}

    async def ask_dropdown(i: int) -> None:
        answers[i] = await request_dropdown(client, case.session.uri, case.session.keys[i].cursor, args.timeout)

    lines_pace = pace.name == "lines"
    records = await type_session(
        client, case.session, interval_s=pace.interval_ms / 1000, max_keys=args.max_keys, timeout_s=args.timeout,
        hunk_pause_s=pace.hunk_pause_ms / 1000, prime_timeout_s=max(args.timeout, 600.0),
        on_key=lambda i: polls.append(client.send_request("editkv/stats")[1]),
        on_prime=lambda ms: opens.append(OpenRow(*where, case.tokens, ms)) if opens is not None else None,
        ask_at={p.key for p in case.session.probes} if lines_pace else None,
        after_answer=ask_dropdown if lines_pace and dropdown is not None else None)
    if dropdown is not None:
        dropdown += _dropdown_rows(where, case.session, answers)
    _, end = await _settled_stats(client, args.timeout)
    snapshots = await asyncio.gather(*polls)
    counts = [_encoded_so_far(s) for s in snapshots] + [end]
    if requests is not None:
        _served_rows(snapshots, [{"pace": pace.name, "method": method.name, "record": case.record_id}] * len(snapshots),
                     requests)
    keys = []
    for i, r in enumerate(records):
        late = r.outcome in ANSWERED and pace.name != "lines" and _late(records, i)
        tokens = counts[i + 1] - counts[i] if counts[i] is not None and counts[i + 1] is not None else None
        if r.outcome != "unasked":
            keys.append(KeyRow(*where, i, r.label, r.outcome, r.latency_ms, late, r.timed_out, tokens))
    return keys, _line_rows(where, case.session, records, {k.index: k.late for k in keys})


async def request_dropdown(client: LspClient, uri: str, cursor: tuple[int, int],
                           timeout_s: float) -> tuple[str, float | None, list[dict]]:
    """textDocument/completion at `cursor` as an editor's explicit invocation (triggerKind 1),
    waited for up to `timeout_s` (then cancelled): (outcome, latency in ms, the items)."""
    position = {"line": cursor[0], "character": cursor[1]}
    sent = time.perf_counter()
    msg_id, future = client.send_request("textDocument/completion", {
        "textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 1}})
    await asyncio.wait([future], timeout=timeout_s)
    if not future.done():
        client.cancel(msg_id)
        await asyncio.wait([future], timeout=timeout_s)
        return "timed_out", None, []
    latency = 1000 * (client.arrived.get(msg_id, time.perf_counter()) - sent)
    if future.cancelled():
        return "error", None, []
    if (err := future.exception()) is not None:
        return "cancelled" if isinstance(err, LspError) and err.code == CANCELLED else "error", None, []
    result = future.result()
    items = (result.get("items") or []) if isinstance(result, dict) else (result or [])  # CompletionList or a list
    return "answered", latency, items


def _dropdown_rows(where: tuple, session: Session,
                   answers: dict[int, tuple[str, float | None, list[dict]]]) -> list[DropdownRow]:
    """The dropdown answers at the scored lines (`answers`: keystroke -> request_dropdown's answer),
    each item applied to the document as it was after that keystroke and scored (dropdown_score)."""
    rows = []
    text, applied = session.text, 0
    for probe in session.probes:
        if probe.key not in answers:
            continue
        for key in session.keys[applied : probe.key + 1]:  # the document after the probe's keystroke
            text = apply_change(text, Range(Position(*key.start), Position(*key.end)), key.text)[0]
        applied = probe.key + 1
        outcome, latency, items = answers[probe.key]
        cursor = session.keys[probe.key].cursor
        scored = [dropdown_score(item, text, {"line": cursor[0], "character": cursor[1]}, probe.expected)
                  for item in items]
        scores = [score for _, score in scored]
        rows.append(DropdownRow(*where, probe.key, probe.expected, outcome, latency, len(items),
                                [first for first, _ in scored], scores[0].em if scores else 0.0,
                                max((x.em for x in scores), default=0.0), max((x.es for x in scores), default=0.0),
                                scores[0].saved if scores else 0))
    return rows


def _served_rows(snapshots: list[dict], labels: list[dict], requests: list[dict]) -> None:
    """The per-request stats in `editkv/stats` snapshots (its last request finished), each request
    once, with the labels of the keystroke whose poll it was, to `requests`."""
    seen = set()
    for snap, label in zip(snapshots, labels, strict=True):
        last = snap["backend"].get("last_request")
        mark = json.dumps(last, sort_keys=True)
        if last and "total_ms" in last and mark not in seen:
            seen.add(mark)
            requests.append({**label, **last})


def _line_rows(where: tuple, session: Session, records: list[KeyRecord], late_at: dict[int, bool]) -> list[LineRow]:
    """The scored lines among the keystrokes typed (`records`): what was shown there, against the line."""
    lines = []
    for probe in session.probes:
        if probe.key >= len(records):
            continue
        r = records[probe.key]
        shown = r.outcome == "shown" and not late_at.get(probe.key, False)
        suggestion = r.suggestions[0] if shown else ""
        score = score_line(suggestion, probe.expected)
        lines.append(LineRow(*where, probe.key, probe.expected, suggestion.split("\n", 1)[0], shown,
                             score.em, score.es, score.saved))
    return lines


def hop_sessions(cases: list[Case]) -> list[Session]:
    """The cases' sessions, each under a URI of its own (two records of one file share a path)."""
    return [replace(c.session, uri=f"file:///lsp_replay/hop/{k:03d}/{c.session.uri.rsplit('/realedits/', 1)[-1]}")
            for k, c in enumerate(cases)]


async def replay_hop(client: LspClient, method: Method, cases: list[Case], pace: Pace, args,
                     opens: list[OpenRow], requests: list[dict]) -> tuple[list[KeyRow], list[LineRow], dict]:
    """The hop pace on one server: every case's document open at once, then --keys-per-turn keystrokes
    of each in turn, round robin, for --rounds rounds (a document whose keystrokes, up to --max-keys,
    are all typed sits its turns out). Keystrokes go as type_session sends them (the pace's interval;
    each cancels the requests still open, the last one of the document left behind too); the first of
    a turn waits --hop-pause-ms after the turn before. Its keystroke and line rows, and its summary
    (summarize_hop) with the device memory after every turn (the stats poll of its last keystroke)."""
    sessions = hop_sessions(cases)
    stops = [min(len(s.keys), args.max_keys) if args.max_keys else len(s.keys) for s in sessions]
    hop_pause_s = (pace.interval_ms if args.hop_pause_ms is None else args.hop_pause_ms) / 1000
    start = (await client.request("editkv/stats", timeout=args.timeout))["backend"]
    for session in sessions:
        open_document(client, session)
    for case, session in zip(cases, sessions, strict=True):  # each read once, as in the other paces
        ms = await prime(client, session, max(args.timeout, 600.0), args.max_keys)
        opens.append(OpenRow(pace.name, method.name, case.record_id, case.bucket, case.position, case.tokens, ms))
    records: list[list[KeyRecord]] = [[] for _ in sessions]
    in_flight: InFlight = []
    sent: list[tuple[int, int]] = []  # (document, keystroke) in the order sent, one stats poll each
    polls: list[asyncio.Future] = []
    turns: list[tuple[int, int, int]] = []  # (round, document, its last keystroke's place in `sent`)

    def on_key(d: int, i: int) -> None:
        sent.append((d, i))
        polls.append(client.send_request("editkv/stats")[1])

    for r in range(1, args.rounds + 1):
        for d, session in enumerate(sessions):
            stop = min(stops[d], r * args.keys_per_turn)
            if len(records[d]) >= stop:
                continue
            if sent:
                last = records[sent[-1][0]][-1].sent_at
                await asyncio.sleep(max(0.0, last + hop_pause_s - time.perf_counter()))
            await type_keys(client, session, stop, records[d], in_flight, interval_s=pace.interval_ms / 1000,
                            timeout_s=args.timeout, hunk_pause_s=pace.hunk_pause_ms / 1000,
                            on_key=lambda i, d=d: on_key(d, i))
            turns.append((r, d, len(sent) - 1))
    await finish_requests(client, in_flight, args.timeout)
    final, end = await _settled_stats(client, args.timeout)
    opened = sum(s.uri in final["documents"] for s in sessions)  # open on the server at the end
    for session in sessions:
        close_document(client, session)
    snapshots = await asyncio.gather(*polls)
    counts = [_encoded_so_far(s) for s in snapshots] + [end]

    def round_of(i: int) -> int:
        return i // args.keys_per_turn + 1

    _served_rows(snapshots, [{"pace": pace.name, "method": method.name, "record": cases[d].record_id,
                              "round": round_of(i)} for d, i in sent], requests)
    keys: list[KeyRow] = []
    for j, (d, i) in enumerate(sent):
        case, r = cases[d], records[d][i]
        following = records[sent[j + 1][0]][sent[j + 1][1]].sent_at if j + 1 < len(sent) else None
        late = (r.outcome in ANSWERED and following is not None and r.latency_ms is not None
                and r.sent_at + r.latency_ms / 1000 > following)
        tokens = counts[j + 1] - counts[j] if counts[j] is not None and counts[j + 1] is not None else None
        keys.append(KeyRow(pace.name, method.name, case.record_id, case.bucket, case.position, i, r.label, r.outcome,
                           r.latency_ms, late, r.timed_out, tokens, round_of(i),
                           continues(records[d], sessions[d].keys, i)))
    late_at: list[dict[int, bool]] = [{} for _ in sessions]
    for (d, i), k in zip(sent, keys, strict=True):
        late_at[d][i] = k.late
    lines = []
    for d, (case, session) in enumerate(zip(cases, sessions, strict=True)):
        lines += _line_rows((pace.name, method.name, case.record_id, case.bucket, case.position), session,
                            records[d], late_at[d])
    samples = [{"round": r, "record": cases[d].record_id,
                **{name: snapshots[j]["backend"].get(name) for name in DEVICE_STATS}} for r, d, j in turns]
    captures = _hop_captures(start, final["backend"], [snapshots[j]["backend"] for r, _, j in turns if r == 1][-1:])
    served = [q for q in requests if q["pace"] == pace.name and q["method"] == method.name]
    summary = summarize_hop(keys, samples, captures, served)
    summary.update(documents=len(sessions), opened=opened, rounds=max((r for r, _, _ in turns), default=0),
                   keys_per_turn=args.keys_per_turn, hop_pause_ms=1000 * hop_pause_s,
                   document_tokens=[c.tokens for c in cases])
    return keys, lines, summary


def continues(records: list[KeyRecord], keys: list[Keystroke], i: int) -> bool:
    """Whether keystroke `i`'s answer is the suggestion shown after keystroke i - 1 less the text
    keystroke i typed (what typing along gives; a model writing the same counts too)."""
    if i == 0 or records[i].outcome != "shown" or records[i - 1].outcome != "shown":
        return False
    typed, before = keys[i].text, records[i - 1].suggestions
    if keys[i].start != keys[i].end or not typed or not before or not records[i].suggestions:
        return False
    return before[0].startswith(typed) and records[i].suggestions[0] == before[0][len(typed):]


def _hop_captures(start: dict, final: dict, first_round_end: list[dict]) -> dict:
    """CUDA graphs captured over the replay and after its first round, from the server's running
    count (`graph_captures` in editkv/stats: requests' and idle captures; None without graphs), less
    the one request settle sent after the replay."""
    def count(backend: dict) -> int | None:
        return backend.get("graph_captures")

    end = count(final)
    if end is not None:
        end -= (final.get("last_request") or {}).get("graph_captures", 0)
    warm = count(first_round_end[0]) if first_round_end else None
    return {"all": end - count(start) if end is not None and count(start) is not None else None,
            "after_round1": end - warm if end is not None and warm is not None else None}


def _late(records: list[KeyRecord], i: int) -> bool:
    r = records[i]
    if i + 1 >= len(records) or r.latency_ms is None or r.sent_at is None or records[i + 1].sent_at is None:
        return False
    return r.sent_at + r.latency_ms / 1000 > records[i + 1].sent_at


# ---- summaries ----------------------------------------------------------------------------------


def groups_of(row: Where) -> list[str]:
    return ["all", f"size {row.bucket}", f"pos {row.position}"]


def summarize(keys: list[KeyRow], lines: list[LineRow], baseline: str = BASELINE) -> list[dict]:
    """One summary per (pace, method, group); ratios against `baseline` in the same pace and group."""
    cells: dict[tuple[str, str, str], tuple[list[KeyRow], list[LineRow]]] = {}
    for row in keys:
        for group in groups_of(row):
            cells.setdefault((row.pace, row.method, group), ([], []))[0].append(row)
    for row in lines:
        for group in groups_of(row):
            cells.setdefault((row.pace, row.method, group), ([], []))[1].append(row)
    out = {cell: _summary(*cell, *rows) for cell, rows in cells.items()}
    for (pace, _, group), s in out.items():
        base = out.get((pace, baseline, group))
        for name in ("p50_ms", "p95_ms", "p99_ms", "tokens_per_key"):  # > 1: this method needs less
            s[f"{name}_vs_{baseline}"] = _ratio(base[name] if base else None, s[name])
    return list(out.values())


def _summary(pace: str, method: str, group: str, keys: list[KeyRow], lines: list[LineRow]) -> dict:
    answered = [k.latency_ms for k in keys if k.outcome in ANSWERED and k.latency_ms is not None]
    counts = {o: sum(k.outcome == o for k in keys) for o in ("shown", "empty", "dropped", "cancelled")}
    tokens = [k.encoded_tokens for k in keys if k.encoded_tokens is not None]
    typed = sum(len(r.expected) for r in lines)
    return {
        "pace": pace, "method": method, "group": group, "keystrokes": len(keys),
        "answered": counts["shown"] + counts["empty"], **counts,
        "other": len(keys) - sum(counts.values()),  # errors, or no answer at all
        "late": sum(k.late for k in keys), "timed_out": sum(k.timed_out for k in keys),
        "p50_ms": percentile(answered, 50), "p95_ms": percentile(answered, 95), "p99_ms": percentile(answered, 99),
        "tokens_per_key": sum(tokens) / len(tokens) if tokens else None,
        "lines": len(lines), "lines_shown": sum(r.shown for r in lines),
        "em": _mean([r.em for r in lines]), "es": _mean([r.es for r in lines]),
        "chars_saved": sum(r.saved for r in lines), "chars_typed": typed,
        "saved_fraction": sum(r.saved for r in lines) / typed if typed else None,
    }


def summarize_hop(keys: list[KeyRow], samples: list[dict], captures: dict, served: list[dict]) -> dict:
    """One method's hop replay: keystroke counts and latencies, over all rounds and after the first
    (the warm-up), the ratio p95 / p50; CUDA graphs captured (`captures`: the server's running count;
    `request_graph_captures`: the per-request counts of the requests the polls sampled); device memory
    sampled after every turn (`samples`, rows of DEVICE_STATS): first, max, last, and the spread
    (max - min) after the first round."""
    def latencies(rows: list[KeyRow]) -> dict:
        answered = [k.latency_ms for k in rows if k.outcome in ANSWERED and k.latency_ms is not None]
        p50, p95 = percentile(answered, 50), percentile(answered, 95)
        return {"keystrokes": len(rows), "answered": len(answered), "p50_ms": p50, "p95_ms": p95,
                "p99_ms": percentile(answered, 99), "p95_over_p50": _ratio(p95, p50)}

    warm = [k for k in keys if (k.round or 1) > 1]
    counts = {o: sum(k.outcome == o for k in keys) for o in ("dropped", "cancelled")}
    out = {**latencies(keys), **counts, "other": len(keys) - sum(k.outcome in ANSWERED for k in keys)
           - sum(counts.values()), "late": sum(k.late for k in keys), "timed_out": sum(k.timed_out for k in keys),
           "after_round1": latencies(warm),
           # the same without the answers that continue the ghost text shown before (typed along):
           # the keystrokes the model answered, whose tail is what hopping between files can lengthen
           "continued": sum(k.continued for k in keys if k.outcome in ANSWERED),
           "not_continued": latencies([k for k in keys if not k.continued]),
           "not_continued_after_round1": latencies([k for k in warm if not k.continued]),
           "graph_captures": captures,
           "request_graph_captures": {
               "all": sum(q.get("graph_captures") or 0 for q in served),
               "after_round1": sum(q.get("graph_captures") or 0 for q in served if q.get("round", 1) > 1),
               "requests_sampled": len(served)}}
    memory = {}
    for name in ("device_allocated_bytes", "device_max_allocated_bytes"):
        values = [m[name] for m in samples if m.get(name) is not None]
        later = [m[name] for m in samples if m.get(name) is not None and m["round"] > 1]
        memory[name] = {"first": values[0] if values else None, "max": max(values, default=None),
                        "last": values[-1] if values else None,
                        "spread_after_round1": max(later) - min(later) if later else None}
    pools = [m["kv_pool_bytes"] for m in samples if m.get("kv_pool_bytes") is not None]
    out["memory"] = {**memory, "kv_pool_bytes": pools[-1] if pools else None, "samples": samples}
    return out


def summarize_opens(opens: list[OpenRow]) -> list[dict]:
    """Time to the first suggestion after opening a file, per pace, method and file-size bucket."""
    cells: dict[tuple[str, str, str], list[OpenRow]] = {}
    for row in opens:
        for group in ("all", f"size {row.bucket}"):
            cells.setdefault((row.pace, row.method, group), []).append(row)
    out = []
    for (pace, method, group), rows in cells.items():
        ms = [r.first_ms for r in rows if r.first_ms is not None]
        out.append({"pace": pace, "method": method, "group": group, "files": len(rows), "answered": len(ms),
                    "p50_ms": percentile(ms, 50), "max_ms": max(ms) if ms else None,
                    "max_tokens": max(r.tokens for r in rows)})
    return out


SLOW_MS = 50.0  # issue 21's p99 target on the H100
BUSY_TOKENS = 1000  # tokens the server ran through the model between two keys


def summarize_slow(keys: list[KeyRow], slow_ms: float = SLOW_MS) -> list[dict]:
    """Per pace and method: the answered keystrokes slower than `slow_ms`, by the likeliest cause:
    a file's first keystroke, a key after more than BUSY_TOKENS of work since the key before
    (background work the key may have waited behind), a key at a line start or a `:` (where a
    multi-line suggestion is decoded), a key with more than BUSY_TOKENS of work from it to the next
    (work that began with it, or after its answer: session 17's one slow key without work before it
    had 3,482 tokens run before the next), or none of these."""
    before: dict[tuple, KeyRow] = {}
    cells: dict[tuple[str, str], dict] = {}
    for k in keys:
        where = (k.pace, k.method, k.record, k.round)
        prev, before[where] = before.get(where), k
        cell = cells.setdefault((k.pace, k.method), {"pace": k.pace, "method": k.method, "keys": 0, "slow": 0,
                                                     "first_key": 0, "after_work": 0, "line_start": 0, "with_work": 0,
                                                     "other": 0})
        if k.outcome not in ANSWERED or k.latency_ms is None:
            continue
        cell["keys"] += 1
        if k.latency_ms <= slow_ms:
            continue
        cell["slow"] += 1
        if prev is None:
            cell["first_key"] += 1
        elif (prev.encoded_tokens or 0) > BUSY_TOKENS:
            cell["after_work"] += 1
        elif k.label.startswith("\u23ce") or k.label.endswith(":"):
            cell["line_start"] += 1
        elif (k.encoded_tokens or 0) > BUSY_TOKENS:
            cell["with_work"] += 1
        else:
            cell["other"] += 1
    return list(cells.values())


def summarize_dropdown(rows: list[DropdownRow]) -> list[dict]:
    """Per pace, method and group (as summarize's): dropdown requests, answered, latency of the
    answered, the mean number of items per answer; first-item EM, best-of-k EM and best ES as means
    over every request (one unanswered or empty scores 0, as a line without ghost text does)."""
    cells: dict[tuple[str, str, str], list[DropdownRow]] = {}
    for row in rows:
        for group in groups_of(row):
            cells.setdefault((row.pace, row.method, group), []).append(row)
    out = []
    for (pace, method, group), cell in cells.items():
        answered = [r for r in cell if r.outcome == "answered"]
        ms = [r.latency_ms for r in answered if r.latency_ms is not None]
        out.append({"pace": pace, "method": method, "group": group, "requests": len(cell),
                    "answered": len(answered), "with_items": sum(r.items > 0 for r in answered),
                    "timed_out": sum(r.outcome == "timed_out" for r in cell),
                    "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                    "items_mean": _mean([r.items for r in answered]),
                    "first_em": _mean([r.first_em for r in cell]), "best_em": _mean([r.best_em for r in cell]),
                    "best_es": _mean([r.best_es for r in cell])})
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(base: float | None, ours: float | None) -> float | None:
    return base / ours if base is not None and ours else None


def print_tables(result: dict) -> None:
    base = result.get("baseline", BASELINE)
    headers = ["group", "method", "keys", "answered", "dropped", "cancelled", "late", "p50 ms", "p95 ms", "p99 ms",
               f"p50 vs {base}", f"p95 vs {base}", "tokens/key", f"tokens vs {base}", "lines", "shown", "EM %",
               "ES %", "saved %"]
    order = {m: i for i, m in enumerate(result["methods"])}
    group_order = ["all"] + [f"size {b}" for b, _ in BUCKETS] + [f"pos {p}" for p in POSITIONS]
    for pace in result["paces"]:
        rows = sorted((s for s in result["summary"] if s["pace"] == pace["name"]),
                      key=lambda s: (group_order.index(s["group"]), order[s["method"]]))
        table_rows = [[s["group"], s["method"], s["keystrokes"], s["answered"], s["dropped"], s["cancelled"],
                       s["late"], _fmt(s["p50_ms"], 0), _fmt(s["p95_ms"], 0), _fmt(s["p99_ms"], 0),
                       _x(s[f"p50_ms_vs_{base}"]), _x(s[f"p95_ms_vs_{base}"]), _fmt(s["tokens_per_key"], 1),
                       _x(s[f"tokens_per_key_vs_{base}"]), s["lines"], s["lines_shown"], _pct(s["em"]), _pct(s["es"]),
                       _pct(s["saved_fraction"])] for s in rows]
        hop = next(iter(result.get("hop", {}).values()), None) if pace["name"] == "hop" else None
        how = (f"{hop['documents']} documents open, {hop['keys_per_turn']} keystrokes of each in turn, one every "
               f"{pace['interval_ms']:.0f} ms, {hop['hop_pause_ms']:.0f} ms to the next document; "
               f"{hop['rounds']} rounds" if hop is not None else
               "every keystroke a change, a request only at each scored line, waited for" if pace["name"] == "lines"
               else "each keystroke after the last answer" if pace["interval_ms"] <= 0 else
               f"one keystroke every {pace['interval_ms']:.0f} ms, {pace['hunk_pause_ms']:.0f} ms before each "
               "later hunk")
        title = (f"pace {pace['name']} ({how}): {result['records']} realedits records, at most {result['max_keys']} "
                 f"keystrokes each, through `editkv lsp`{' and peers' if result.get('peers') else ''}\n"
                 f"model: {result['model']}; machine: {result['machine']}; load average {_load(result)}; "
                 f"'vs {base}' = {base}'s value / this method's (> 1: less than {base})")
        print(table(headers, table_rows, title))
        if hop is not None:
            print(hop_table(result))
        first = sorted((s for s in result.get("first_suggestion", []) if s["pace"] == pace["name"]),
                       key=lambda s: (group_order.index(s["group"]), order[s["method"]]))
        if first:
            print(table(["group", "method", "files", "answered", "p50 ms", "max ms", "largest file (tokens)"],
                        [[s["group"], s["method"], s["files"], s["answered"], _fmt(s["p50_ms"], 0),
                          _fmt(s["max_ms"], 0), s["max_tokens"]] for s in first],
                        f"first suggestion after opening a file (pace {pace['name']}): didOpen, then one request "
                        "at the first keystroke's position"))
    slow = [s for s in result.get("slow_keys") or [] if s["slow"]]
    if slow:
        print(table(["pace", "method", "answered keys", f"over {SLOW_MS:.0f} ms", "a file's first key",
                     f"after > {BUSY_TOKENS} tokens of work", "at a line start or `:`",
                     f"> {BUSY_TOKENS} tokens of work from it to the next key", "other"],
                    [[s["pace"], s["method"], s["keys"], s["slow"], s["first_key"], s["after_work"], s["line_start"],
                      s.get("with_work", "-"), s["other"]] for s in slow],
                    f"keystrokes slower than {SLOW_MS:.0f} ms, by their likeliest cause (the work counted is the "
                    "server's, from the key before to this one or from this one to the next)"))
    dropdown = sorted(result.get("dropdown") or [],
                      key=lambda s: (s["pace"], group_order.index(s["group"]), order[s["method"]]))
    if dropdown:
        print(table(["pace", "group", "method", "requests", "answered", "with items", "p50 ms", "p95 ms", "items",
                     "first EM %", "best-of-k EM %", "best ES %"],
                    [[s["pace"], s["group"], s["method"], s["requests"], s["answered"], s["with_items"],
                      _fmt(s["p50_ms"], 0), _fmt(s["p95_ms"], 0), _fmt(s["items_mean"], 1), _pct(s["first_em"]),
                      _pct(s["best_em"]), _pct(s["best_es"])] for s in dropdown],
                    "dropdown (--dropdown): textDocument/completion, invoked, at each scored line after its inline "
                    "request, waited for; its items applied as an editor applies them, against the line typed"))
    peer = result.get("peer_requests") or []
    if peer:
        print(table(["pace", "method", "keystroke requests", "prompt tokens p50", "mean", "p95", "cached tokens p50",
                     "answers from its cache", "prefetch requests", "ring requests"],
                    [[p["pace"], p["method"], p["requests"], _fmt(p["prompt_p50"], 0), _fmt(p["prompt_mean"], 1),
                      _fmt(p["prompt_p95"], 0), _fmt(p["cached_p50"], 0), p["cache_hits"], p["prefetch"], p["ring"]]
                     for p in peer],
                    "peers: prompt tokens llama-server processed per keystroke's /infill request (timings.prompt_n; "
                    "cached = timings.cache_n), and the client's other requests"))
    served = result.get("served_breakdown") or []
    if served:
        print(table(["pace", "method", "requests sampled", "typed along"] + [f"{n} mean / p95" for n in SERVED_FIELDS],
                    [[r["pace"], r["method"], r["requests"], r.get("typed_along", 0)]
                     + [f"{_fmt(r.get(f'{n}_mean'), 1)} / {_fmt(r.get(f'{n}_p95'), 1)}" for n in SERVED_FIELDS]
                     for r in served],
                    "editkv: where a request's time goes (its own stats, the last request finished at each "
                    "keystroke's poll)"))
    print("\nmethods: " + "; ".join(f"{m} = {json.dumps(s)}" for m, s in result["method_settings"].items()))


def hop_table(result: dict) -> str:
    """The hop pace, one row per method: latencies (all rounds; p95 / p50 also after the first),
    CUDA graphs captured after the first round and in all, device memory after each turn."""
    rows = []
    for method, h in result["hop"].items():
        memory, captures = h["memory"]["device_allocated_bytes"], h["graph_captures"]
        rows.append([method, f"{h['opened']} / {h['documents']}", h["keystrokes"], h["answered"], h["dropped"],
                     h["cancelled"], _fmt(h["p50_ms"], 0), _fmt(h["p95_ms"], 0), _fmt(h["p99_ms"], 0),
                     _x(h["p95_over_p50"]), _x(h["after_round1"]["p95_over_p50"]), h.get("continued", "-"),
                     _model_answers(h.get("not_continued")), _model_answers(h.get("not_continued_after_round1")),
                     f"{_fmt(captures['after_round1'], 0)} / {_fmt(captures['all'], 0)}",
                     " / ".join(_mib(memory[k]) for k in ("first", "max", "last")),
                     _mib(memory["spread_after_round1"]), _mib(h["memory"]["device_max_allocated_bytes"]["last"]),
                     _mib(h["memory"]["kv_pool_bytes"])])
    return table(["method", "documents open", "keys", "answered", "dropped", "cancelled", "p50 ms", "p95 ms", "p99 ms",
                  "p95/p50", "p95/p50 after round 1", "typed along", "others p50 / p95 (p95/p50)",
                  "others after round 1", "graph captures after round 1 / all",
                  "device MiB first / max / last", "spread after round 1 MiB", "peak MiB", "KV pool MiB"], rows,
                 "hop: latency over every keystroke; typed along = answers that continue the ghost text shown "
                 "before, others = the rest; graph captures from the server's running count (- without "
                 "CUDA graphs); device memory allocated, sampled after each turn (- off CUDA)")


def _model_answers(lat: dict | None) -> str:
    if not lat:
        return "-"
    return f"{_fmt(lat['p50_ms'], 0)} / {_fmt(lat['p95_ms'], 0)} ({_x(lat['p95_over_p50'])})"


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _load(result: dict) -> str:
    load = result.get("load")
    if not load:
        return "-"
    return f"{' '.join(f'{x:.2f}' for x in load['start'])} at start, {' '.join(f'{x:.2f}' for x in load['end'])} at end"


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


# ---- command line -------------------------------------------------------------------------------


def _args():
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(limit=6)
    p.add_argument("--methods", default="full,prefix_reuse,default",
                   help=f"methods to compare (known: {', '.join(METHODS)}; more with --method-settings)")
    p.add_argument("--method-settings", action="append", default=[], metavar="NAME=JSON",
                   help="define (or override) a method's settings, e.g. nobudget='{\"staleBudget\": 0}'; "
                        "it joins --methods if not listed")
    p.add_argument("--settings", default=None, metavar="JSON",
                   help="settings for every method, under each method's own, e.g. '{\"maxTokens\": 8}'")
    p.add_argument("--max-file-chars", type=int, default=None, help="leave out records with larger files")
    p.add_argument("--pace", choices=("service", "human", "both", "lines", "hop"), default="both",
                   help="both = service and human; lines = quality only (requests at the scored lines alone); "
                        "hop = --docs documents open at once, typed by turns at the human pace")
    p.add_argument("--dropdown", action="store_true",
                   help="lines pace: also ask for the dropdown (textDocument/completion, invoked) at each scored line "
                        "and score its items")
    p.add_argument("--interval-ms", type=float, default=100.0, help="human pace: between keystrokes (100)")
    p.add_argument("--hunk-pause-ms", type=float, default=1500.0, help="human pace: before each later hunk (1500)")
    p.add_argument("--max-keys", type=int, default=80, help="keystrokes per record at most (80)")
    p.add_argument("--docs", type=int, default=50, help="hop pace: documents open at once (50; replaces --limit)")
    p.add_argument("--rounds", type=int, default=4, help="hop pace: turns of every document (4)")
    p.add_argument("--keys-per-turn", type=int, default=5, help="hop pace: keystrokes a document's turn types (5)")
    p.add_argument("--hop-pause-ms", type=float, default=None,
                   help="hop pace: from a turn's last keystroke to the next turn's first (default --interval-ms)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for one answer at service pace, and for the open ones after a record (60)")
    p.add_argument("--order", choices=("spread", "file"), default="spread",
                   help="spread: records spread over file sizes and edit positions; file: file order")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--fake", action="store_true", help="smoke test: the server's fake engine, no model")
    p.add_argument("--baseline", default=None,
                   help="the method the ratio columns compare with (default: full if run, else the first peer)")
    p.add_argument("--crossfile", type=Path, default=None,
                   help="realedits cross-file companion (default: dev-crossfile.jsonl.gz beside --data, if there); "
                        "its files feed peers' ring buffers (llama.vscode's input_extra); editkv gets none of it")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="peers' CPU threads (-t; default: all cores)")
    p.add_argument("--peer-bin", default=None, help="llama-server binary (default: the cached build of "
                                                    "bench/peers/llama_server.py for --device)")
    p.add_argument("--peer-ctx", type=int, default=0,
                   help="llama-server -c (0 = the model's training context, llama.vscode's README for 0.5B models)")
    p.add_argument("--peer-log", default=None, help="write llama-server's log here (.METHOD.log replaces the suffix)")
    return p.parse_args()


def parse_methods(names: str, overrides: Iterable[str], common: str | None = None) -> list[Method]:
    """--methods, --method-settings and --settings (under every method's own) as Methods, in order."""
    settings = {name: dict(value) for name, value in METHODS.items()}
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for item in overrides:
        name, sep, raw = item.partition("=")
        try:
            value = json.loads(raw) if sep else None
        except json.JSONDecodeError as err:
            raise ValueError(f"--method-settings {item!r}: not JSON ({err})") from None
        if not name or not isinstance(value, dict):
            raise ValueError(f"--method-settings {item!r}: expected NAME='{{\"setting\": value}}'")
        settings[name] = {**settings.get(name, {}), **value}
        if name not in chosen:
            chosen.append(name)
    unknown = [n for n in chosen if n not in settings]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: known {sorted(settings)}; define one with --method-settings")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--methods lists a method twice: {chosen}")
    try:
        shared = json.loads(common) if common else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--settings {common!r}: not JSON ({err})") from None
    if not isinstance(shared, dict):
        raise ValueError(f"--settings {common!r}: expected a JSON object of settings")
    # --settings are editkv's: a peer takes only its own (llama.vscode's)
    return [Method(n, dict(settings[n]) if PEER in settings[n] else {**shared, **settings[n]}) for n in chosen]


async def run(args, methods: list[Method], paces: list[Pace], cases: list[Case]) -> dict:
    clients: dict[str, LspClient | LlamaVscodeClient | ExtensionClient] = {}
    servers: list[LlamaServer] = []
    keys: list[KeyRow] = []
    lines: list[LineRow] = []
    opens: list[OpenRow] = []
    calls: list[dict] = []
    served: list[dict] = []  # editkv's per-request stats (where its time went)
    editor: dict[str, int] = {}  # "pace/method" -> requests the VS Code extension answered itself (typing along)
    hop: dict[str, dict] = {}  # method -> its hop replay's summary (summarize_hop)
    dropdown: list[DropdownRow] = []  # --dropdown: the dropdown at each scored line (lines pace, editkv only)
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lsp_replay_") as cache_home:
        converted = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editkv" / "gguf"
        if converted.is_dir():  # the user's GGUF conversion cache: no 1-2 minute conversion per run
            (Path(cache_home) / "editkv").mkdir()
            (Path(cache_home) / "editkv" / "gguf").symlink_to(converted)
        try:
            clients = await start_servers(args, methods, cache_home, servers)
            description = {m.name: (await clients[m.name].request("editkv/stats"))["backend"]["description"]
                           for m in methods}
            for pace in paces:
                if pace.name == "hop":  # every document open at once, on each server in turn
                    for method in methods:
                        client = clients[method.name]
                        here = client.answered_here if isinstance(client, ExtensionClient) else 0
                        k, ln, hop[method.name] = await replay_hop(client, method, cases, pace, args, opens, served)
                        if isinstance(client, ExtensionClient):
                            editor[f"{pace.name}/{method.name}"] = client.answered_here - here
                        keys += k
                        lines += ln
                        print(f"  hop {method.name:<14} {len(cases)} documents: {len(k)} keys, "
                              f"{hop[method.name]['answered']} answered; {time.perf_counter() - started:.0f} s",
                              file=sys.stderr)
                        if args.json:
                            done = _result(args, methods, paces, cases, description, load_start, keys, lines, opens,
                                           calls, served, editor, hop, dropdown)
                            write_json(args.json, {**done, "partial": True})
                    continue
                for i, case in enumerate(cases):
                    for method in methods[i % len(methods):] + methods[: i % len(methods)]:
                        client = clients[method.name]
                        if isinstance(client, LlamaVscodeClient):
                            client.begin_record(case.context, case.record_id)
                            client.calls.clear()
                            hits = client.cache_hits
                        context_uris = []
                        if not isinstance(client, LlamaVscodeClient) and wants_context(method):
                            context_uris = await open_context(client, case, max(args.timeout, 600.0))
                        here = client.answered_here if isinstance(client, ExtensionClient) else 0
                        asks = args.dropdown and not isinstance(client, LlamaVscodeClient)  # peers have none
                        k, ln = await replay_case(client, method, case, pace, args, opens, served,
                                                  dropdown if asks else None)
                        if isinstance(client, ExtensionClient):
                            cell = f"{pace.name}/{method.name}"
                            editor[cell] = editor.get(cell, 0) + client.answered_here - here
                        for uri in context_uris:
                            client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
                        if isinstance(client, LlamaVscodeClient):
                            calls += [{"pace": pace.name, "method": method.name, "record": case.record_id,
                                       **asdict(c)} for c in client.calls]
                            calls.append({"pace": pace.name, "method": method.name, "record": case.record_id,
                                          "kind": "cache_hits", "count": client.cache_hits - hits})
                        keys += k
                        lines += ln
                        answered = sum(r.outcome in ANSWERED for r in k)
                        print(f"  {pace.name} {i + 1}/{len(cases)} {method.name:<14} {case.record_id} "
                              f"({case.tokens} tokens, {case.position}): {len(k)} keys, {answered} answered, "
                              f"{len(ln)} lines; {time.perf_counter() - started:.0f} s", file=sys.stderr)
                        if args.json:  # what is done so far survives a run stopped by its time limit
                            done = _result(args, methods, paces, cases, description, load_start, keys, lines, opens,
                                           calls, served, editor, hop, dropdown)
                            write_json(args.json, {**done, "partial": True})
        finally:
            for client in clients.values():
                await client.close()
            for server in servers:
                server.stop()
    return {**_result(args, methods, paces, cases, description, load_start, keys, lines, opens, calls, served, editor,
                      hop, dropdown), "partial": False}


def _result(args, methods: list[Method], paces: list[Pace], cases: list[Case], description: dict[str, str],
            load_start: tuple[float, ...], keys: list[KeyRow], lines: list[LineRow], opens: list[OpenRow],
            calls: list[dict], served: list[dict], editor: dict[str, int], hop: dict[str, dict],
            dropdown: list[DropdownRow]) -> dict:
    models = sorted(set(description.values()))
    return {
        "model": "; ".join(models) if len(models) > 1 else models[0], "machine": machine(args.device),
        "load": {"start": load_start, "end": os.getloadavg()},
        "records": len(cases), "max_keys": args.max_keys, "baseline": args.baseline,
        "peers": [m.name for m in methods if PEER in m.settings],
        "methods": [m.name for m in methods], "method_settings": {m.name: m.settings for m in methods},
        "paces": [asdict(p) for p in paces],
        "cases": [{"id": c.record_id, "tokens": c.tokens, "bucket": c.bucket, "position": c.position,
                   "keys": len(c.session.keys), "probes": len(c.session.probes)} for c in cases],
        "summary": summarize(keys, lines, args.baseline), "keys": [asdict(k) for k in keys],
        "lines": [asdict(r) for r in lines], "opens": [asdict(o) for o in opens],
        "first_suggestion": summarize_opens(opens), "slow_keys": summarize_slow(keys),
        "peer_calls": calls, "peer_requests": summarize_peer_calls(calls),
        "served_requests": served, "served_breakdown": summarize_served(served),
        "editor_answers": editor, "hop": hop, "server_starts": STARTS,
        "dropdown": summarize_dropdown(dropdown), "dropdown_lines": [asdict(r) for r in dropdown],
    }


# wait_ms: from the request's arrival to the worker's start (its debounce, and the work ahead of it);
# worker_ms: the worker's whole share (total_ms is the backend's part of it)
SERVED_FIELDS = ("wait_ms", "worker_ms", "total_ms", "repair_ms", "view_ms", "view_encoded_tokens", "encoded_tokens",
                 "decode_tokens", "forwards", "graph_captures")


def summarize_served(requests: list[dict]) -> list[dict]:
    """Per pace and editkv method: mean and p95 of the per-request stats editkv reported (a sample: the
    last request finished at each keystroke's poll), over the requests the model served; typed-along
    answers (the worker's, without the model) are counted apart."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in requests:
        cells.setdefault((r["pace"], r["method"]), []).append(r)
    out = []
    for (pace, method), sampled in cells.items():
        rows = [r for r in sampled if r.get("strategy") != "typed_along"]
        row = {"pace": pace, "method": method, "requests": len(rows), "typed_along": len(sampled) - len(rows)}
        for name in SERVED_FIELDS:
            values = [r[name] for r in rows if isinstance(r.get(name), int | float)]
            row[f"{name}_mean"], row[f"{name}_p95"] = _mean(values), percentile(values, 95)
        out.append(row)
    return out


def summarize_peer_calls(calls: list[dict]) -> list[dict]:
    """Per pace and peer method: prompt tokens per keystroke request, cache answers, background requests."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for c in calls:
        cells.setdefault((c["pace"], c["method"]), []).append(c)
    out = []
    for (pace, method), rows in cells.items():
        asked = [r for r in rows if r["kind"] == "keystroke" and not r.get("aborted")]
        prompt = [r["prompt_n"] for r in asked if r["prompt_n"] is not None]
        cached = [r["cache_n"] for r in asked if r["cache_n"] is not None]
        out.append({"pace": pace, "method": method, "requests": len(asked),
                    "aborted": sum(bool(r.get("aborted")) for r in rows),
                    "prompt_p50": percentile(prompt, 50), "prompt_p95": percentile(prompt, 95),
                    "prompt_mean": _mean(prompt), "cached_p50": percentile(cached, 50),
                    "cache_hits": sum(r.get("count", 0) for r in rows if r["kind"] == "cache_hits"),
                    "prefetch": sum(r["kind"] == "prefetch" for r in rows),
                    "ring": sum(r["kind"] == "ring" for r in rows)})
    return out


def load_crossfile(crossfile: Path, ids: set[str]) -> dict[str, list[tuple[str, str]]]:
    """(path, text) of each record's cross-file context files, from the companion and its blobs file."""
    import gzip

    wanted: dict[str, list[tuple[str, str]]] = {}
    with gzip.open(crossfile, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] in ids:
                wanted[row["id"]] = [(c["path"], c["blob"]) for c in row["context"]]
    blobs = {b for files in wanted.values() for _, b in files}
    texts: dict[str, str] = {}
    blob_file = crossfile.with_name(crossfile.name.replace("-crossfile", "-blobs"))
    with gzip.open(blob_file, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["blob"] in blobs:
                texts[row["blob"]] = row["text"]
    return {rid: [(path, texts[b]) for path, b in files if b in texts] for rid, files in wanted.items()}


def main() -> None:
    args = _args()
    if not args.data.exists():
        sys.exit(f"lsp_replay: no data at {args.data}; pass --data PATH (a realedits .jsonl.gz)")
    try:
        methods = parse_methods(args.methods, args.method_settings, args.settings)
    except ValueError as err:
        sys.exit(f"lsp_replay: {err}")
    names = [m.name for m in methods]
    peers = [m.name for m in methods if PEER in m.settings]
    args.baseline = args.baseline or (BASELINE if BASELINE in names else peers[0] if peers else names[0])
    if args.baseline not in names:
        sys.exit(f"lsp_replay: --baseline {args.baseline} is not among --methods {args.methods}")
    human = ("human", "hop")  # the hop pace types at the human pace's interval and hunk pause
    paces = [Pace(name, args.interval_ms if name in human else 0.0, args.hunk_pause_ms if name in human else 0.0)
             for name in PACES if args.pace == name or (args.pace == "both" and name in ("service", "human"))]
    if args.dropdown and args.pace != "lines":
        sys.exit("lsp_replay: --dropdown goes with --pace lines (each scored line's requests are waited for)")
    if args.pace == "hop" and peers:
        sys.exit(f"lsp_replay: the hop pace drives editkv only (llama.vscode's client types one record at a time); "
                 f"leave {', '.join(peers)} out of --methods")
    if args.pace == "hop" and min(args.docs, args.rounds, args.keys_per_turn) < 1:
        sys.exit("lsp_replay: --docs, --rounds and --keys-per-turn must be at least 1")
    limit = args.docs if args.pace == "hop" else args.limit
    records = load_records(args.data, limit if args.order == "file" else None, args.max_file_chars)
    cases = build_cases(records, token_counter(None if args.fake else args.model), limit, args.order, args.max_keys)
    crossfile = args.crossfile or args.data.with_name(args.data.name.replace(".jsonl", "-crossfile.jsonl"))
    if any(wants_context(m) for m in methods) and crossfile.is_file() and crossfile != args.data:
        context = load_crossfile(crossfile, {c.record_id for c in cases})
        for case in cases:
            case.context = context.get(case.record_id, [])

    try:
        result = asyncio.run(run(args, methods, paces, cases))
    except BenchError as err:
        sys.exit(f"lsp_replay: {err}")
    print_tables(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
