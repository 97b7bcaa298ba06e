"""The LSP methods editkv answers, one top-level handler each.

text sync ──> engine worker, in order (the worker holds the text).
inlineCompletion / completion ──> `_serve`: the newest request per document and kind wins,
    debounce, engine worker, then LSP items (ghost text, or dropdown items that sort after
    other servers' items and carry their full text as documentation).
settings (initializationOptions, didChangeConfiguration), statistics (`editkv/...`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from editkv.edit_cache.positions import Position, PositionError, Range
from editkv.lsp_server.protocol import choose_encoding
from editkv.lsp_server.server import DocState, EditkvServer, Pending
from editkv.lsp_server.settings import SECTION, Settings, parse_settings, section_of
from editkv.lsp_server.stats import default_stats_path
from editkv.lsp_server.worker import BackendFactory, Job, Outcome, UnknownDocumentError
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcServerNotInitialized

log = logging.getLogger(__name__)
HANDLERS: list[tuple[str, Any, Callable]] = []
COMMANDS: list[tuple[str, Callable]] = []
ACCEPT_COMMAND = "editkv.suggestionAccepted"
SUGGESTION_EVENT = "editkv/suggestionEvent"
STATS_REQUEST = "editkv/stats"
DEBUG_DOCUMENT_REQUEST = "editkv/debugDocument"
DEBUG_FAULTS_REQUEST = "editkv/debugFaults"
DEBUG_MEMORY_REQUEST = "editkv/debugMemory"
COMPLETION_TRIGGERS = [".", "(", "[", ","]
LABEL_CHARS = 60
REQUEST_FAILED = -32803  # LSP's RequestFailed: a valid request the server could not serve


def handles(method: str, options: Any = None) -> Callable:
    """Register the decorated function as the handler of `method`."""

    def register(fn: Callable) -> Callable:
        HANDLERS.append((method, options, fn))
        return fn

    return register


# ---- lifecycle ----------------------------------------------------------------------------------


def workspace_roots(params: types.InitializeParams) -> tuple[str, ...]:
    """The client's workspace folders as local paths (file URIs only; the old rootUri/rootPath
    when it sends no folders)."""
    from urllib.parse import unquote, urlparse

    uris = [f.uri for f in params.workspace_folders or []] or ([params.root_uri] if params.root_uri else [])
    roots = [unquote(urlparse(u).path) for u in uris if urlparse(u).scheme == "file"]
    if not roots and params.root_path:
        roots = [params.root_path]
    return tuple(r for r in roots if r)


@handles(types.INITIALIZE)
def initialize(ls: EditkvServer, params: types.InitializeParams) -> None:
    """Read the settings and what the client can do; the model loads after `initialized`."""
    ls.loop = asyncio.get_running_loop()
    ls.loop_thread = threading.get_ident()
    caps = params.capabilities
    ls.encoding = choose_encoding(caps)
    ls.client_progress = bool(caps.window and caps.window.work_done_progress)
    ls.client_config_pull = bool(caps.workspace and caps.workspace.configuration)
    item = caps.text_document and caps.text_document.completion and caps.text_document.completion.completion_item
    modes = item and item.insert_text_mode_support and item.insert_text_mode_support.value_set
    ls.completion_as_is = bool(modes and types.InsertTextMode.AsIs in modes)
    ls.settings, ls.settings_problems = parse_settings(_plain(params.initialization_options), ls.base_settings)
    ls.worker.workspace_roots = workspace_roots(params)
    if not ls.settings.stats_file:
        ls.stats.path = None
    ls.session_started = True


@handles(types.INITIALIZED)
def initialized(ls: EditkvServer, params: types.InitializedParams) -> None:
    """Report bad settings and start loading the model on the engine worker."""
    for problem in ls.settings_problems:
        ls.show("warning", problem)
    ls.spawn(ls.load_backend(ls.settings))


@handles(types.SHUTDOWN)
def shutdown(ls: EditkvServer, params: None) -> None:
    """Stop the engine worker and save the statistics before `exit`."""
    ls.worker.stop()
    ls.stats.save()


# ---- text sync ----------------------------------------------------------------------------------


@handles(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: EditkvServer, params: types.DidOpenTextDocumentParams) -> None:
    """Start tracking a document (reopening one starts it over)."""
    td = params.text_document
    if (old := ls.docs.get(td.uri)) is not None:
        old.supersede()
        old.stop_finishing()
    ls.docs[td.uri] = DocState(td.uri, td.language_id, td.version)
    ls.worker.open(td.uri, td.text, td.language_id)


@handles(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: EditkvServer, params: types.DidChangeTextDocumentParams) -> None:
    """Forward the changes in order; every pending request for the document is now stale."""
    doc = ls.docs.get(params.text_document.uri)
    if doc is None:
        log.warning("didChange for %s, which is not open: ignored", params.text_document.uri)
        return
    doc.edits += 1
    doc.version = params.text_document.version
    doc.changed()
    _finish_typed_along(ls, doc, params.content_changes)
    doc.supersede()
    _follow_along(doc, params.content_changes, ls.encoding)
    changes = [(_range(getattr(c, "range", None)), c.text) for c in params.content_changes]
    ls.worker.change(doc.uri, changes, ls.encoding)


def _units(text: str, encoding: str) -> int:
    """`text`'s length in the position encoding's units."""
    if encoding == "utf-8":
        return len(text.encode("utf-8", errors="surrogatepass"))
    if encoding == "utf-16":
        return len(text) + sum(ord(ch) > 0xFFFF for ch in text)
    return len(text)


def _insertion_at(changes: list, line: int, character: int) -> str | None:
    """The text of a change that only inserts at (line, character) without a line break, else None."""
    if len(changes) != 1:
        return None
    rng, text = getattr(changes[0], "range", None), changes[0].text
    if rng is None or not text or "\n" in text or "\r" in text:
        return None
    if (rng.start.line, rng.start.character, rng.end.line, rng.end.character) != (line, character, line, character):
        return None
    return text


def _finish_typed_along(ls: EditkvServer, doc: DocState, changes: list) -> None:
    """A running inline request superseded by characters typed at its cursor runs to its end
    (the worker keeps its suggestion: if the user typed its start, the next request is answered
    from it without the model); any other change stops it, as every superseded request stops.
    On a slow device this is what lets typing along start at all: without it no request
    outlives the next keystroke."""
    settings = ls.settings
    pending = doc.pending.get("inline")
    if pending is not None and pending.job.started and pending.job.num_drafts == 1:
        job, line, character = pending.job, pending.job.line, pending.job.character
    elif doc.finishing is not None:
        job, line, character = doc.finishing
    else:
        return
    text = _insertion_at(changes, line, character) \
        if settings.type_along and settings.cache_mode != "recompute" else None
    if text is None:
        doc.stop_finishing()
        job.finish = False
        return
    job.finish = True
    doc.finishing = (job, line, character + _units(text, ls.encoding))


def _follow_along(doc: DocState, changes: list, encoding: str) -> None:
    """Keep `doc.along` when the change types the next characters of the ghost text at its
    cursor (one insertion, no line break); forget it on any other change."""
    along, doc.along = doc.along, None
    if along is None or len(changes) != 1 or along[0] != doc.edits - 1:
        return
    edits, line, character, rest = along
    text = _insertion_at(changes, line, character)
    if text is not None and len(text) < len(rest) and rest.startswith(text):
        doc.along = (doc.edits, line, character + _units(text, encoding), rest[len(text):])


@handles(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: EditkvServer, params: types.DidCloseTextDocumentParams) -> None:
    """Forget a document and its cache."""
    doc = ls.docs.pop(params.text_document.uri, None)
    if doc is not None:
        doc.supersede()
        doc.stop_finishing()
        ls.worker.close(doc.uri)


@handles(types.TEXT_DOCUMENT_DID_SAVE, types.SaveOptions(include_text=False))
def did_save(ls: EditkvServer, params: types.DidSaveTextDocumentParams) -> None:
    """Nothing to do: the text is already in sync through didChange."""
    ls.stats.count("sync", "saves")


def _range(rng: types.Range | None) -> Range | None:
    if rng is None:
        return None
    return Range(Position(rng.start.line, rng.start.character), Position(rng.end.line, rng.end.character))


# ---- completions --------------------------------------------------------------------------------


async def _serve(ls: EditkvServer, kind: str, uri: str, position: types.Position, invoked: bool) -> Outcome | None:
    """Run one request through debounce and the worker; None when it was dropped."""
    if not ls.session_started:
        raise JsonRpcServerNotInitialized(message="editkv: send initialize first")
    doc = ls.docs.get(uri)
    if doc is None:
        raise JsonRpcInvalidParams(message=str(UnknownDocumentError(uri)))
    ls.stats.count(kind, "requests")
    settings = ls.settings
    drafts = settings.num_drafts if invoked or kind == "completion" else 1
    job = Job(uri, kind, position.line, position.character, ls.encoding, doc.edits, drafts, settings)
    pending = Pending(job)
    doc.supersede(kind)
    doc.pending[kind] = pending
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        # the debounce holds a request only while keystrokes come faster than it (a burst); at a
        # typing pace the server keeps up with, it would only add its own length to every answer
        if settings.debounce_ms and not invoked and doc.in_burst(settings.debounce_ms / 1000):
            ls.stats.count(kind, "debounced")
            pending.waiting = loop.create_future()
            timer = loop.call_later(settings.debounce_ms / 1000, _resolve, pending.waiting)
            try:
                await pending.waiting
            finally:
                timer.cancel()
        pending.waiting = asyncio.wrap_future(ls.worker.complete(job))
        outcome = await pending.waiting
    except asyncio.CancelledError:
        job.stop = True
        task = asyncio.current_task()
        if pending.superseded and task is not None and not task.cancelling():
            ls.stats.count(kind, "dropped")
            return None
        ls.stats.count(kind, "cancelled")
        raise
    except (PositionError, UnknownDocumentError) as err:
        ls.stats.count(kind, "invalid")
        raise JsonRpcInvalidParams(message=f"editkv: {err}") from None
    except Exception as err:
        ls.stats.count(kind, "errors")
        ls.show("error", f"editkv: completion failed: {type(err).__name__}: {err}")
        raise
    finally:
        if doc.pending.get(kind) is pending:
            del doc.pending[kind]
    if outcome.status == "dropped" or job.stop or ls.docs.get(uri) is not doc or doc.edits != job.edits:
        ls.stats.count(kind, "dropped")
        return None
    ls.stats.count(kind, outcome.status)
    if outcome.status == "out_of_sync":
        raise JsonRpcException(code=REQUEST_FAILED, message=f"editkv: {outcome.stats['reason']}; send the "
                               "document's whole text (a full-text didChange or a new didOpen) to resync it")
    if outcome.status == "served":
        ls.stats.served_request(1000 * (time.perf_counter() - started), outcome.stats)
    return outcome


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _accept(sid: str) -> types.Command:
    return types.Command(title="editkv: suggestion accepted", command=ACCEPT_COMMAND, arguments=[sid])


@handles(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: EditkvServer,
                            params: types.InlineCompletionParams) -> types.InlineCompletionList | None:
    """Ghost-text suggestions at the cursor; several on an explicit invocation, for cycling."""
    context = params.context
    invoked = context is not None and context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    selected = context.selected_completion_info if context is not None else None
    uri, position = params.text_document.uri, params.position
    settings = ls.settings
    along_ok = not invoked and selected is None and settings.type_along and settings.cache_mode != "recompute"
    doc = ls.docs.get(uri)
    if along_ok and doc is not None and ls.session_started and (along := doc.along) is not None \
            and along[0] == doc.edits and (position.line, position.character) == along[1:3]:
        # the user typed the start of the ghost text shown last: its rest, at once (no worker, no model)
        started = time.perf_counter()
        doc.supersede("inline")
        ls.stats.count("inline", "requests")
        ls.stats.count("inline", "typed_along")
        ls.typed_along += 1
        ls.stats.served_request(1000 * (time.perf_counter() - started),
                                {"strategy": "typed_along", "total_ms": 0.0, "encoded_tokens": 0})
        return types.InlineCompletionList(items=[types.InlineCompletionItem(
            insert_text=along[3], range=types.Range(start=position, end=position),
            command=_accept(ls.stats.new_id("inline", along[3])))])
    edits_then = doc.edits if doc is not None else None
    outcome = await _serve(ls, "inline", uri, position, invoked)
    if outcome is None:
        return None
    if not outcome.suggestions:  # also a refused document (too big, binary): no cursor to place items at
        return types.InlineCompletionList(items=[])
    at = types.Position(line=params.position.line, character=outcome.cursor.character)
    texts = [s.text for s in outcome.suggestions[: (ls.settings.num_drafts if invoked else 1)]]
    if along_ok and texts[0] and doc is not None and doc.edits == edits_then:
        doc.along = (doc.edits, at.line, at.character, texts[0])
    if selected is None:
        edits = [(text, types.Range(start=at, end=at)) for text in texts]
    else:
        edits = _extending(selected, outcome, at, texts)
    items = [types.InlineCompletionItem(insert_text=text, range=rng, command=_accept(ls.stats.new_id("inline", text)))
             for text, rng in edits]
    return types.InlineCompletionList(items=items)


def _extending(selected: types.SelectedCompletionInfo, outcome: Outcome, at: types.Position,
               texts: list[str]) -> list[tuple[str, types.Range]]:
    """The suggestions that extend the dropdown item the editor has selected, over its range.

    An editor shows ghost text beside an open dropdown only when it starts with the selected
    item's text and replaces the same range (LSP 3.18 `selectedCompletionInfo`). A suggestion
    continues the word before the cursor, so it can say so when that range is the word's; any
    other range would need the document's text, which only the engine worker holds.
    """
    start, end, word_start = selected.range.start, selected.range.end, outcome.word_start
    if word_start is None or (start.line, start.character) != (word_start.line, word_start.character) \
            or (end.line, end.character) != (at.line, at.character):
        return []
    full = [outcome.word + text for text in texts]
    return [(text, selected.range) for text in full if text.startswith(selected.text) and text != selected.text]


@handles(types.TEXT_DOCUMENT_COMPLETION,
         types.CompletionOptions(trigger_characters=COMPLETION_TRIGGERS, resolve_provider=False))
async def completion(ls: EditkvServer, params: types.CompletionParams) -> types.CompletionList:
    """Model suggestions as dropdown items that sort after other servers' items at equal match."""
    # asked for (Ctrl+Space) is never held by the burst debounce; a trigger character may be
    invoked = params.context is not None and params.context.trigger_kind == types.CompletionTriggerKind.Invoked
    outcome = await _serve(ls, "completion", params.text_document.uri, params.position, invoked=invoked)
    if outcome is None or not outcome.suggestions:
        return types.CompletionList(is_incomplete=True, items=[])
    doc = ls.docs.get(params.text_document.uri)
    language = doc.language_id if doc is not None else ""
    at = types.Position(line=params.position.line, character=outcome.cursor.character)
    start = types.Position(line=outcome.word_start.line, character=outcome.word_start.character)
    items = [_completion_item(ls, rank, outcome.word + s.text, start, at, language)
             for rank, s in enumerate(outcome.suggestions)]
    return types.CompletionList(is_incomplete=True, items=items)


