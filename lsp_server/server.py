"""`editkv lsp`: the language server object, its typed state, and how it starts.

The server's state lives on one `EditkvServer` (a pygls `LanguageServer`); the LSP handlers
are top-level functions in `features.py`. The event loop only does bookkeeping: document
versions, which request is the newest per document, debounce timers, settings. All model
work, and the only copy of each document's text, is on the engine worker (`worker.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path

from editkv.lsp_server import server_version
from editkv.lsp_server.backend import DEVICE_STATS, Backend
from editkv.lsp_server.protocol import PARSE_ERROR, EditkvProtocol
from editkv.lsp_server.settings import Settings
from editkv.lsp_server.stats import Stats, default_stats_path
from editkv.lsp_server.worker import BackendFactory, EngineWorker, Job, cache_options
from lsprotocol import types
from pygls.lsp.server import LanguageServer

log = logging.getLogger(__name__)
# testing: how small forwards run: "static" (the CUDA-graph path's static forward, run eagerly: on
# the CPU this exercises graph keys, their bound and the fault sites of engine/faults.py), "off",
# "graphs"; unset: load_model's choice (graphs on CUDA)
GRAPHS_ENV = "EDITKV_GRAPHS"
MESSAGE_REPEAT_S = 10.0  # the same message is shown at most this often
_LEVELS = {"error": types.MessageType.Error, "warning": types.MessageType.Warning, "info": types.MessageType.Info}


class Pending:
    """A completion request between its arrival and its answer, as the event loop sees it.

    `supersede` (a newer edit or request for the same document) stops the job and wakes the
    handler at once, whether it is in its debounce wait or waiting for the worker.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.waiting: asyncio.Future | None = None
        self.superseded = False

    def supersede(self) -> None:
        self.superseded = True
        self.job.stop = True
        if self.waiting is not None and not self.waiting.done():
            self.waiting.cancel()


@dataclass
class DocState:
    """What the event loop knows of an open document (its text lives on the worker)."""

    uri: str
    language_id: str
    version: int
    edits: int = 0  # content changes so far; the worker counts the same ones
    pending: dict[str, Pending] = field(default_factory=dict)  # newest request per kind
    last_change: float = float("-inf")  # time.monotonic() of the last content change
    change_gap: float = float("inf")  # seconds between the last two content changes
    # the ghost text shown last, as far as the user has typed along it since: (edits when it held,
    # line, character of its cursor, the rest of it); None once any other change comes
    along: tuple[int, int, int, str] | None = None
    # a superseded request the worker finishes because the keystrokes since only typed at its
    # cursor, and where the next such keystroke would go: (job, line, character)
    finishing: tuple[Job, int, int] | None = None

    def changed(self) -> None:
        """Note a content change (the debounce asks how fast they come)."""
        now = time.monotonic()
        self.change_gap, self.last_change = now - self.last_change, now

    def in_burst(self, window_s: float) -> bool:
        """Whether keystrokes come faster than `window_s` apart (a burst: wait for its end)."""
        return self.change_gap < window_s

    def stop_finishing(self) -> None:
        """Stop the request being finished for typing along (its document changed otherwise, or closed)."""
        if self.finishing is not None:
            self.finishing[0].finish = False
            self.finishing = None

    def supersede(self, kind: str | None = None) -> None:
        for k, p in list(self.pending.items()):
            if kind is None or k == kind:
                p.supersede()


