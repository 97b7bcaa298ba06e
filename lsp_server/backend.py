"""The seam between the language server and the model: documents in, drafts out.

The server talks to a `Backend` only, from its single engine worker thread: `open`,
`change`, `close` keep the backend's copy of each document in step with the editor;
`complete` builds a context view at a position and runs a decoding strategy. The server
never touches tensors. `ModelBackend` is the real one (edit_cache + engine);
`FakeBackend` answers instantly and deterministically, for protocol tests only.

ModelBackend's strategies (`DecodingOptions`, from the settings):
- one draft (inline suggestions as you type): lossless n-gram speculation
  (engine.decoding.speculative), drafting from the prompt (the document before the cursor,
  and after it in a FIM view), the document after the cursor in a left-to-right view, the
  other open documents and recently shown suggestions; greedy output, fewer forwards. With
  `adadec` the entropy gate reranks uncertain positions inside the same loop.
- several drafts (dropdown items, inline cycling): superposed decoding
  (engine.decoding.superposed), k drafts from one forward per step, scored with the
  workspace n-gram index (every open document, updated on each edit, LRU-bounded) and the
  corpus table the model ships (`ngram.npz`).
Every request reports its counters in `CompletionResult.stats` (`editkv/stats` shows the last).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from editkv.edit_cache.positions import Position, Range, line_starts, to_offset
from editkv.lsp_server.request import CompletionRequest
from editkv.lsp_server.settings import CrossFileOptions, Settings, kv_budget_bytes

if TYPE_CHECKING:  # the model stack (torch) is imported when a ModelBackend is made, not before
    from editkv.edit_cache.document import Document, DocumentOptions
    from editkv.edit_cache.views import ContextView
    from editkv.engine.decoding.drafters import Reference
    from editkv.engine.generate import DecodeStats, StopRules
    from editkv.engine.loading import LoadedModel

log = logging.getLogger(__name__)
NGRAM_INDEX_TOKENS = 300_000  # workspace n-gram index bound (~100 bytes a token: ~30 MB)
REFERENCE_TOKENS = 100_000  # other open documents speculation drafts from, most recently used first
SUFFIX_TOKENS = 8192  # of the document after the cursor (left-to-right view)
# Off: on the H100 replay (BENCHMARKS.md, session 14) deferred graphs left most requests on the
# static ops run eagerly (a 400-token FIM view 25-60 ms instead of ~5) for want of idle time to
# capture them: p95 75 / p99 103 ms against 42 / 75 capturing at once.
DEFER_CAPTURES = False
# A multi-line suggestion's time limit by device (setting `multilineMs`), counted from the request's
# start: past it, decoding ends at the next line end (llama.cpp's t_max_predict_ms is the same rule).
# On an H100 a 64-token block of Qwen2.5-Coder-0.5B took up to 75 ms where one line takes ~10. The
# human-pace replay (session 17, BENCHMARKS.md) with 30: p99 64 ms, the tail keys at a new line or
# `:` (multi-line decodes of ~42 tokens, 35-40 ms in the server); with 20: p99 49, the same
# suggestion quality on every scored line, but those decodes ~18 tokens (a line or two, not three or
# four). The CPU's limit sits under its p95 target (300).
MULTILINE_MS = {"cuda": 20, "cpu": 250}
# (tokens before, after the cursor; setting `windowTokens`): a request with more than twice as many
# tokens before the cursor still without keys (a big file just opened) is answered from a window of
# the text around the cursor, as llama.vscode always does (its prefix and suffix are 256 and 64
# lines), and the file is encoded in the background; the window serves until fewer than an eighth
# as many are left. On the CPU the embedded model reads a 1.3k-token window in ~0.7 s where a 16.6k-
# token file took up to 4.3 s to the cursor (Qwen2.5-Coder-0.5B: 32 s; BENCHMARKS.md). Not on a GPU:
# 256-token graph chunks should encode a file's first 5k tokens in about a window's time there
# (not measured yet).
WINDOW: dict[str, tuple[int, int]] = {"cpu": (1024, 256)}


def answer_window(tokens: int | None, device: str) -> tuple[int, int] | None:
    """The window of setting `windowTokens` (None: the device's WINDOW; 0: none): (tokens before the
    cursor, after it)."""
    if tokens is None:
        return WINDOW.get(device)
    return (tokens, max(32, tokens // 4)) if tokens > 0 else None
# what `Backend.device_stats` reports: bytes the CUDA caching allocator has handed out now and at most
# since the process started, the KV pool's buffer, CUDA graphs captured since the model loaded
# (requests' and idle ones; a replay's captures after warm-up are this count's difference)
DEVICE_STATS = ("device_allocated_bytes", "device_max_allocated_bytes", "kv_pool_bytes", "graph_captures")


@dataclass(frozen=True)
class DecodingOptions:
    """Which decoding strategies a ModelBackend serves with (settings `speculation`, `superposed`, `adadec`).

    Off switches fall back to the plain baselines: greedy decoding for one draft, greedy
    continuations of the top first tokens for several. AdaDec is off by default: on realedits
    it lost 0.67 EM (l2r) and 1.8 ES (FIM) against greedy for +74% decode time, and on
    HumanEval the default model lost a problem (BENCHMARKS.md); only Qwen's HumanEval gained.
    """

    speculation: bool = True
    superposed: bool = True
    adadec: bool = False
    beam: bool | None = None  # several drafts by beam search (before superposed decoding); None: on graphs

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodingOptions:
        """The options of an lsp_server.settings.Settings."""
        return cls(speculation=settings.speculation, superposed=settings.superposed, adadec=settings.adadec,
                   beam=settings.beam_search)


@dataclass
class Draft:
    """One suggestion: its text and a score, higher is better.

    Greedy and speculative drafts: the mean token log-probability. Superposed drafts: the
    draft's superposed log score (model mixed with n-grams), capped so that the drafts keep
    the order superposed decoding ranked them in.
    """

    text: str
    score: float
    stop_reason: str = ""


@dataclass
class CompletionResult:
    """Drafts best first, with what producing them cost."""

    drafts: list[Draft]
    stats: dict = field(default_factory=dict)


class Backend(Protocol):
    """What the language server needs from a completion engine.

    The first five methods every backend implements; the rest have do-nothing defaults here
    (a backend subclasses this protocol to get them), so the worker calls them all directly."""

    description: str
    view_choice: dict | None = None  # what `view: auto` serves, and why (None: the backend has no views)
    idle_work: bool = False  # whether `refresh_idle` can do anything (the worker arms its idle timer only then)
    warm_up_report: dict | None = None  # what `warm_up` did, once it ran

    def open(self, uri: str, text: str) -> None: ...

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str) -> None: ...

    def close(self, uri: str) -> None: ...

    def text(self, uri: str) -> str: ...

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool]) -> CompletionResult: ...

    def configure(self, **options: Any) -> None:
        """New cache options (worker.cache_options) for every document, without a reload."""

    def refresh_idle(self, max_tokens: int = 256, should_stop: Callable[[], bool] | None = None) -> int:
        """Background work while no request waits; the number of tokens it re-encoded."""
        return 0

    def verify_tokens_idle(self) -> int:
        """Background cross-checks of documents' tokens; how many it checked."""
        return 0

    def urgent_work(self) -> bool:
        """Whether background work should not wait for the idle delay."""
        return False

    def pending_captures(self) -> int:
        """CUDA graphs requests ran without (deferred captures), for `capture_idle`."""
        return 0

    def capture_idle(self, should_stop: Callable[[], bool] | None = None) -> int:
        """Take one deferred CUDA graph capture (only ever when the user has been idle); how many."""
        return 0

    def warm_up(self, *, view: str = "auto", num_drafts: int = 3, max_tokens: int = 64,
                max_bucket: int | None = None, max_seconds: float | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> dict:
        """Make what requests would otherwise make on first use (graphs, compiled kernels); what it did."""
        return {}

    def graphs_replay(self) -> bool:
        """Whether the backend's forwards replay CUDA graphs (what `warmUp` unset warms up for)."""
        return False

    def drop_caches(self) -> None:
        """Free every cached document's KV (after an out-of-memory or device fault)."""

    def disable_graphs(self) -> bool:
        """Stop replaying CUDA graphs; whether any were in use."""
        return False

    def release(self) -> None:
        """Free what the backend holds (model, KV, graphs) before another is loaded."""

    def debug_document(self, uri: str, kv: bool = False) -> dict:
        """The backend's part of `editkv/debugDocument`."""
        return {}

    def device_stats(self) -> dict:
        """Device memory and CUDA graphs for `editkv/stats` (DEVICE_STATS; None where there are none)."""
        return dict.fromkeys(DEVICE_STATS)


class ModelBackend(Backend):
    """Completions from a real model over PIE-repaired per-document caches.

    The model-tuned cache options (`edit_cache.document.TUNED`) come from `tuned` (the user's
    settings; None = unset), else the model's editkv.json, else RECOMMENDED — whatever `options`
    holds for them is replaced.
    """

    idle_work = True  # stale tokens re-encoded, suffixes encoded, tokens verified between requests

    def __init__(self, loaded: LoadedModel, *, budget_bytes: int | str | None = None,
                 options: DocumentOptions | None = None, recompute: bool = False,
                 decoding: DecodingOptions | None = None, ngram_tokens: int = NGRAM_INDEX_TOKENS,
                 tuned: dict[str, int | None] | None = None, background: bool = True,
                 cross_file: CrossFileOptions | None = None, window: int | None = None) -> None:
        from editkv.edit_cache.document import DocumentOptions
        from editkv.edit_cache.manager import DocumentCache
        from editkv.engine.decoding.ngram_index import NgramIndex
        from editkv.engine.decoding.speculative import Speculator
        from editkv.engine.ngram import NgramTable

        self.loaded = loaded
        options = (options or DocumentOptions()).tuned(loaded.cache, **(tuned or {}))
        budget_bytes = kv_budget_bytes(budget_bytes, loaded.runner.device.type)  # "auto": the device's
        self.cache = DocumentCache(loaded.runner, loaded.tokenizer, loaded.config,
                                   budget_bytes=budget_bytes, options=options)
        self._pool_dropped = False  # drop_caches let the pool go; the next request installs one
        self._install_pool()

        self.description = f"{loaded.source} on {loaded.device}"  # clients parse "<source> on <device>"
        from editkv.engine.calibrate import auto_view

        # what `view: auto` serves and why (`editkv calibrate --view`, else the model's preference)
        auto, why = auto_view(loaded)
        self.view_choice = {"auto": auto, "why": why}
        self.recompute = recompute  # baseline: drop the document's KV before every request
        # requests encode only the text they need (before the cursor); the worker encodes the
        # rest between requests (`refresh_idle`). Off: every request makes the whole document ready.
        self.background = background
        self._defer_captures()
        from editkv.lsp_server.context import CrossFileContext

        self.cross_file = cross_file or CrossFileOptions()  # other open documents' caches before a view
        self.context = CrossFileContext()
        self.cache.reserved = self.context.kv_bytes  # context blocks count against the KV budget
        self.speculator = Speculator()  # outlives requests: the model table, acceptance estimates, recent drafts
        self.index = NgramIndex(max_tokens=ngram_tokens)  # every open document's n-grams
        corpus = Path(loaded.source) / "ngram.npz"
        self.corpus = NgramTable.load(corpus) if corpus.is_file() else None
        self._references: dict[str, tuple[int, Reference]] = {}  # uri -> (document version, its ids)
        self.decoding = DecodingOptions()
        self.adadec = None  # AdaDecConfig once `decoding.adadec` is on and the model is calibrated
        self.adadec_problem: str | None = None
        self._set_decoding(decoding or DecodingOptions())
        self.encoded_tokens = 0  # tokens complete() has run through the model (cache and views), all documents
        self.warm_up_report: dict | None = None  # `warm_up`'s, once it ran
        # uri -> (window document, its first character's offset and line): what requests are answered
        # from while the file's text before the cursor has no keys yet (WINDOW)
        self._windows: dict[str, tuple[Document, int, int]] = {}
        self.window = answer_window(window, loaded.runner.device.type)  # (tokens before, after the cursor)

    def configure(self, *, budget_bytes: int | str | None, options: DocumentOptions, recompute: bool = False,
                  decoding: DecodingOptions | None = None, tuned: dict[str, int | None] | None = None,
                  background: bool = True, cross_file: CrossFileOptions | None = None,
                  window: int | None = None) -> None:
        """New cache settings, applied from each document's next repair on; new decoding options.
        `tuned`: the model-tuned options the user set (None or absent: the model's recommendation)."""
        self.cache.set_options(options.tuned(self.loaded.cache, **(tuned or {})),
                               kv_budget_bytes(budget_bytes, self.loaded.runner.device.type))
        window_now = answer_window(window, self.loaded.runner.device.type)
        if window_now != self.window:
            self.window = window_now
            self._windows.clear()
        self._install_pool()
        self.recompute = recompute
        self.background = background
        self._defer_captures()
        if cross_file is not None:
            self.cross_file = cross_file
            if not cross_file.on:
                self.context.clear()
        if decoding is not None:
            self._set_decoding(decoding)

    def _set_decoding(self, decoding: DecodingOptions) -> None:
        self.decoding = decoding
        if not decoding.adadec or self.adadec is not None:
            return
        from editkv.engine.decoding.adadec import AdaDecConfig
        from editkv.engine.errors import EngineError

        try:
            self.adadec = AdaDecConfig.for_model(self.loaded.source)
            self.adadec_problem = None
        except (EngineError, OSError) as err:  # no calibration: serve without the gate, say why in stats
            self.adadec_problem = str(err)
            log.warning("adadec is on but unavailable: %s", err)

    def refresh_idle(self, max_tokens: int = 256, should_stop: Callable[[], bool] | None = None) -> int:
        """Background work: encode tokens that have no keys yet, then stale ones, most recent
        document first, stopping between small chunks when `should_stop` says so; then, with
        cross-file context on, the open documents the last request wanted to show and could not
        (no keys yet); 0 when none are left. Nothing when recomputing: every request drops the
        document's KV first, so keys encoded now would be thrown away."""
        if self.recompute:
            return 0
        done = self.cache.refresh_idle(max_tokens, should_stop)
        if done or not self.cross_file.on:
            return done
        for uri in self.context.wanted:
            doc = self.cache.docs.get(uri)
            if doc is None or (doc.cache is not None and not doc.num_unencoded):
                continue
            before = doc.stats.tokens_encoded
            doc.ensure_ready(min(len(doc.ids), doc.frontier + max_tokens), should_stop)
            self.cache.enforce_budget()
            return max(doc.stats.tokens_encoded - before, 1)
        self.context.wanted = []
        return 0

    def urgent_work(self) -> bool:
        """Whether background work should start as soon as the worker is free (see DocumentCache)."""
        return self.background and self.cache.urgent_work()

    @property
    def beam(self) -> bool:
        """Whether several drafts come from beam search: the setting, or by default where the model's
        forwards replay CUDA graphs (the beams are lanes of one graphed forward per step)."""
        if self.decoding.beam is not None:
            return self.decoding.beam
        return self.graphs_replay()

    def graphs_replay(self) -> bool:
        return self.loaded.runner.replays_graphs

    def _defer_captures(self) -> None:
        """With DEFER_CAPTURES and background work on, a CUDA graph a request lacks is not captured
        on its keystroke (tens of milliseconds): the request runs the same ops eagerly and the
        worker captures the graph once the user is idle (`capture_idle`). Otherwise captured at once."""
        static = self.loaded.runner.static
        if static is not None:
            static.defer_captures = DEFER_CAPTURES and self.background

    def _install_pool(self) -> None:
        """One KV pool (the KV budget's size) that every document's cache is a region of, when the
        model replays CUDA graphs: then graphs serve every document (engine/kv_pool.py). A pool
        without room for a document asks the cache to evict its least recently used one first."""
        pool = self.loaded.runner.install_pool(self.cache.budget_bytes)
        if pool is not None:
            cache = weakref.ref(self.cache)  # weak: the pool must not keep a released backend's documents
            pool.reclaim = lambda keep: (owner := cache()) is not None and owner.reclaim(keep)

    def pending_captures(self) -> int:
        static = self.loaded.runner.static
        return static.pending_captures if static is not None else 0

    def capture_idle(self, should_stop: Callable[[], bool] | None = None) -> int:
        static = self.loaded.runner.static
        return static.capture_pending(should_stop or (lambda: False)) if static is not None else 0

    def warm_up(self, *, view: str = "auto", num_drafts: int = 3, max_tokens: int = 64,
                max_bucket: int | None = None, max_seconds: float | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> dict:
        """Capture every graph a served session uses and compile its kernels now, on made-up
        documents (lsp_server/warm_up.py); what it did. Nothing where no static forward runs."""
        from editkv.lsp_server import warm_up

        report = warm_up.warm_up(self, view=view, num_drafts=num_drafts, max_tokens=max_tokens,
                                 max_bucket=max_bucket or warm_up.MAX_BUCKET,
                                 max_seconds=warm_up.MAX_SECONDS if max_seconds is None else max_seconds,
                                 should_stop=should_stop)
        self.warm_up_report = report.as_dict()
        return self.warm_up_report

    def drop_caches(self) -> None:
        """Forget every document's KV, the KV pool and the captured graphs (after running out of
        memory or a device fault); texts stay. The next request makes a new pool."""
        self._windows.clear()
        for doc in self.cache.docs.values():
            doc.drop_kv()
        self.context.clear()
        self.loaded.runner.drop_pool()
        self._pool_dropped = True
        static = self.loaded.runner.static
        if static is not None:
            static.reset()

    def disable_graphs(self) -> bool:
        """Run every forward eagerly from now on (after a device fault in the graph path);
        False if they already were."""
        static = self.loaded.runner.disable_graphs()
        if static is None:
            return False
        static.reset()
        return True

    def release(self) -> None:
        """Drop everything this backend holds on the device (before the worker forgets it)."""
        self.drop_caches()
        self.cache.docs.clear()
        self.loaded.runner.disable_graphs()
        self.loaded.runner.drop_pool()
        self.index = None
        self._references.clear()

    def verify_tokens_idle(self) -> int:
        """Idle work: cross-check one changed document's tokens against a full tokenization
        (a mismatch reopens it; counted in `token_repairs`); 1 if one was checked, else 0."""
        checked, reopened = self.cache.verify_tokens()
        for uri in reopened:
            self.index.add(uri, self.cache.docs[uri].ids)
            self._references.pop(uri, None)
        return checked

    @property
    def token_repairs(self) -> int:
        return self.cache.token_repairs

    def debug_document(self, uri: str, kv: bool = False) -> dict:
        """The backend's state of `uri` for `editkv/debugDocument`: its text's digest, whether its
        tokens equal a full tokenization, its cache and the memory bounds. `kv`: also re-encode
        every stale token, then the largest difference of its KV (keys and values, text order)
        from a fresh prefill of its text (None in "conflict" mode, whose positions are stale by design)."""
        import hashlib

        doc = self.cache.get(uri)
        fresh = doc.tokenizer.encode_with_offsets(doc.text)
        out: dict[str, Any] = {
            "text_sha256": hashlib.sha256(doc.text.encode("utf-8", errors="surrogatepass")).hexdigest(),
            "tokens": len(doc.ids), "tokens_fresh": fresh.ids == doc.ids,
            "starts_fresh": [s for s, _ in fresh.offsets] == doc.tokens.starts.tolist(),
            "mode": doc.options.mode, "encoded": doc.is_encoded, "unencoded": doc.num_unencoded,
            "stale": doc.num_stale if doc.is_encoded else 0, "pending_edits": doc.pending_edits,
        }
        if kv:
            out.update(self._kv_difference(doc))
            self.cache.enforce_budget(keep=uri)
        static = self.loaded.runner.static
        sizes = [d.kv_bytes() for d in self.cache.docs.values()]
        out.update({
            "kv_bytes": doc.kv_bytes(), "total_kv_bytes": sum(sizes), "largest_kv_bytes": max(sizes, default=0),
            "encoded_documents": sum(1 for n in sizes if n), "budget_bytes": self.cache.budget_bytes,
            "graphs": static.num_graphs if static is not None else None,
            "max_graphs": static.max_graphs if static is not None else None,
            "token_repairs": self.cache.token_repairs,
            "device_allocated": _device_allocated(self.loaded.device),
        })
        return out

    def device_stats(self) -> dict:
        """Device memory and CUDA graphs for `editkv/stats` (DEVICE_STATS): read from the event loop
        while the worker runs, so only counters that reading does not disturb."""
        device = self.loaded.device
        pool = self.loaded.runner.kv_pool
        static = self.loaded.runner.static
        return {
            "device_allocated_bytes": _device_allocated(device),
            "device_max_allocated_bytes": _device_allocated(device, peak=True),
            "kv_pool_bytes": pool.buffer.nbytes() if pool is not None else None,
            "graph_captures": static.captures if self.loaded.runner.replays_graphs else None,
        }

    def _kv_difference(self, doc: Document) -> dict[str, Any]:
        """Refresh `doc` whole, then its KV against a fresh prefill of its text: `kv_max_diff`, the
        largest |difference| over every layer, head and token (None in "conflict" mode, whose
        positions are stale by design, and for a document longer than the model's context, where
        the attention window is cut per prefill chunk, so the KV depends on how the text was
        chunked); `kv_layer0_max_diff` over layer 0, whose K/V depend on a token and its
        position only (exact whatever the length)."""
        import torch
        from editkv.engine.generate import prefill

        fits = doc.h + len(doc.ids) <= doc.context_size
        if doc.options.mode == "conflict":
            return {"kv_max_diff": None, "kv_layer0_max_diff": None, "fits_context": fits}
        doc.ensure_ready()
        while doc.refresh():
            pass
        k, v = doc.materialize()  # [L, 1, KVH, h + n, D]
        n = k.shape[3]
        if not n:
            return {"kv_max_diff": 0.0, "kv_layer0_max_diff": 0.0, "fits_context": fits}
        model = self.loaded.runner
        ids = doc.head + doc.ids
        fresh = model.new_cache(len(ids) + 1)
        prefill(model, ids, fresh, chunk=doc.options.prefill_chunk, logits="none", window=doc.context_size,
                sink=(fresh, doc.h))
        diff = torch.maximum((k.float() - fresh.k[:, :, :, :n].float()).abs().amax(dim=(1, 2, 3, 4)),
                             (v.float() - fresh.v[:, :, :, :n].float()).abs().amax(dim=(1, 2, 3, 4)))  # [L]
        return {"kv_max_diff": float(diff.max()) if fits else None, "kv_layer0_max_diff": float(diff[0]),
                "fits_context": fits}

    def open(self, uri: str, text: str) -> None:
        self._windows.pop(uri, None)
        self.context.from_disk.pop(uri, None)  # the client's now (it may differ from the file)
        doc = self.cache.open(uri, text)
        self.index.add(uri, doc.ids)
        self._references.pop(uri, None)

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str = "utf-16") -> None:
        for rng, text in changes:
            edit = self.cache.change(uri, rng, text, encoding)
            if uri in self._windows:
                self._follow_window(uri, rng, text, encoding)
            if edit is not None:
                self.index.apply_edit(uri, edit)

    def close(self, uri: str) -> None:
        self._windows.pop(uri, None)
        self.cache.close(uri)
        self.index.remove(uri)
        self._references.pop(uri, None)
        self.context.blocks.pop(uri, None)

    def text(self, uri: str) -> str:
        return self.cache.get(uri).text

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool] = lambda: False) -> CompletionResult:
        """Drafts at the request's position (see the module docstring)."""
        if self._pool_dropped:
            self._pool_dropped = False
            self._install_pool()
        result = self._complete(request, should_stop)
        self.cache.enforce_budget(keep=request.uri)  # the view's scratch window may have grown the cache
        static = self.loaded.runner.static
        if static is not None:  # nothing of this request is left running when its answer goes out
            static.quiesce()
        return result

    def _complete(self, request: CompletionRequest, should_stop: Callable[[], bool]) -> CompletionResult:
        from editkv.edit_cache.views import fill_in_middle, left_to_right
        from editkv.engine.generate import DecodeStats, StopRules

        started = time.perf_counter()
        doc = self.cache.get(request.uri)
        cursor = to_offset(doc.text, Position(request.line, request.character), request.encoding)
        if self.recompute:
            doc.drop_kv()
        repair_ms_before = doc.stats.repair_ms
        static = self.loaded.runner.static
        captures_before = static.captures if static is not None else 0
        encoded_before = doc.stats.tokens_encoded
        moved_before = doc.stats.slots_moved
        # the text before the cursor; with background work off (or recomputing), all of it
        upto = doc.tokens.first_token_at_or_after(cursor) if self.background and not self.recompute else None
        # far more of it without keys than a window around the cursor holds: answer from the window
        # (a throwaway document) and leave the file to background work, which starts at once
        window = self.window if upto is not None else None
        missing = upto - (doc.frontier if doc.cache is not None else 0) if upto is not None else 0
        vdoc, vcursor, window_doc = doc, cursor, None
        # (held until what is left is a few chunks' work, not the most a request may encode itself)
        if window is not None and missing > (sum(window) // 8 if request.uri in self._windows else 2 * sum(window)):
            doc, ready = self.cache.prepare(request.uri, 0, should_stop)  # its cache, for background work
            window_doc, start = self._window(request.uri, doc, cursor, window)
            window_before = window_doc.stats.tokens_encoded
            ready = ready and window_doc.ensure_ready(None, should_stop)  # (its edits: a PIE repair)
            vdoc, vcursor = window_doc, cursor - start
        else:
            self._windows.pop(request.uri, None)
            doc, ready = self.cache.prepare(request.uri, upto, should_stop)
        if not ready:  # cancelled while encoding: what was encoded stays for the next request
            encoded = doc.stats.tokens_encoded - encoded_before
            self.encoded_tokens += encoded
            return CompletionResult([], {"cancelled": True, "encoded_tokens": encoded,
                                         "document_encoded_tokens": encoded,
                                         "total_ms": 1000 * (time.perf_counter() - started)})
        if request.uri in self.index.docs:
            self.index.touch(request.uri)
        else:  # evicted from the index by other documents, or too big for it alone
            self.index.add(request.uri, doc.ids)
        view_kind = self.view_choice["auto"] if request.view == "auto" else request.view
        use_fim = view_kind == "fim" and doc.tokenizer.fim is not None
        block, context = None, {}
        if self.cross_file.on and not self.recompute and window_doc is None:
            if request.roots:  # imported files that are not open: read from the workspace, kept as documents
                from editkv.lsp_server.context import text_change

                for uri, text in self.context.workspace_files(request.uri, doc.text, request.roots, self.cache.docs,
                                                              self.cross_file.max_files):
                    if uri in self.cache.docs:  # changed on disk: the difference as one edit (PIE repairs it)
                        self.cache.change(uri, *text_change(self.cache.docs[uri].text, text), encoding="utf-32")
                    else:
                        self.cache.open(uri, text)
                self.context.forget_workspace_files(self.cache)
            block, context = self.context.block_for(request.uri, doc, self.cache.docs, self.cross_file)
            if context.get("context_built"):
                self.cache.enforce_budget(keep=request.uri)
        # beam search's beams interleave in the view's scratch (engine/decoding/beam.py): room for each
        scratch_tokens = request.max_tokens * (request.num_drafts if self.beam else 1)
        if use_fim:
            view = fill_in_middle(vdoc, vcursor, suffix=request.suffix, max_new_tokens=scratch_tokens,
                                  whole_suffix=not self.background or self.recompute, block=block)
        else:
            view = left_to_right(vdoc, vcursor, max_new_tokens=scratch_tokens, block=block)
        stats = DecodeStats()
        drafts: list[Draft] = []
        counters: dict[str, Any] = {}
        if view is not None:
            limit = request.multiline_ms
            if limit is None:
                limit = MULTILINE_MS.get(self.loaded.runner.device.type, MULTILINE_MS["cpu"])
            rules = StopRules(max_tokens=request.max_tokens, max_lines=request.max_lines, should_stop=should_stop,
                              lines_until=started + limit / 1000 if limit and request.max_lines != 1 else None)
            if request.num_drafts <= 1:
                drafts = self._one_draft(request.uri, doc, cursor, view, rules, stats, counters)
            else:
                drafts = self._drafts(view, rules, request.num_drafts, stats, counters)
        encoded = (doc.stats.tokens_encoded - encoded_before + (view.encoded_tokens if view is not None else 0)
                   + context.get("context_recomputed_tokens", 0)  # a context block built for this request
                   + (window_doc.stats.tokens_encoded - window_before if window_doc is not None else 0))
        self.encoded_tokens += encoded
        return CompletionResult(drafts, {
            "repair_ms": doc.stats.repair_ms - repair_ms_before,
            # tokens this request encoded into the document (edits, text before the cursor,
            # stale ones near it) and slots it moved
            "document_encoded_tokens": doc.stats.tokens_encoded - encoded_before,
            "slots_moved": doc.stats.slots_moved - moved_before,
            "unencoded_tokens": doc.num_unencoded,
            # tokens of the window this request was answered from (0: the document's own cache)
            "window_tokens": len(window_doc.ids) if window_doc is not None else 0,
            "stale_tokens": doc.num_stale,
            "view": "fim" if use_fim else "l2r",
            "view_why": (f"auto: {self.view_choice['why']}" if request.view == "auto" else
                         "the view setting asked for FIM, but the model has no FIM tokens"
                         if request.view == "fim" and not use_fim else "the view setting"),
            "view_ms": view.build_ms if view is not None else 0.0,
            "view_encoded_tokens": view.encoded_tokens if view is not None else 0,
            "encoded_tokens": encoded,  # prefill, repair, refreshes and view tokens of this request
            "decode_tokens": stats.decode_tokens,
            "forwards": stats.forwards,
            # CUDA graphs this request captured (each costs a few forwards' time; see engine/kv_pool.py)
            "graph_captures": (static.captures - captures_before) if static is not None else 0,
            **context,
            **counters,
            "total_ms": 1000 * (time.perf_counter() - started),
        })

    def _window(self, uri: str, doc: Document, cursor: int, window: tuple[int, int]) -> tuple[Document, int]:
        """The window document `uri`'s requests are answered from while its text before the cursor
        has no keys (WINDOW), and its first character's offset: the one kept from the last request
        (edited in step with the document) while the cursor has at least half the window's text
        before and a quarter after it, else a new one."""
        before, after = window
        held = self._windows.get(uri)
        if held is not None:
            wdoc, lo, _ = held
            hi = lo + len(wdoc.text)
            if lo <= cursor <= hi:
                at = wdoc.tokens.first_token_at_or_after(cursor - lo)
                if (lo == 0 or at >= before // 2) and (hi == len(doc.text) or len(wdoc.ids) - at >= after // 4):
                    return wdoc, lo
        wdoc, lo, first = self.cache.window(uri, cursor, before, after)
        self._windows[uri] = (wdoc, lo, first)
        return wdoc, lo

    def _follow_window(self, uri: str, rng: Range | None, text: str, encoding: str) -> None:
        """Apply a change of `uri` to its window document too, or drop the window when the change
        is not inside it (a later request makes a new one where it is needed)."""
        wdoc, lo, first = self._windows[uri]
        lines = len(line_starts(wdoc.text)) - 1  # whole lines, each ending in a terminator
        if rng is None or not (first <= rng.start.line and rng.end.line < first + lines):
            del self._windows[uri]
            return
        wdoc.apply_change(Range(Position(rng.start.line - first, rng.start.character),
                                Position(rng.end.line - first, rng.end.character)), text, encoding)

    def _one_draft(self, uri: str, doc: Document, cursor: int, view: ContextView, rules: StopRules,
                   stats: DecodeStats, counters: dict) -> list[Draft]:
        """Speculative greedy decoding (gated by AdaDec when on); plain greedy when speculation is off."""
        from editkv.engine.decoding.adadec import adadec_decode
        from editkv.engine.decoding.speculative import SpecCounters

        adadec = self.adadec if self.decoding.adadec else None
        if self.decoding.adadec and adadec is None:
            counters["adadec"] = f"unavailable: {self.adadec_problem}"
        if self.decoding.speculation:
            refs = self._references_for(uri, doc, cursor, view)
            out = self.speculator.decode(view.state(), rules=rules, references=refs, stats=stats, adadec=adadec)
            spec = SpecCounters.read(stats.extra)
            counters["strategy"] = "speculative" + ("+adadec" if adadec is not None else "")
            counters.update({f"spec_{name}": getattr(spec, name) for name in ("drafted", "accepted", "bonus",
                                                                             "forwards", "chained")})
            counters["spec_accepted_by_source"] = {source: accepted for source, (_, accepted) in
                                                   sorted(spec.by_source.items())}
        elif adadec is not None:
            out = adadec_decode(view.state(), adadec, rules, stats)
            counters["strategy"] = "adadec"
        else:
            out = view.decode(rules=rules, stats=stats)
            counters["strategy"] = "greedy"
        if adadec is not None:
            for name in ("gate_fires", "changed", "extra_forwards"):
                counters[f"adadec_{name}"] = int(stats.extra.get(f"adadec_{name}", 0))
        return [Draft(out.text, out.logprob / max(len(out.ids), 1), out.stop_reason)]

    def _references_for(self, uri: str, doc: Document, cursor: int, view: ContextView) -> list[Reference]:
        """What speculation may copy from besides the prompt: the text after the cursor when the
        view does not hold it, then the other open documents, most recently used first."""
        from editkv.engine.decoding.drafters import Reference

        refs = []
        if view.kind == "l2r":
            start = doc.tokens.first_token_at_or_after(cursor)
            refs.append(Reference.of("suffix", doc.ids[start : start + SUFFIX_TOKENS]))
        budget = REFERENCE_TOKENS
        kept: dict[str, tuple[int, Reference]] = {}
        for other_uri in reversed(self.cache.docs):
            other = self.cache.docs[other_uri]
            if other_uri == uri or budget <= 0:
                continue
            cached = self._references.get(other_uri)
            if cached is None or cached[0] != other.version:
                cached = (other.version, Reference.of("workspace", other.ids))
            kept[other_uri] = cached
            refs.append(cached[1])
            budget -= len(cached[1].ids)
        self._references = kept  # only what this request used stays converted
        return refs

    def _drafts(self, view: ContextView, rules: StopRules, num_drafts: int, stats: DecodeStats,
                counters: dict) -> list[Draft]:
        """Beam search when it is on, else superposed decoding; with both off, greedy continuations
        of the top first tokens."""
        if self.beam:
            from editkv.engine.decoding.beam import beam_search

            # done once k beams have finished: 1.28x greedy's time on the H100 (1.76x without), on the
            # CPU 1.29x / 1.37x (1.5x / 1.67x)
            result = beam_search(view.state(), num_drafts, rules, early_stopping=True, stats=stats)
            counters["strategy"] = "beam"
            counters["beam_lanes"] = bool(stats.extra.get("beam_lanes"))  # on the static forward (graphs)
            drafts = []
            for b in result.beams:
                if b.text.strip():
                    drafts.append(Draft(b.text, b.logprob / max(len(b.ids), 1), b.stop_reason))
                    self.speculator.remember(b.ids)
            return sorted(drafts, key=lambda d: -d.score)
        if not self.decoding.superposed:
            counters["strategy"] = "top_first"
            return self._top_first_drafts(view, rules, num_drafts, stats)
        from editkv.engine.decoding.superposed import superposed_drafts

        result = superposed_drafts(view.state(), num_drafts, rules, ngram_index=self.index, corpus=self.corpus,
                                   stats=stats)
        run = result.stats
        counters.update({"strategy": "superposed", "superposed_steps": run.steps, "superposed_resets": run.resets,
                         "superposed_forwards": run.forwards, "superposed_device_steps": run.device_steps,
                         "ngram_ms": round(run.ngram_ms, 3)})
        drafts: list[Draft] = []
        for d in result.drafts:
            score = d.score if not drafts else min(d.score, drafts[-1].score)
            drafts.append(Draft(d.text, score if math.isfinite(score) else -1e9, d.stop_reason))
            self.speculator.remember(d.ids)  # shown suggestions: what the next request may copy
        return drafts

    def _top_first_drafts(self, view: ContextView, rules: StopRules, num_drafts: int,
                          stats: DecodeStats) -> list[Draft]:
        """k greedy decodes, each forced to start with one of the k best first tokens."""
        first = view.first_logits
        if view.heal:  # only first tokens that spell the healed text out again
            from editkv.engine.healing import healer_for

            first = healer_for(view.document.tokenizer).mask(first, view.heal)
        top = [t for t in first[0].topk(num_drafts).indices.tolist() if first[0, t] > float("-inf")]
        drafts = []
        for token in top:
            forced = first.clone().fill_(float("-inf"))
            forced[0, token] = first[0, token]
            out = view.decode(rules=rules, stats=stats, first_logits=forced)
            # the forced distribution gives its token log-prob 0: add the real one
            logprob = out.logprob + float(first.log_softmax(-1)[0, token])
            drafts.append(Draft(out.text, logprob / max(len(out.ids), 1), out.stop_reason))
            if out.stop_reason == "cancelled":
                break
        return drafts


def _device_allocated(device, peak: bool = False) -> int | None:
    """Bytes the CUDA caching allocator has handed out on `device`, now or (`peak`) at most since
    the process started (None off CUDA)."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


class FakeBackend(Backend):
    """Deterministic instant completions for protocol tests (no model).

    The completion of a position is `"<fake line:col>"`; a request for several drafts gets
    numbered variants. Document texts are tracked for real, so tests can check sync.
    """

    description = "fake backend"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.texts: dict[str, str] = {}
        self.delay_s = delay_s
        self.completed = 0

    def open(self, uri: str, text: str) -> None:
        self.texts[uri] = text

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str = "utf-16") -> None:
        from editkv.edit_cache.positions import apply_change

        if uri not in self.texts:
            from editkv.edit_cache.manager import UnknownDocument  # imports torch: only on this error path

            raise UnknownDocument(uri)
        for rng, text in changes:
            self.texts[uri] = apply_change(self.texts[uri], rng, text, encoding)[0]

    def close(self, uri: str) -> None:
        self.texts.pop(uri, None)

    def debug_document(self, uri: str, kv: bool = False) -> dict:
        """The fake's part of `editkv/debugDocument`: the digest of its copy of the text."""
        import hashlib

        return {"text_sha256": hashlib.sha256(self.text(uri).encode("utf-8", errors="surrogatepass")).hexdigest()}

    def text(self, uri: str) -> str:
        if uri not in self.texts:
            from editkv.edit_cache.manager import UnknownDocument  # imports torch: only on this error path

            raise UnknownDocument(uri)
        return self.texts[uri]

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool] = lambda: False) -> CompletionResult:
        text = self.text(request.uri)
        to_offset(text, Position(request.line, request.character), request.encoding)  # validates
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            if should_stop():
                return CompletionResult([], {"cancelled": True})
            time.sleep(0.005)
        self.completed += 1
        base = f"<fake {request.line}:{request.character}>"
        drafts = [Draft(base if i == 0 else f"{base}#{i}", -float(i)) for i in range(max(1, request.num_drafts))]
        return CompletionResult(drafts, {"fake": True})