def _completion_item(ls: EditkvServer, rank: int, text: str, start: types.Position, at: types.Position,
                     language: str) -> types.CompletionItem:
    """One dropdown item replacing the word before the cursor with `text`."""
    lines = text.splitlines() or [""]
    first = next((line.strip() for line in lines if line.strip()), "")
    more = len([line for line in lines if line.strip()]) - 1
    label = first[:LABEL_CHARS] + ("…" if len(first) > LABEL_CHARS or more > 0 else "")
    fence = "````" if "```" in text else "```"
    return types.CompletionItem(
        label=label,
        label_details=types.CompletionItemLabelDetails(detail=f" +{more} lines" if more > 0 else None,
                                                       description="editkv"),
        kind=types.CompletionItemKind.Snippet,
        detail="editkv" + (f" ({more + 1} lines)" if more > 0 else ""),
        documentation=types.MarkupContent(kind=types.MarkupKind.Markdown,
                                          value=f"{fence}{language}\n{text}\n{fence}"),
        sort_text=f"~editkv{rank:02d}",  # after other servers' items with the same match
        filter_text=lines[0] if lines[0].strip() else first,
        text_edit=types.TextEdit(range=types.Range(start=start, end=at), new_text=text),
        insert_text_format=types.InsertTextFormat.PlainText,
        insert_text_mode=types.InsertTextMode.AsIs if ls.completion_as_is and more > 0 else None,
        preselect=False,
        command=_accept(ls.stats.new_id("completion", text)),
    )