class EditkvServer(LanguageServer):
    """editkv's language server: documents, settings, the engine worker, statistics."""

    def __init__(self, *, base_settings: Settings, factory: BackendFactory, stats_path: Path | None = None) -> None:
        super().__init__("editkv", server_version(), protocol_cls=EditkvProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.base_settings = base_settings
        self.settings = base_settings
        self.settings_problems: list[str] = []
        self.typed_along = 0  # inline requests answered on the event loop from the ghost text typed along
        self.docs: dict[str, DocState] = {}
        self.encoding = "utf-16"
        self.session_started = False  # initialize received
        self.client_progress = False
        self.client_config_pull = False
        self.completion_as_is = False  # client takes multi-line insertions verbatim when asked
        self.worker = EngineWorker(factory, self.notify_from_any_thread)
        self.stats = Stats(stats_path)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.tasks: set[asyncio.Task] = set()
        self.loads = 0
        self._last_shown: dict[str, float] = {}
        self.memory_probe = None  # editkv/debugMemory (lsp_server/memdebug.py), with EDITKV_TRACEMALLOC
        if os.environ.get("EDITKV_TRACEMALLOC"):
            from editkv.lsp_server import memdebug

            memdebug.start_from_env()
            self.memory_probe = memdebug.MemoryProbe()

    # ---- messages to the user ---------------------------------------------------------------

    def show(self, level: str, message: str) -> None:
        """`window/showMessage` (event loop only); repeats within MESSAGE_REPEAT_S are only logged."""
        getattr(log, "info" if level == "info" else level)("%s", message)
        now = time.monotonic()
        if now - self._last_shown.get(message, -1e9) < MESSAGE_REPEAT_S:
            return
        self._last_shown[message] = now
        if len(self._last_shown) > 256:
            self._last_shown = dict(list(self._last_shown.items())[-128:])
        self.window_show_message(types.ShowMessageParams(type=_LEVELS.get(level, types.MessageType.Info),
                                                         message=message))

    def notify_from_any_thread(self, level: str, message: str) -> None:
        """`show`, safe to call from the engine worker."""
        if self.loop is None:
            log.warning("%s", message)
        elif threading.get_ident() == self.loop_thread:
            self.show(level, message)
        else:
            self.loop.call_soon_threadsafe(self.show, level, message)

    def report_server_error(self, error: Exception, source: type) -> None:
        """Malformed JSON gets JSON-RPC's parse error; other protocol errors are logged and shown."""
        if isinstance(error, json.JSONDecodeError | UnicodeDecodeError | RecursionError):
            self.protocol.send_error(None, PARSE_ERROR, f"parse error: the message is not valid JSON ({error})")
            return
        if source.__name__ in ("FeatureRequestError", "JsonRpcException"):
            log.warning("protocol error: %s", error)
            return
        self.show("error", f"editkv: internal error: {error}")

    # ---- background work --------------------------------------------------------------------

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run `coro` on the event loop, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def load_backend(self, settings: Settings) -> bool:
        """Load the backend on the worker, with `$/progress` when the client shows it."""
        self.loads += 1
        token = f"editkv-load-{self.loads}" if self.client_progress else None
        what = "fake backend" if self.worker.factory_is_fake else (settings.model or "default model")
        if token is not None:
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 10)
                self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                    title="editkv", message=f"loading {what} on {settings.device}", cancellable=False))
            except Exception as err:  # a client that refuses progress still gets a model
                log.warning("no progress reporting: %s", err)
                token = None
        ok, message = await asyncio.wrap_future(self.worker.load(settings))
        view = self.worker.backend.view_choice if ok and self.worker.backend is not None else None
        if view is not None:  # which view `view: auto` serves, and why
            message += f"; view auto = {view['auto']}: {view['why']}"
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(
                message=f"ready: {message}" if ok else "model not loaded"))
        if ok:
            self.window_log_message(types.LogMessageParams(type=types.MessageType.Info,
                                                           message=f"editkv: ready ({message})"))
        else:
            self.show("error", message)
        return ok

    def apply_settings(self, new: Settings, problems: list[str]) -> None:
        """Report problems; reload the backend if the model changed, else reconfigure it."""
        for problem in problems:
            self.show("warning", problem)
        old, self.settings = self.settings, new
        self.stats.path = default_stats_path() if new.stats_file else None
        if new.model_key != old.model_key or (self.worker.backend is None and not self.worker.loading):
            self.spawn(self.load_backend(new))
        else:
            self.worker.configure(new)

    def snapshot(self) -> dict:
        """`editkv/stats`: counters, backend state, documents."""
        backend = self.worker.backend
        return {
            **self.stats.snapshot(),
            "backend": {
                "ready": backend is not None, "loading": self.worker.loading,
                "description": backend.description if backend is not None else None,
                "view": backend.view_choice if backend is not None else None,  # what `view: auto` serves, and why
                "error": self.worker.load_error, "completed": self.worker.completed,
                # answered from the last ghost text, no model: on the event loop, or on the worker
                "typed_along": self.worker.typed_along + self.typed_along,
                "last_request": self.worker.last_stats,
                "evictions": getattr(getattr(backend, "cache", None), "evictions", None),
                "idle_refreshed_tokens": self.worker.idle_refreshed,
                "idle_captures": self.worker.idle_captures,  # CUDA graphs taken while the user was idle
                # documents opened and not read by the backend yet (read at their first request or
                # by background work), and how many background work read
                "unread_documents": self.worker.unread, "idle_reads": self.worker.idle_reads,
                # the load's warm-up (lsp_server/warm_up.py): buckets, requests, graphs captured, ms
                "warm_up": backend.warm_up_report if backend is not None else None,
                # every token the requests ran through the model (idle refresh: the line above)
                "encoded_tokens": getattr(backend, "encoded_tokens", None),
                # faults recovered from by kind (oom, device, error), models reloaded after one
                "faults": dict(self.worker.faults), "reloads": self.worker.reloads,
                "last_fault": self.worker.last_fault,
                # documents whose incremental tokens differed from a full tokenization (reopened)
                "token_repairs": getattr(backend, "token_repairs", None),
                # device memory now and at its peak, the KV pool, CUDA graphs captured (None off CUDA)
                **(backend.device_stats() if backend is not None else dict.fromkeys(DEVICE_STATS)),
            },
            "documents": {uri: {"version": d.version, "edits": d.edits, "pending": sorted(d.pending)}
                          for uri, d in self.docs.items()},
            # handlers pygls files as running (bounded by what is in flight: see protocol.py)
            "handlers_in_flight": len(self.protocol._request_futures),
            "position_encoding": self.encoding,
            "settings": asdict(self.settings),
        }

    def shutdown(self) -> None:
        """Stop the worker (a running decode stops at its next step), save stats, stop pygls."""
        self.worker.stop()
        self.stats.save()
        super().shutdown()


def fake_factory(delay_s: float = 0.0, load_s: float = 0.0) -> BackendFactory:
    """Backends that answer `<fake line:col>` (protocol tests, debugging)."""

    def make(settings: Settings) -> Backend:
        from editkv.lsp_server.backend import FakeBackend

        time.sleep(load_s)
        return FakeBackend(delay_s)

    make.fake = True  # type: ignore[attr-defined]
    return make


def model_factory() -> BackendFactory:
    """Backends over a real model: `settings.model` or the embedded default."""

    def make(settings: Settings) -> Backend:
        from editkv.engine.loading import load_model, resolve_model
        from editkv.lsp_server.backend import ModelBackend

        loaded = load_model(resolve_model(settings.model), device=settings.device, dtype=settings.dtype,
                            cpu_weights=settings.cpu_weights)
        graphs = os.environ.get(GRAPHS_ENV)
        if graphs == "off":
            loaded.runner.disable_graphs()
        elif graphs:  # "static": the graph path's static-shape forward, eagerly (tests on the CPU)
            loaded.runner.enable_graphs(mode=graphs)
        return ModelBackend(loaded, **cache_options(settings))

    return make
