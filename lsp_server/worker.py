"""The engine worker: one thread owns the backend and the server's copy of every open document.

    event loop (server.py)                    engine worker (here; one thread, FIFO)
    didOpen / didChange / didClose  ──────>   text copy + backend.open/change/close, in order
    completion request (debounced)  ──────>   Job: dropped when superseded, else
                                              backend.complete + postprocess on the text of
                                              exactly the version the request was made on
    settings / initialized          ──────>   load or reconfigure the backend

Every backend call happens on this thread, so the backend needs no locks and the LSP event
loop never waits for the model. A `Job` carries a `stop` flag the event loop sets when the
request is cancelled or superseded; the decode polls it before every step, unless the event
loop also set `finish` (the keystrokes since only typed at the request's cursor): then it runs
to its end and its suggestion is kept for typing along, though no one waits for it. Each document
counts its content changes on both sides (`edits`): a job runs only if the worker's copy has
seen exactly the changes the request was made after, so an answer for an older version of a
document can't be computed, let alone returned. Messages for the user go through `notify`,
which the server makes safe to call from this thread.

Faults: an exception from the backend while it computes (a completion, background work) is
classified (`fault_kind`): out of memory drops every document's KV; a device error (a CUDA
fault, e.g. in a graph replay or capture) drops the KV and turns CUDA graphs off, and a second
one reloads the model; anything else is a bug: that document is started over from the
worker's copy of its text (and the request fails). Each fault is
logged, reported to the user once, counted (`editkv/stats`), and a completion is tried once more
after the recovery. A reload frees the old model before building the new one, so it peaks at
one model's memory. In idle time the backend also cross-checks each changed document's tokens
against a full tokenization (`verify_tokens_idle`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from editkv.edit_cache.positions import Position, PositionError, Range, apply_change, to_offset, to_position
from editkv.lsp_server.backend import Backend, CompletionRequest, DecodingOptions
from editkv.lsp_server.postprocess import CursorContext, Suggestion, finish, is_python, wants_multiline
from editkv.lsp_server.settings import CrossFileOptions, Settings

log = logging.getLogger(__name__)
Notify = Callable[[str, str], None]  # (level: "error" | "warning" | "info", message)
BackendFactory = Callable[[Settings], Backend]
_WORD = re.compile(r"\w*$")
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, or UTF-16 halves JSON can smuggle in


class UnknownDocumentError(KeyError):
    """A request named a document that is not open."""

    def __str__(self) -> str:
        return f"document {self.args[0]} is not open (send textDocument/didOpen first)"


@dataclass
class DocText:
    """The worker's copy of one open document."""

    text: str
    language_id: str
    edits: int = 0  # content changes received, including ones that failed to apply
    modelled: bool = False  # the backend has it
    refused: str | None = None  # why it is not modelled (then its text is not kept either)
    # why our copy may differ from the editor's (a change that did not fit it): no completions
    # and no further incremental changes until a full-text change or a new didOpen resyncs it
    out_of_sync: str | None = None


@dataclass
class Job:
    """One completion request on its way to the model."""

    uri: str
    kind: str  # "inline" | "completion"
    line: int
    character: int
    encoding: str
    edits: int  # changes the document had when the request was made
    num_drafts: int
    settings: Settings
    stop: bool = False  # set by the event loop (cancelled / superseded), polled by the decode
    started: bool = False  # set by the worker when the job starts
    # set by the event loop when the keystrokes that superseded the job only type at its cursor:
    # the decode runs to its end anyway, and its suggestion is kept for the worker's typing along
    finish: bool = False
    created: float = field(default_factory=time.perf_counter)  # when the event loop made it

    def should_stop(self) -> bool:
        return self.stop and not self.finish


@dataclass
class Outcome:
    """What a job produced: `status` is one of "served", "dropped", "not_ready", "refused",
    "out_of_sync"."""

    status: str
    suggestions: list[Suggestion] = field(default_factory=list)
    word: str = ""  # identifier characters right before the cursor
    word_start: Position | None = None
    cursor: Position | None = None  # the request's position, clamped to its line
    multiline: bool = False
    stats: dict = field(default_factory=dict)