# ---- settings and statistics --------------------------------------------------------------------


@handles(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
async def did_change_configuration(ls: EditkvServer, params: types.DidChangeConfigurationParams) -> None:
    """New settings: report bad values; reload the model if model/device/dtype changed."""
    raw = section_of(_plain(params.settings))
    if not raw and ls.client_config_pull:
        try:
            pulled = await asyncio.wait_for(ls.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)])), 10)
            raw = pulled[0] if pulled else None
        except Exception as err:
            log.warning("workspace/configuration failed: %s", err)
            return
    ls.apply_settings(*parse_settings(raw, ls.settings))


@handles(SUGGESTION_EVENT)
def suggestion_event(ls: EditkvServer, params: Any) -> None:
    """Record what the user did with a suggestion: {id, event: shown | accepted | rejected}."""
    data = _plain(params)
    if not isinstance(data, dict) or not ls.stats.event(data.get("id"), data.get("event")):
        log.warning("%s needs {id: string, event: shown|accepted|rejected}, got %.200r", SUGGESTION_EVENT, params)


@handles(STATS_REQUEST)
def stats(ls: EditkvServer, params: Any) -> dict:
    """Counters, latencies, suggestion events, backend and document state."""
    return ls.snapshot()


@handles(DEBUG_DOCUMENT_REQUEST)
async def debug_document(ls: EditkvServer, params: Any) -> dict:
    """{uri, kv?}: digests of the server's copies of a document's text, whether its tokens equal a
    full tokenization, whether it is out of sync, memory; with kv, its KV's largest difference from
    a fresh prefill after refreshing it (for tests and fuzzing; answered in order with the edits)."""
    data = _plain(params)
    if not isinstance(data, dict) or not isinstance(data.get("uri"), str):
        raise JsonRpcInvalidParams(message=f"{DEBUG_DOCUMENT_REQUEST} needs {{uri: string, kv?: bool}}")
    uri = data["uri"]
    state = ls.docs.get(uri)
    if state is None:
        raise JsonRpcInvalidParams(message=f"editkv: {UnknownDocumentError(uri)}")
    try:
        out = await asyncio.wrap_future(ls.worker.debug_document(uri, bool(data.get("kv"))))
    except UnknownDocumentError as err:
        raise JsonRpcInvalidParams(message=f"editkv: {err}") from None
    return {**out, "version": state.version, "loop_edits": state.edits}


@handles(DEBUG_FAULTS_REQUEST)
def debug_faults(ls: EditkvServer, params: Any) -> dict:
    """{plan}: replace the fault plan (engine/faults.py; hits count from now on); answers what the
    old plan counted and fired. Only for a server started with EDITKV_FAULTS set (tests)."""
    import os

    data = _plain(params)
    if not os.environ.get("EDITKV_FAULTS"):
        raise JsonRpcInvalidParams(message=f"{DEBUG_FAULTS_REQUEST} needs a server started with EDITKV_FAULTS set")
    if not isinstance(data, dict) or not isinstance(data.get("plan"), str):
        raise JsonRpcInvalidParams(message=f"{DEBUG_FAULTS_REQUEST} needs {{plan: 'site@N=kind,...'}}")
    from editkv.engine import faults

    try:
        plan = faults.FaultPlan.parse(data["plan"])
    except ValueError as err:
        raise JsonRpcInvalidParams(message=str(err)) from None
    old = faults.install(plan)
    return {"hits": dict(old.hits) if old else {}, "fired": [list(f) for f in old.fired] if old else []}


@handles(DEBUG_MEMORY_REQUEST)
def debug_memory(ls: EditkvServer, params: Any) -> dict:
    """{trim?, top?}: resident memory, traced growth by line and object counts by type since the
    previous call (lsp_server/memdebug.py). Only for a server started with EDITKV_TRACEMALLOC set."""
    from editkv.lsp_server import memdebug

    if ls.memory_probe is None:
        raise JsonRpcInvalidParams(message=f"{DEBUG_MEMORY_REQUEST} needs a server started with {memdebug.ENV} set")
    data = _plain(params)
    data = data if isinstance(data, dict) else {}
    return ls.memory_probe.report(trim=bool(data.get("trim")), top=int(data.get("top") or memdebug.TOP))


def _plain(value: Any) -> Any:
    """JSON data as dicts and lists (pygls hands custom methods' params over as namedtuples)."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def suggestion_accepted(ls: EditkvServer, *args: Any) -> None:
    """The command attached to every item: the editor runs it when the item is accepted."""
    if args and isinstance(args[0], str):
        ls.stats.event(args[0], "accepted")


COMMANDS.append((ACCEPT_COMMAND, suggestion_accepted))


def create_server(base_settings: Settings, factory: BackendFactory, *, stats: bool = True) -> EditkvServer:
    """A server with every editkv feature registered."""
    path = default_stats_path() if stats and base_settings.stats_file else None
    server = EditkvServer(base_settings=base_settings, factory=factory, stats_path=path)
    for method, options, handler in HANDLERS:
        server.feature(method, options)(handler)
    for name, handler in COMMANDS:
        server.command(name)(handler)
    return server