class EngineWorker:
    """Runs every backend call, in submission order, on one thread."""

    def __init__(self, factory: BackendFactory, notify: Notify,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # what "idle for idle_refresh_ms" is measured with (tests pass their own)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editkv-engine")
        self.factory = factory
        self.factory_is_fake = bool(getattr(factory, "fake", False))
        self.notify = notify
        self.backend: Backend | None = None
        self.backend_key: tuple | None = None
        self.settings = Settings()
        self.workspace_roots: tuple[str, ...] = ()  # the client's workspace folders (cross-file context reads them)
        # uri -> (its text, cursor offset, ghost text) of the last one-suggestion answer (type_along)
        self._shown: dict[str, tuple[str, int, Suggestion]] = {}
        self.typed_along = 0  # requests answered from the last ghost text
        self.docs: dict[str, DocText] = {}
        self._queued: dict[str, None] = {}  # documents the backend reads at first use or in background work
        self.loading = False
        self.load_error: str | None = None
        self.closing = False
        self.thread_id: int | None = None
        self.completed = 0
        self.last_stats: dict = {}  # what the backend reported for the last served request
        # Idle refresh: once no work has come for settings.idle_refresh_ms, stale tokens are
        # re-encoded in chunks, each its own job, so a request waits for one chunk at most.
        self._lock = threading.Lock()
        self._pending = 0  # submitted jobs not finished yet
        self._last_work = clock()
        self._work_count = 0  # jobs submitted through call(); idle work compares it, not times
        # after an idle chunk: "more" (it did work and nothing came meanwhile: the next chunk
        # goes at once), "done" (nothing was stale: no timer until new work comes), else None
        self._idle_next: str | None = None
        self._idle_timer: threading.Timer | None = None
        self.idle_refreshed = 0  # tokens encoded by background work
        self.idle_runs = 0  # background jobs run
        self.idle_captures = 0  # CUDA graphs captured by background jobs (deferred from requests)
        self.idle_reads = 0  # queued documents read by background jobs
        self._urgent = False  # the backend has work that need not wait for idle_refresh_ms (see below)
        self.backend_settings: Settings | None = None  # what the backend was built with
        self.faults: dict[str, int] = {"oom": 0, "device": 0, "error": 0}  # recovered from, by kind
        self.reloads = 0  # backends rebuilt after a device fault
        self.last_fault: str | None = None

    @property
    def unread(self) -> int:
        """Documents opened that the backend has not read yet."""
        return len(self._queued)

    # ---- submission (any thread) ------------------------------------------------------------

    def call(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the worker; its result or exception goes to the future."""
        if self.closing:
            future: Future = Future()
            future.cancel()
            return future
        with self._lock:
            self._pending += 1
            self._last_work = self._clock()
            self._work_count += 1
            self._idle_next = None
        return self._submit(fn, *args)

    def _submit(self, fn: Callable, *args) -> Future:
        """Queue `fn` (counted in `_pending`); the count drops when it ends or is cancelled unrun."""
        try:
            future = self._pool.submit(self._on_thread, fn, *args)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._pending -= 1
            future = Future()
            future.cancel()
            return future
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1
            if not self._pending and self._idle_next != "done":
                self._arm_idle(0.0 if self._idle_next == "more" else max(0.0, self._idle_wait_s()))

    def run(self, fn: Callable, *args) -> Future:
        """Like `call`, for notifications: failures are logged and reported, never raised."""
        return self.call(self._guarded, fn, *args)

    def open(self, uri: str, text: str, language_id: str) -> Future:
        return self.run(self._open, uri, text, language_id)

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str) -> Future:
        return self.run(self._change, uri, changes, encoding)

    def close(self, uri: str) -> Future:
        return self.run(self._close, uri)

    def load(self, settings: Settings) -> Future:
        """(Re)load the backend for `settings`; the future gives (ok, message)."""
        return self.call(self._load, settings)

    def configure(self, settings: Settings) -> Future:
        return self.run(self._configure, settings)

    def complete(self, job: Job) -> Future:
        return self.call(self._complete, job)

    def debug_document(self, uri: str, kv: bool = False) -> Future:
        """`editkv/debugDocument`: see `_debug`."""
        return self.call(self._debug, uri, kv)

    def stop(self) -> None:
        """Stop taking work; a running decode stops at its next step."""
        self.closing = True
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- idle refresh -----------------------------------------------------------------------

    IDLE_CHUNK_TOKENS = 256  # tokens encoded per background job (which stops early when work comes)
    URGENT_QUIET_MS = 50  # quiet before urgent background work (keys typed in a burst come faster)

    def _idle_wait_s(self) -> float:
        """How much longer to wait before background work; called with the lock held.

        Tokens with no keys yet (a big file's text after the cursor) or more stale tokens than
        the stale budget are urgent: they wait for a short quiet spell, not for idle_refresh_ms.
        Either way the work runs in chunks that stop when a request comes, so a request waits
        for one small chunk at most.
        """
        quiet_ms = self.settings.idle_refresh_ms
        if self._urgent:
            quiet_ms = min(quiet_ms, self.URGENT_QUIET_MS)
        return quiet_ms / 1000 - (self._clock() - self._last_work)

    def _arm_idle(self, delay_s: float) -> None:
        """(Re)start the idle timer; called with the lock held."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = None
        if self.closing or not self.settings.idle_refresh_ms or self.backend is None or not self.backend.idle_work:
            return
        self._idle_timer = threading.Timer(delay_s, self._on_idle_timer)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _on_idle_timer(self) -> None:
        with self._lock:
            if self.closing or self._pending:
                return  # the job that finishes last re-arms the timer
            if self._idle_next is None:
                wait = self._idle_wait_s()
                if wait > 0:
                    self._arm_idle(wait)
                    return
            self._pending += 1
            work_before = self._work_count
        self._submit(self._idle_refresh, work_before)

    def _idle_refresh(self, work_before: int) -> None:
        """One chunk of stale tokens re-encoded; the timer comes back at once while some are left,
        and not at all once none are (until new work comes)."""
        self.idle_runs += 1

        def work_came() -> bool:
            return self.closing or self._work_count != work_before

        done = checked = captured = read = 0
        quieter = False  # graphs wait to be captured, and the user has not been idle long enough yet
        try:
            if self._queued and self.backend is not None:  # documents opened and not read yet, one a job
                uri = next(iter(self._queued))
                try:
                    read = int(self._read(uri))
                finally:
                    self._queued.pop(uri, None)  # one that fails is read again at its next request
                self.idle_reads += read
            elif self.backend is not None and self.backend.pending_captures():
                # CUDA graphs requests ran without: captured first (each speeds every later request
                # of its shape), but a capture can't stop halfway, so only after idle_refresh_ms
                # without work, never in the short quiet between keys that urgent work takes
                if (self._clock() - self._last_work) * 1000 >= self.settings.idle_refresh_ms:
                    captured = self.backend.capture_idle(work_came)
                    self.idle_captures += captured
                else:
                    quieter = True
            # a capture or a document read is the job's work
            if not (captured or read) and self.backend is not None and not work_came():
                done = self.backend.refresh_idle(self.IDLE_CHUNK_TOKENS, work_came)
            if not (captured or read or done) and self.backend is not None and not work_came():
                checked = self.backend.verify_tokens_idle()  # documents cross-checked against a full tokenization
        except Exception as err:  # idle work must never take the server down
            self._recover(err, "background work")
            done = 0
        self.idle_refreshed += done
        with self._lock:  # no work came meanwhile: the next chunk goes without a new wait
            if self._work_count == work_before:
                self._idle_next = "more" if done or checked or captured or read else None if quieter else "done"

    # ---- on the worker thread ---------------------------------------------------------------

    def _on_thread(self, fn: Callable, *args: Any) -> Any:
        self.thread_id = threading.get_ident()
        try:
            return fn(*args)
        finally:  # read here, on the thread that owns the documents
            try:
                self._urgent = self.backend is not None and (bool(self._queued) or bool(self.backend.urgent_work()))
            except Exception:
                self._urgent = False

    def _guarded(self, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except UnknownDocumentError as err:
            log.warning("%s", err)
        except Exception as err:  # a backend bug must not take the server down
            log.error("engine worker: %s", traceback.format_exc())
            self.notify("error", f"editkv: internal error in {fn.__name__.strip('_')}: {type(err).__name__}: {err}")

    def _admit(self, uri: str, doc: DocText) -> None:
        """Refuse `doc` if it is too big or binary (then forget its text); else queue it for the
        backend, which reads it (tokens, the n-gram index) at its first request or in background
        work, whichever comes first: an editor restoring its tabs sends every didOpen before its
        first request, and that request should not wait for all of them to be read."""
        reason = refusal(uri, doc.text, self.settings.max_file_kb)
        if reason is not None:
            self._queued.pop(uri, None)
            if doc.modelled and self.backend is not None:
                self.backend.close(uri)
            doc.modelled, doc.refused, doc.text = False, reason, ""
            self.notify("warning", reason)
            return
        if doc.modelled and self.backend is not None:
            self.backend.close(uri)  # read again from our copy
        doc.modelled = False
        self._queued[uri] = None

    def _read(self, uri: str) -> bool:
        """Hand `uri` to the backend now if it is queued (or a read of it failed); whether the
        backend has it."""
        doc = self.docs.get(uri)
        if doc is None or self.backend is None:
            return False
        if not doc.modelled and doc.refused is None and doc.out_of_sync is None:
            self.backend.open(uri, doc.text)
            doc.modelled = True
        self._queued.pop(uri, None)
        return doc.modelled

    def _open(self, uri: str, text: str, language_id: str) -> None:
        if uri in self.docs and self.docs[uri].modelled and self.backend is not None:
            self.backend.close(uri)
        doc = DocText(text, language_id)
        self.docs[uri] = doc
        self._admit(uri, doc)

    def _change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str) -> None:
        doc = self.docs.get(uri)
        if doc is None:
            raise UnknownDocumentError(uri)
        doc.edits += 1
        if doc.refused:
            return
        if doc.out_of_sync:
            whole = [i for i, (rng, _) in enumerate(changes) if rng is None]
            if not whole:
                return  # an incremental change to a text we don't have: wait for the whole text
            changes = changes[whole[-1]:]  # the editor's full text, and what it sent after it
        text = doc.text
        try:
            for rng, new_text in changes:
                text = apply_change(text, rng, new_text, encoding)[0]
        except PositionError as err:
            doc.out_of_sync = f"a change did not fit editkv's copy of {_name(uri)} ({err})"
            self.notify("error", f"editkv: {doc.out_of_sync}; no suggestions for it until the editor "
                        "sends its whole text again (close and reopen the file).")
            return
        if doc.out_of_sync:  # resynced by a full-text change: start the document over
            doc.out_of_sync = None
            doc.text = text
            if doc.modelled and self.backend is not None:
                self.backend.close(uri)
                doc.modelled = False
            self._admit(uri, doc)
            self.notify("info", f"editkv: {_name(uri)} is in sync again.")
            return
        doc.text = text
        if any(_NOT_TEXT.search(t) for _, t in changes) or len(text) > self.settings.max_file_kb * 1024:
            self._admit(uri, doc)
            return
        if doc.modelled and self.backend is not None:
            try:
                self.backend.change(uri, changes, encoding)
            except Exception:  # out of step: start this document over from our copy
                log.error("backend change failed, reopening %s: %s", uri, traceback.format_exc())
                self.backend.close(uri)
                self.backend.open(uri, text)

    def _close(self, uri: str) -> None:
        self._shown.pop(uri, None)
        doc = self.docs.pop(uri, None)
        self._queued.pop(uri, None)
        if doc is not None and doc.modelled and self.backend is not None:
            self.backend.close(uri)

    def _configure(self, settings: Settings) -> None:
        self.settings = settings
        if self.backend is not None:
            self.backend.configure(**cache_options(settings))
        for uri, doc in self.docs.items():
            if doc.refused is None and len(doc.text) > settings.max_file_kb * 1024:
                self._admit(uri, doc)

    def _load(self, settings: Settings) -> tuple[bool, str]:
        """Build the backend for `settings`, the old one freed first (a reload peaks at one model's
        memory); if the new one fails, the old one is built again from its settings."""
        self.loading = True
        self.settings = settings
        try:
            previous = self.backend_settings
            self._release_backend()
            self._shown.clear()
            try:
                backend = self.factory(settings)
            except Exception as err:
                message = load_error_message(settings, err)
                if previous is not None:
                    try:
                        self._install(self.factory(previous), previous)
                        message += f" Still using {self.backend.description}."
                    except Exception as again:
                        log.error("reloading the previous model failed: %s", traceback.format_exc())
                        message += (f" The previous model did not load again either ({type(again).__name__}: "
                                    f"{str(again)[:200]}); no suggestions until a model loads.")
                self.load_error = message
                return False, message
            self._warm_up(backend, settings)
            self._install(backend, settings)
            return True, backend.description
        finally:
            self.loading = False

    def _warm_up(self, backend: Backend, settings: Settings) -> None:
        """The backend's warm-up (setting `warmUp`; unset: where graphs replay), before it serves.
        A warm-up that fails leaves the backend as it is: requests then pay their first uses."""
        if settings.warm_up is False or (settings.warm_up is None and not backend.graphs_replay()):
            return
        try:
            report = backend.warm_up(view=settings.view, num_drafts=settings.num_drafts, max_tokens=settings.max_tokens,
                                     should_stop=lambda: self.closing)
        except Exception:
            log.error("warm-up failed (requests capture their graphs on first use): %s", traceback.format_exc())
            try:
                backend.drop_caches()  # nothing half made is kept (a device fault may have broken it)
            except Exception:
                log.error("dropping the warm-up's caches: %s", traceback.format_exc())
            return
        if report:
            log.info("warm-up: %s", report)

    def _install(self, backend: Backend, settings: Settings) -> None:
        """Make `backend` the one in use and hand it every open document."""
        self.backend, self.backend_key, self.backend_settings, self.load_error = (
            backend, settings.model_key, settings, None)
        for uri, doc in self.docs.items():
            doc.modelled = False
            if doc.refused is None and doc.out_of_sync is None:
                self._admit(uri, doc)

    def _release_backend(self) -> None:
        """Forget the backend and free what it held (its model, KV, graphs) before anything new is built."""
        old, self.backend, self.backend_settings = self.backend, None, None
        for doc in self.docs.values():
            doc.modelled = False
        if old is None:
            return
        try:
            old.release()
        except Exception:
            log.error("releasing the backend: %s", traceback.format_exc())
        del old
        gc.collect()  # the model and its static forward refer to each other
        _empty_device_cache()

    def _complete(self, job: Job) -> Outcome:
        if job.stop or self.closing:
            return Outcome("dropped")
        job.started = True
        # from the request's arrival to here: its debounce and the work ahead of it on the worker
        # (a repair, a request being finished for typing along, a background chunk)
        began = time.perf_counter()
        waited = {"wait_ms": 1000 * (began - job.created), "edits": job.edits}
        doc = self.docs.get(job.uri)
        if doc is None:
            raise UnknownDocumentError(job.uri)
        if doc.edits != job.edits:
            return Outcome("dropped")
        if doc.refused:
            return Outcome("refused")
        if doc.out_of_sync:
            return Outcome("out_of_sync", stats={"reason": doc.out_of_sync})
        cursor = to_offset(doc.text, Position(job.line, job.character), job.encoding)
        if job.settings.cross_file:  # every open document may be context
            for uri in list(self._queued):
                self._read(uri)
        if not self._read(job.uri):
            return Outcome("not_ready")
        settings = job.settings
        ctx = CursorContext(doc.text, cursor, python=is_python(job.uri, doc.language_id))
        multiline = wants_multiline(settings.multiline, ctx)
        ctx = CursorContext(doc.text, cursor, python=ctx.python, multiline=multiline, max_lines=settings.max_lines)
        along = self._typed_along(job, doc.text, cursor)
        if along is not None:
            self.typed_along += 1
            self.last_stats = {"strategy": "typed_along", "total_ms": 0.0, "encoded_tokens": 0, **waited}
            word = _WORD.search(ctx.before).group(0)
            return Outcome("served", [along], word, to_position(doc.text, cursor - len(word), job.encoding),
                           to_position(doc.text, cursor, job.encoding), multiline, dict(self.last_stats))
        request = CompletionRequest(
            job.uri, job.line, job.character, encoding=job.encoding, max_tokens=settings.max_tokens,
            max_lines=settings.max_lines if multiline else 1, multiline_ms=settings.multiline_ms,
            num_drafts=job.num_drafts, view=settings.view,
            roots=self.workspace_roots,
        )
        try:
            result = self.backend.complete(request, should_stop=lambda: job.should_stop() or self.closing)
        except Exception as err:
            if self._recover(err, "completing", job.uri) is None:
                raise  # a bug: the handler turns it into an error response
            if job.stop or self.closing or not self._read(job.uri):  # (reloaded: read again)
                return Outcome("dropped")
            try:  # once more, on what the recovery left
                result = self.backend.complete(request, should_stop=lambda: job.stop or self.closing)
            except Exception as again:
                if self._recover(again, "completing (after recovering)", job.uri) is None:
                    raise
                return Outcome("dropped")
        if job.stop and not job.finish:
            return Outcome("dropped", stats=result.stats)
        self.completed += 1
        self.last_stats = {**result.stats, **waited}
        word = _WORD.search(ctx.before).group(0)
        suggestions = finish([(d.text, d.score) for d in result.drafts], ctx)
        # the worker's whole share: the backend's total_ms plus what the worker does around it
        # (the device's last work, the KV budget, trimming and ranking the drafts)
        self.last_stats["worker_ms"] = 1000 * (time.perf_counter() - began)
        if job.stop:  # finished for typing along: no one waits for it, the next request may use it
            if job.num_drafts == 1 and suggestions and suggestions[0].text:
                self._shown[job.uri] = (doc.text, cursor, suggestions[0])
            return Outcome("dropped", stats=result.stats)
        if job.num_drafts == 1 and suggestions and suggestions[0].text:
            self._shown[job.uri] = (doc.text, cursor, suggestions[0])
        else:
            self._shown.pop(job.uri, None)
        return Outcome(
            "served", suggestions, word,
            to_position(doc.text, cursor - len(word), job.encoding), to_position(doc.text, cursor, job.encoding),
            multiline, result.stats,
        )

    def _typed_along(self, job: Job, text: str, cursor: int) -> Suggestion | None:
        """The rest of the ghost text answered last for this document when the only change since
        is its start typed at its cursor (a one-suggestion request, `type_along` on, not the
        recompute baseline); None otherwise."""
        shown = self._shown.get(job.uri)
        if shown is None or job.num_drafts != 1 or not job.settings.type_along \
                or job.settings.cache_mode == "recompute":
            return None
        old_text, old_cursor, suggestion = shown
        typed = cursor - old_cursor
        if not 0 < typed < len(suggestion.text) or len(text) != len(old_text) + typed \
                or text[old_cursor:cursor] != suggestion.text[:typed] \
                or not (text.startswith(old_text[:old_cursor]) and text.endswith(old_text[old_cursor:])):
            return None
        return Suggestion(suggestion.text[typed:], suggestion.score, suggestion.parses)

    def _recover(self, err: BaseException, during: str, uri: str | None = None) -> str | None:
        """Log a backend failure, recover from it, tell the user once; its kind (None: a bug, for
        which only the document `uri` is started over and the caller re-raises)."""
        kind = fault_kind(err)
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        log.error("%s failed (%s): %s", during, kind or "bug", "".join(traceback.format_exception(err)))
        self.faults[kind or "error"] += 1
        self.last_fault = f"{kind or 'error'} while {during}: {first}"
        backend = self.backend
        if kind == "oom":
            self._call_backend("drop_caches")
            _empty_device_cache()
            self.notify("error", f"editkv: out of memory while {during} ({first}); dropped all cached documents. "
                        "Lower editkv.kvBudgetMb or editkv.maxTokens, or use a smaller model.")
        elif kind == "device":
            self._call_backend("drop_caches")
            if self._call_backend("disable_graphs"):
                self.notify("error", f"editkv: device error while {during} ({first}); dropped all cached documents "
                            "and turned CUDA graphs off (forwards run eagerly from now on).")
            elif self.backend_settings is not None:  # graphs were off already: start the model over
                self.reloads += 1
                ok, message = self._load(self.settings)
                self.notify("error", f"editkv: device error while {during} ({first}); "
                            + ("reloaded the model." if ok else f"reloading the model failed: {message}"))
            else:
                self.notify("error", f"editkv: device error while {during} ({first}).")
        elif uri is not None:  # start the document over; the request's error response tells the user
            doc = self.docs.get(uri)
            if backend is not None and doc is not None and doc.modelled:
                try:
                    backend.close(uri)
                    backend.open(uri, doc.text)
                except Exception:
                    log.error("reopening %s: %s", uri, traceback.format_exc())
                    doc.modelled = False
        else:
            self.notify("error", f"editkv: internal error while {during}: {type(err).__name__}: {first}")
        return kind

    def _call_backend(self, name: str, *args: Any) -> Any:
        """`backend.name(*args)` if a backend is loaded; a failure here is logged, never raised."""
        if self.backend is None:
            return None
        fn = getattr(self.backend, name)
        try:
            return fn(*args)
        except Exception:
            log.error("backend.%s: %s", name, traceback.format_exc())
            return None

    def _debug(self, uri: str, kv: bool) -> dict:
        """What the worker and the backend hold for `uri`: digests of the text, token and KV
        checks (`kv`: refresh the document, then compare its KV with a fresh prefill; costly)."""
        doc = self.docs.get(uri)
        if doc is None:
            raise UnknownDocumentError(uri)
        modelled = self._read(uri)
        out: dict[str, Any] = {
            "text_sha256": _digest(doc.text), "text_length": len(doc.text), "edits": doc.edits,
            "out_of_sync": doc.out_of_sync, "refused": doc.refused, "modelled": modelled,
            "backend": None, "faults": dict(self.faults), "reloads": self.reloads,
        }
        if modelled:
            out["backend"] = self.backend.debug_document(uri, kv)
        return out


def fault_kind(err: BaseException) -> str | None:
    """"oom", "device" (a CUDA error other than out of memory) or None (anything else: a bug).

    By type: torch.OutOfMemoryError and MemoryError; torch.AcceleratorError (what a CUDA fault
    raises since torch 2.8). A RuntimeError is read by its message only as a fallback, for
    libraries that raise plain RuntimeErrors for the same conditions."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"OutOfMemoryError", "MemoryError"}:
        return "oom"
    if "AcceleratorError" in names:
        return "device"
    if isinstance(err, RuntimeError):
        text = str(err)
        if "out of memory" in text.lower():
            return "oom"
        if text.startswith(("CUDA error", "CUBLAS_STATUS", "cuDNN error")) or "device-side assert" in text:
            return "device"
    return None


def _empty_device_cache() -> None:
    """Hand freed CUDA memory back (only if torch is loaded and CUDA was used)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def refusal(uri: str, text: str, max_file_kb: int) -> str | None:
    """Why a document must not be modelled (too big, binary), or None."""
    if len(text) > max_file_kb * 1024:
        size = len(text.encode("utf-8", errors="replace"))
        return (f"editkv: {_name(uri)} is {size / 2**20:.1f} MB; files over {max_file_kb} KB get no suggestions "
                "(raise editkv.maxFileKb to change this). Reopen it once it is smaller.")
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        what = "NUL bytes (binary data?)" if bad.group() == "\x00" else "unpaired UTF-16 surrogates (not text)"
        return f"editkv: {_name(uri)} contains {what}; it gets no suggestions. Reopen it once it is text."
    return None


def cache_options(settings: Settings) -> dict:
    """`configure()` keyword arguments of a ModelBackend for `settings`."""
    from editkv.edit_cache.document import TUNED, DocumentOptions

    mode = "pie" if settings.cache_mode == "recompute" else settings.cache_mode
    options = DocumentOptions(mode=mode, stale_budget=settings.stale_budget or None,
                              fim_suffix_cache=settings.fim_suffix_cache)
    # the model-tuned options as the user set them; the backend fills in its model's for None
    tuned = {name: getattr(settings, name) for name in TUNED}
    return {"budget_bytes": settings.budget_bytes, "options": options, "tuned": tuned,
            "recompute": settings.cache_mode == "recompute", "decoding": DecodingOptions.from_settings(settings),
            "background": settings.idle_refresh_ms > 0 and settings.cache_mode != "recompute",
            "cross_file": CrossFileOptions.from_settings(settings), "window": settings.window_tokens}


def load_error_message(settings: Settings, err: BaseException) -> str:
    """One line for the user about a failed model load."""
    what = settings.model or "the default model"
    text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    if isinstance(err, MemoryError) or "out of memory" in text.lower():
        return (f"editkv: out of memory loading {what} on {settings.device}; "
                "try a smaller model or editkv.device = cpu.")
    if type(err).__name__ == "EngineError":
        return f"editkv: could not load the model: {text}"
    log.error("model load failed: %s", "".join(traceback.format_exception(err)))
    return f"editkv: could not load {what}: {type(err).__name__}: {text}"


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1] or uri
