"""One open document: text <-> tokens <-> KV cache, repaired after edits with PIE.

Data flow: LSP content change -> `apply_change` updates the text and, through
`TokenizedText`, yields the minimal token edit `[a, b) -> new ids`; the edit is recorded as
pending (the current token sequence is kept as pieces: runs of cached tokens and runs of new
ids). `repair` applies all pending edits at once.

Layout: a gap buffer. The cache holds `head` (the model's document-start token, see
engine.prompting) in slots `[0, h)`, then tokens `[0, gap_at)` in slots `h + i`, then `gap`
free slots, then tokens from `gap_at` on in slots `h + i + gap`. Every key acts at the index
of the slot it sits in (what engine.generate.windowed and CUDA-graph replay expect), so a span
of the tokens past the gap acts `-gap` positions from its slots (`spans`). An edit is made at
the gap: the gap moves to it (the tokens in between cross it, moved and re-rotated: PIE's
fused kernel, kernels/rerotate.py), new tokens are encoded into it at their positions
attending to everything before them, deleted tokens widen it, and the tokens after it stay
where they are; their positions moved by the edit, and so did the gap's size, which is all
their span's shift says. Typing at one place costs the typed tokens only, whatever the size
of the file; moving to another place costs the tokens in between, once.

A document is encoded front to back: `frontier` tokens have keys, the rest none yet.
`ensure_ready(upto)` encodes as far as a request needs (the text before the cursor, in
chunks that poll a stop flag), `extend` does the rest in the background past the gap.

Cached tokens after an edit never saw the new tokens: they are *stale*. The document counts
them; `refresh` re-encodes them (in the background) and views re-encode the ones right
before the cursor (`refresh_near_cursor`). Nothing on the request path re-encodes more than
that. Modes other than PIE exist for benchmarks, in a layout without a gap: "conflict" moves
slots without re-rotating (the suffix keeps stale positions), "prefix_reuse" re-encodes
everything from the first changed token (what llama.cpp / vLLM prefix caching do).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from editkv.edit_cache.positions import Range, apply_change
from editkv.edit_cache.tokens import TokenEdit, TokenizedText
from editkv.engine import faults
from editkv.engine.generate import prefill
from editkv.engine.model import KVCache, Span, Transformer
from editkv.engine.runner import ModelRunner
from editkv.engine.tokenizer import Tokenizer
from editkv.kernels.rerotate import move_rerotate

MODES = ("pie", "conflict", "prefix_reuse")
SPARE_SLOTS = 256  # free slots kept after a document's last one: views' scratch windows live there
GAP_SLOTS = 256  # free slots a gap is (re)opened with: this many typed tokens before anything moves
# tokens per forward in interruptible encoding (background work, a request's own prefix): a newer
# request waits for one at most. On the CPU 32; where forwards replay CUDA graphs the widest graph
# (engine.static_decode.MAX_WIDTH, 256): one replay of a few ms, where 32-token chunks took a
# 5.9k-token prefix 264 ms on the H100 (session 13) against 110-340 ms for a whole 7k-token file in
# one eager forward (session 14; DEVELOPERS.md). EDITKV_ENCODE_CHUNK overrides both, to compare.
BACKGROUND_CHUNK = 32
GRAPH_CHUNK = 256
_FORCED_CHUNK = max(1, int(os.environ["EDITKV_ENCODE_CHUNK"])) if os.environ.get("EDITKV_ENCODE_CHUNK") else None


def encode_chunk(model: ModelRunner) -> int:
    """Tokens per interruptible encoding forward for `model` (see BACKGROUND_CHUNK)."""
    if _FORCED_CHUNK is not None:
        return _FORCED_CHUNK
    return GRAPH_CHUNK if model.replays_graphs else BACKGROUND_CHUNK


@dataclass
class RepairStats:
    """What the last repairs cost (cumulative since the document was opened)."""

    repairs: int = 0
    edits: int = 0
    tokens_encoded: int = 0
    slots_moved: int = 0
    full_prefills: int = 0
    refreshes: int = 0
    repair_ms: float = 0.0


@dataclass
class _Run:
    """A piece of the current token sequence: cached slots `[a, b)` (doc coordinates) or new ids."""

    a: int = 0
    b: int = 0
    ids: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids) if self.ids is not None else self.b - self.a

    def cut(self, lo: int, hi: int) -> _Run:
        if self.ids is not None:
            return _Run(ids=self.ids[lo:hi])
        return _Run(self.a + lo, self.a + hi)


@dataclass
class DocumentOptions:
    """How a document keeps its cache; validated by the server's settings layer."""

    mode: str = "pie"
    refresh_window: int = 0  # tokens after each edit re-encoded with the edit
    # more stale tokens than this make background refresh start without waiting for the editor
    # to go idle (lsp_server/worker.py); None: only when idle. Never on the request path.
    stale_budget: int | None = None
    prefill_chunk: int | None = None  # tokens per prefill forward (None: the device's default, engine.generate)
    # FIM views re-encode this many of the suffix's first cached tokens after <SUF> (they were
    # cached without it; a real model reads a suffix that never saw <SUF> noticeably worse)
    fim_fresh_suffix: int = 0
    # keep those re-encoded suffix tokens between requests (a slot region right after the
    # document, edit_cache/views.py `SuffixWindow`) while the text before the cursor's line and
    # the tokens themselves stay the same: a keystroke on the cursor's line then encodes the
    # line, <SUF> and <MID> only. They attend to a <SUF> of their own, not to the cursor's line
    # (False: re-encode them after the line every request, the exact prompt when they reach the end)
    # (off by default: realedits, 22 targets, measured EM 6 vs 7 and ES 51 vs 57 against it off; BENCHMARKS.md)
    fim_suffix_cache: bool = False
    # views re-encode the stale tokens among the last this-many before the cursor (the tokens a
    # completion attends to most; an edit above the cursor leaves them stale)
    refresh_near_cursor: int = 0

    def tuned(self, model: dict[str, int], **given: int | None) -> DocumentOptions:
        """These options with each of `TUNED` taken from `given` (a user's setting), else from
        the model's own recommendation (`model`: its editkv.json "cache"), else `RECOMMENDED`."""
        unknown = set(model) - set(TUNED)
        if unknown:
            raise ValueError(f"unknown cache options {sorted(unknown)} in the model's editkv.json; known: {TUNED}")
        values = {}
        for name in TUNED:
            value = given.get(name)
            values[name] = value if value is not None else model.get(name, RECOMMENDED[name])
        return replace(self, **values)


# Options whose best value depends on the model: a model folder's editkv.json may set them under
# "cache"; models without one (GGUF files, hub checkpoints: real code models) get RECOMMENDED,
# measured with Qwen2.5-Coder-0.5B on realedits (BENCHMARKS.md, edit cache): refreshing the
# stale tokens among the 64 before the cursor brings PIE's l2r view to full recompute's exact
# matches; in FIM, 64 fresh suffix tokens left PIE 3.8 EM under an exact FIM prefill on the
# GPU's 292 targets (files of ~3,000 tokens, where most of the suffix is cached); over the whole
# dev set (1,560 targets, H100) 256 left it 1.09 EM under, 384 0.77 EM (at 6% of the exact
# prefill's recomputed tokens). A view's suffix tokens run as at most two graph parts
# (engine/static_decode.MAX_SPLIT x MAX_WIDTH = 512), which 384 + `<SUF>` fits.
TUNED = ("fim_fresh_suffix", "refresh_near_cursor")
RECOMMENDED = {"fim_fresh_suffix": 384, "refresh_near_cursor": 64}


class Document:
    """Text, tokens and a PIE-repaired KV cache for one open file (see the module docstring)."""

    def __init__(
        self,
        model: ModelRunner,
        tokenizer: Tokenizer,
        text: str = "",
        *,
        head: list[int] | None = None,
        options: DocumentOptions | None = None,
        line_local: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or DocumentOptions()
        if self.options.mode not in MODES:
            raise ValueError(f"unknown cache mode {self.options.mode!r}; use one of {MODES}")
        self.head = list(head or [])
        self.tokens = TokenizedText(tokenizer, text, line_local=line_local)
        self.cache: KVCache | None = None
        self.runs: list[_Run] = []  # tokens [0, frontier) as pieces of the layout before the pending edits
        self.frontier = 0  # tokens [0, frontier) have keys and values; the rest have none yet
        self.gap_at = 0  # tokens [0, gap_at) sit in slots h + i; tokens from gap_at on in h + i + gap
        self.gap = 0  # free slots between them
        self.slot_positions = np.zeros(0, dtype=np.int64)  # "conflict" mode: the position each slot acts at
        self.stale = np.zeros(0, dtype=bool)
        # re-encoded since the last repair (views' near-cursor refresh: done once, even while the
        # tokens stay stale because stale ones come before them)
        self.redone = np.zeros(0, dtype=bool)
        self.stats = RepairStats()
        self.pending_edits = 0
        self.version = 0
        self.last_used = time.monotonic()
        # Bumped whenever the cache's slots change or a view takes the scratch window: a view
        # built at another epoch must not decode (ContextView.check_current)
        self.view_epoch = 0
        # a FIM view's suffix window kept between requests (views.SuffixWindow) in spare slots
        # after the document's: dropped by any change to the keys it attended to or to its slots;
        # view scratch windows start after it
        self.suffix_window = None

    def invalidate_views(self, first_token: int = 0) -> None:
        """Drop view state computed from tokens at or after `first_token` (their ids or keys changed)."""
        window = self.suffix_window
        if window is not None and first_token < window.attended:
            self.suffix_window = None

    def _wrote(self, lo: int, hi: int) -> None:
        """Slots `[lo, hi)` were written (the document grew into spare slots): drop a view's state there."""
        window = self.suffix_window
        if window is not None and lo < window.start + window.size and window.start < hi:
            self.suffix_window = None

    @property
    def scratch_start(self) -> int:
        """The first slot a view's scratch may use: after the document's and a kept suffix window's."""
        window = self.suffix_window
        return self.end_slot if window is None else max(self.end_slot, window.start + window.size)

    @classmethod
    def create_simulated(cls, text: str = "", device: str = "cpu", **kwargs) -> Document:
        """A document over a tiny random Llama model (on the CPU unless `device`), for tests that
        need no real weights."""
        from editkv.engine.config import ModelConfig

        config = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2)
        from editkv.engine.training.bpe import train_tokenizer

        torch.manual_seed(0)
        model = ModelRunner(Transformer(config).eval().to(device))
        sample = ["def f(x):\n    return x + 1\n", "class A:\n\tpass\r\n", "é 😀 ✓ = [1, 2]\n"] * 50
        tokenizer = Tokenizer(train_tokenizer(sample, vocab_size=config.vocab_size))
        return cls(model, tokenizer, text, head=[tokenizer.fim.prefix], **kwargs)

    # ---- text and tokens -------------------------------------------------------------------

    @property
    def text(self) -> str:
        return self.tokens.text

    @property
    def ids(self) -> list[int]:
        return self.tokens.ids

    @property
    def h(self) -> int:
        return len(self.head)

    @property
    def num_stale(self) -> int:
        return int(self.stale[: self.frontier].sum())

    @property
    def num_unencoded(self) -> int:
        """Tokens with no keys yet (a document is encoded front to back, the rest in the background)."""
        return len(self.ids) - self.frontier if self.cache is not None else len(self.ids)

    def apply_change(self, rng: Range | None, new_text: str, encoding: str = "utf-16") -> TokenEdit | None:
        """Apply one LSP content change (range None = whole document); KV repair stays pending."""
        text, start, old_end = apply_change(self.text, rng, new_text, encoding)
        n_before = len(self.ids)
        edit = self.tokens.update(text, start, old_end)
        self.version += 1
        if edit is not None:
            self._resize_stale(edit, n_before)
            if self.cache is not None:
                self._record(edit)
        return edit

    def _resize_stale(self, edit: TokenEdit, n_before: int) -> None:
        """Keep `stale` one flag per token; flags are recomputed from the runs at the next repair."""
        if len(self.stale) != n_before:
            return
        new = np.zeros(len(edit.new_ids), dtype=bool)
        self.stale = np.concatenate([self.stale[: edit.start], new, self.stale[edit.end :]])
        if len(self.redone) == n_before:
            self.redone = np.concatenate([self.redone[: edit.start], new, self.redone[edit.end :]])

    def _record(self, edit: TokenEdit) -> None:
        self.invalidate_views(edit.start)
        if edit.start >= self.frontier:  # past the keys: nothing of the cache changes
            return
        left, rest = _split(self.runs, edit.start)
        if edit.end > self.frontier:  # reaches past the keys: what follows the edit has none
            self.runs = _merge(left)
            self.frontier = edit.start
        else:
            _, right = _split(rest, edit.end - edit.start)
            middle = [_Run(ids=edit.new_ids)] if edit.new_ids else []
            self.runs = _merge(left + middle + right)
            self.frontier += edit.delta
        self.pending_edits += 1

    # ---- the layout ------------------------------------------------------------------------

    @property
    def is_encoded(self) -> bool:
        return self.cache is not None

    @property
    def end_slot(self) -> int:
        """The slot after the last token's (the view scratch starts there)."""
        return self.h + len(self.ids) + self.gap

    def slot(self, i: int) -> int:
        """The slot of token i (its key acts at that slot's index)."""
        return self.h + i + (self.gap if i >= self.gap_at else 0)

    def spans(self, a: int, b: int, shift: int = 0) -> list[Span]:
        """Spans holding tokens `[a, b)` acting at positions `h + a + shift ...` (head excluded;
        `spans(0, b)` with the head is `head_spans`)."""
        out = []
        cut = min(max(self.gap_at, a), b)
        if cut > a:
            out.append(Span(self.cache, self.h + a, self.h + cut, shift))
        if b > cut:
            out.append(Span(self.cache, self.h + cut + self.gap, self.h + b + self.gap, shift - self.gap))
        return out

    def head_spans(self, b: int) -> list[Span]:
        """The head and tokens `[0, b)` at their positions, as spans (one while b <= gap_at)."""
        spans = self.spans(0, b)
        if self.h and spans and spans[0].start == self.h and spans[0].shift == 0:
            spans[0] = Span(self.cache, 0, spans[0].end)
        elif self.h:
            spans.insert(0, Span(self.cache, 0, self.h))
        return spans

    def positions(self) -> np.ndarray:
        """The position the key of the head and each encoded token acts at, in text order."""
        n = self.frontier
        if self.options.mode == "conflict":
            return self.slot_positions[: self.h + n].copy()
        return np.arange(self.h + n, dtype=np.int64)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the head and every encoded token in text order, keys rotated to the
        position each acts at: `[layers, batch, kv_heads, h + frontier, head_dim]` (a copy, for
        checks against a fresh prefill)."""
        assert self.cache is not None and self.options.mode != "conflict"
        n = self.frontier
        slots = [*range(self.h), *(self.slot(i) for i in range(n))]
        index = torch.tensor(slots, device=self.cache.device)
        k = self.cache.k.index_select(3, index)
        v = self.cache.v.index_select(3, index)
        if self.gap_at < n and self.gap:  # suffix keys act `gap` positions before their slots
            half = self.model.config.rotary_dim // 2
            cos, sin = self.model.rotary.delta_cos_sin(-self.gap)
            tail = k[:, :, :, self.h + self.gap_at :].contiguous()
            scratch_v = torch.zeros_like(tail)
            move_rerotate(tail, scratch_v, 0, tail.shape[3], 0, cos[:half].contiguous(), sin[:half].contiguous(),
                          self.model.config.rotary_dim)
            k[:, :, :, self.h + self.gap_at :] = tail
        return k, v

    def scratch_window(self, size: int) -> KVCache:
        """`size` free slots right after the document's last slot, for a view's own tokens.

        They are spare capacity of the document's cache, so a view's decode steps attend to
        one buffer (and replay as CUDA graphs); the document's slots are never written. The
        slot after the window stays free too (see engine/static_decode.py).
        """
        end = self.scratch_start
        self.cache.ensure_capacity(end + size + 1)
        self.view_epoch += 1
        return self.cache.window(end, size)

    def kv_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def drop_kv(self) -> None:
        """Forget the cache (memory pressure); the next view rebuilds it by chunked prefill."""
        self.view_epoch += 1
        self.suffix_window = None
        self.cache = None
        self.runs = []
        self.frontier = self.gap_at = self.gap = 0
        self.pending_edits = 0
        self.stale = np.zeros(len(self.ids), dtype=bool)
        self.redone = np.zeros(len(self.ids), dtype=bool)

    @property
    def context_size(self) -> int:
        """The model's context: no query attends further back than this (`engine.generate.windowed`)."""
        return self.model.config.max_position_embeddings

    @property
    def sink(self) -> tuple[KVCache, int]:
        """The document start (the head's slots): kept in front of every attention window."""
        return (self.cache, self.h)

    def _window(self) -> dict:
        """prefill() arguments that keep attention within the model's context, the head as its sink."""
        return {"window": self.context_size, "sink": self.sink}

    # ---- bringing the cache up to date -------------------------------------------------------

    def ensure_ready(self, upto: int | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
        """Make the cache match the text for tokens `[0, upto)` (None: all of them): allocate it,
        apply pending edits, encode what has no keys yet. Stale tokens are left to `refresh`.

        Encoding is chunked and polls `should_stop` between chunks: a stopped call keeps what it
        encoded and returns False.
        """
        n = len(self.ids)
        upto = n if upto is None or self.options.mode != "pie" else max(0, min(upto, n))
        if self.cache is None:
            self._allocate()
        elif self.pending_edits:
            self.repair()
        self.last_used = time.monotonic()
        if self.frontier < upto:
            # the request waits for these: append them in order (the gap follows) when nothing
            # is encoded past the gap, so that the cursor's region stays on the gap's near side
            return self._extend(upto, should_stop, follow=self.gap_at == self.frontier)
        return True

    def extend(self, max_tokens: int, should_stop: Callable[[], bool] | None = None) -> int:
        """Background work: encode up to `max_tokens` tokens with no keys yet (the gap stays put).
        Returns how many were encoded."""
        if self.cache is None or self.pending_edits or not self.num_unencoded:
            return 0
        before = self.frontier
        self._extend(min(len(self.ids), self.frontier + max_tokens), should_stop, follow=False)
        return self.frontier - before

    def _allocate(self) -> None:
        """An empty cache holding the head; tokens come in with `_extend`."""
        self.view_epoch += 1
        self.suffix_window = None
        n = len(self.ids)
        self.gap = GAP_SLOTS if self.options.mode == "pie" else 0
        self.cache = self.model.new_cache(self.h + n + self.gap + SPARE_SLOTS)
        self.cache.extent = self.h + n + self.gap + SPARE_SLOTS
        if self.head:
            prefill(self.model, self.head, self.cache, chunk=self.options.prefill_chunk, logits="none",
                    **self._window())
            self.stats.tokens_encoded += self.h
        self.runs, self.frontier, self.gap_at = [], 0, 0
        self.slot_positions = np.arange(self.h + n, dtype=np.int64)
        self.stale = np.zeros(n, dtype=bool)
        self.redone = np.zeros(n, dtype=bool)
        self.pending_edits = 0
        self.stats.full_prefills += 1

    def _extend(self, upto: int, should_stop: Callable[[], bool] | None, *, follow: bool) -> bool:
        """Encode tokens `[frontier, upto)` in chunks. `follow` (only while nothing is encoded past
        the gap): they join the gap's near side and the gap moves after them; else they go past
        the gap, which stays where the last edit left it."""
        follow = follow and self.gap_at == self.frontier
        # the request path takes every token in one prefill, which sizes its own forwards
        step = encode_chunk(self.model) if should_stop is not None else self.options.prefill_chunk or max(1, upto)
        pacer = self.model.pacer if should_stop is not None else None  # see engine/pacing.py
        while self.frontier < upto:
            if should_stop is not None and should_stop():
                return False
            hi = min(upto, self.frontier + step)
            if follow:  # past the frontier nothing is encoded: the gap may simply move on
                self.gap_at = hi
            self._encode(self.frontier, hi, grow=True)
            if pacer is not None:
                pacer.step()
            self.frontier = hi
            self.runs = [_Run(0, hi)]  # (no edits are pending while encoding)
        return True

    def _encode(self, first: int, last: int, *, grow: bool = False) -> None:
        """(Re-)encode tokens `[first, last)` into their slots, each attending to every token before it.

        `grow`: the tokens are new at the frontier (their slots follow the gap rule too).
        """
        if last <= first:
            return
        self.view_epoch += 1
        self.invalidate_views(first)
        started = time.perf_counter()
        h, ids = self.h, self.ids
        for a, b in ((first, min(last, self.gap_at)), (max(first, self.gap_at), last)):
            if b <= a:
                continue
            at = self.slot(a)
            if a < self.gap_at or not self.gap:
                context = [Span(self.cache, 0, at)] if at else []
            else:  # past the gap: the tokens before it act `gap` positions later, in this frame
                context = [Span(self.cache, 0, h + self.gap_at, self.gap)]
                if at > h + self.gap_at + self.gap:
                    context.append(Span(self.cache, h + self.gap_at + self.gap, at))
            self.cache.ensure_capacity(self.end_slot + 1)
            self._wrote(at, at + b - a)
            prefill(self.model, ids[a:b], self.cache, start=at, first_position=at, context=context,
                    chunk=self.options.prefill_chunk, logits="none", **self._window())
        # exact only if everything before them is: a token encoded after a stale one attended
        # to stale keys, so it is stale too (the stale tokens are always a suffix of the encoded ones)
        self.stale[first:last] = bool(self.stale[:first].any())
        if len(self.redone) == len(self.stale):
            self.redone[first:last] = True
        if grow and len(self.slot_positions) < self.h + last:  # ("conflict" mode's table covers new tokens too)
            self.slot_positions = np.concatenate([self.slot_positions,
                                                  np.arange(len(self.slot_positions), self.h + last, dtype=np.int64)])
        if not grow:
            self.stats.refreshes += 1
        self.stats.tokens_encoded += last - first
        self.stats.repair_ms += 1000 * (time.perf_counter() - started)

    def move_gap(self, at: int) -> None:
        """Move the gap before token `at` (clamped to the encoded tokens); see `_gap_to`."""
        self.ensure_encoded_without_refresh()
        self._gap_to(at)

    def _gap_to(self, at: int) -> None:
        """Move the gap before token `at` (<= frontier): the tokens between the old and the new
        place cross it, moved and re-rotated by `gap` slots (PIE's move, over that stretch only)."""
        at = max(0, min(at, self.frontier))
        if at == self.gap_at:
            return
        if self.gap:
            if at < self.gap_at:
                self._move(self.h + at, self.h + self.gap_at, self.gap)
            else:
                self._move(self.h + self.gap_at + self.gap, self.h + at + self.gap, -self.gap)
        self.gap_at = at

    def _move(self, start: int, end: int, delta: int, rotate: bool = True) -> None:
        """Slots `[start, end)` to `[start + delta, end + delta)`, keys re-rotated by `delta`."""
        if end <= start:
            return
        self.view_epoch += 1
        self._wrote(start + delta, end + delta)
        cache = self.cache
        half = self.model.config.rotary_dim // 2
        if rotate:
            cos, sin = self.model.rotary.delta_cos_sin(delta)
            cos, sin = cos[:half].contiguous(), sin[:half].contiguous()
        else:
            cos = torch.ones(half, device=cache.device)
            sin = torch.zeros(half, device=cache.device)
        move_rerotate(cache.k, cache.v, start, end, delta, cos, sin, self.model.config.rotary_dim)
        self.stats.slots_moved += end - start

    def repair(self) -> None:
        """Apply every pending edit to the cache (PIE, or the benchmark baselines)."""
        if self.cache is None:
            self._allocate()
            return
        if not self.pending_edits:
            return
        self.view_epoch += 1
        started = time.perf_counter()
        encoded_before = self.stats.tokens_encoded
        if self.options.mode == "pie":
            self._repair_at_gap()
        else:
            self._repair_in_place()
        self.runs = [_Run(0, self.frontier)] if self.frontier else []
        self.stats.repairs += 1
        self.stats.edits += self.pending_edits
        self.pending_edits = 0
        if self.options.refresh_window:
            self._refresh_after_edits(encoded_before)
        self.stats.repair_ms += 1000 * (time.perf_counter() - started)

    def _repair_at_gap(self) -> None:
        """PIE over the gap buffer: each change is made at the gap, so only the tokens between
        changes move; the tokens after the last one stay where they are, their shift is the gap's.

        Old token j (of the layout before the edits) sits in slot h + j, or h + j + gap past the
        gap. The runs are walked in text order: the gap first moves to the first change, then
        new tokens are written into it, deleted tokens widen it, and cached runs between two
        changes cross it to its near side.
        """
        runs, h = self.runs, self.h
        self._edit_marks = []
        pos = 0
        k = 0
        while k < len(runs) and runs[k].ids is None and runs[k].a == pos:
            pos += len(runs[k])
            k += 1
        if k == len(runs):  # the keys end earlier now (an edit reached past them): nothing moves
            self.gap_at = min(self.gap_at, pos)
            self.frontier = pos
            self._set_stale_from(pos, [])
            return
        self._gap_to(pos)  # old and new coordinates agree before the first change
        first_change = pos
        faults.hit("repair")  # (a fault injected here leaves the cache half repaired, as a real one would)
        offset = self.gap  # old token j >= pos sits in slot h + j + offset
        old_next = pos  # the first old token not yet kept or dropped
        fresh: list[tuple[int, int]] = []  # new tokens, [start, end) in new coordinates
        for r, run in enumerate(runs[k:], start=k):
            if run.ids is None:
                old_next = run.a
                if r == len(runs) - 1:  # the tail stays in place: the gap ends where it starts
                    break
                # a run between two changes crosses to the near side of the gap
                self._move(h + run.a + offset, h + run.b + offset, pos - run.a - offset)
                pos += len(run)
                old_next = run.b
            else:
                m = len(run.ids)
                room = h + old_next + offset - (h + pos)
                if room < m:  # the gap is full: the old tokens after it move right
                    extra = max(m - room, GAP_SLOTS)
                    old_end = self._old_frontier_end(runs)
                    self.cache.ensure_capacity(h + max(len(self.ids), old_end) + offset + extra + SPARE_SLOTS)
                    tail_end = h + old_end + offset
                    self._move(h + old_next + offset, tail_end, extra)
                    offset += extra
                self._encode_new(pos, run.ids)
                fresh.append((pos, pos + m))
                pos += m
        tail = runs[-1] if runs[-1].ids is None and len(runs) - 1 >= k else None
        if tail is not None:
            self.gap_at = pos
            self.gap = h + tail.a + offset - (h + pos)
            self.frontier = pos + len(tail)
        else:
            self.gap_at = self.frontier = pos
            self.gap = h + old_next + offset - (h + pos)
        # the first change is where the runs first differ from the old layout: a deletion there
        # leaves no new tokens, but every cached token after it attended to the deleted ones
        self._set_stale_from(first_change, fresh)
        if self.gap > max(4 * GAP_SLOTS, (h + len(self.ids)) // 2):  # a large deletion: close most of it
            excess = self.gap - GAP_SLOTS
            if self.frontier > self.gap_at:
                self._move(h + self.gap_at + self.gap, self.slot(self.frontier - 1) + 1, -excess)
            self.gap = GAP_SLOTS
        if self.cache.capacity > 2 * self.end_slot + 2 * SPARE_SLOTS:
            self.cache.shrink(self.end_slot + SPARE_SLOTS)
            self._wrote(self.end_slot + SPARE_SLOTS, self.cache.capacity + (1 << 30))
        self.cache.ensure_capacity(self.end_slot + SPARE_SLOTS)
        self.cache.extent = self.end_slot + SPARE_SLOTS

    def _old_frontier_end(self, runs: list[_Run]) -> int:
        """The end of the old encoded tokens (old coordinates) the runs still use."""
        ends = [r.b for r in runs if r.ids is None]
        return max(ends) if ends else 0

    def _encode_new(self, pos: int, ids: tuple[int, ...]) -> None:
        """New tokens at `pos` (the gap's near side), attending to everything before them."""
        h = self.h
        at = h + pos
        self.invalidate_views(pos)
        self._wrote(at, at + len(ids))
        prefill(self.model, list(ids), self.cache, start=at, first_position=at,
                context=[Span(self.cache, 0, at)] if at else [], chunk=self.options.prefill_chunk,
                logits="none", **self._window())
        self.stats.tokens_encoded += len(ids)
        self._edit_marks.append(pos + len(ids))

    def _set_stale_from(self, first_change: int, fresh: list[tuple[int, int]]) -> None:
        """Every cached token after the first change is stale (it never saw the change), and so
        is every new one after a stale token (it attended to stale keys): the stale tokens are a
        suffix of the encoded ones, which `refresh` re-encodes from its first token on."""
        n = len(self.ids)
        stale = np.zeros(n, dtype=bool)
        old = self.stale if len(self.stale) == n else np.ones(n, dtype=bool)  # unknown: stale, to be safe
        stale[:first_change] = old[:first_change]
        stale[first_change : self.frontier] = True
        # new tokens are exact only when nothing before them is stale: the first change's, if any
        if fresh and fresh[0][0] == first_change and not stale[:first_change].any():
            stale[fresh[0][0] : fresh[0][1]] = False
        self.stale = stale
        redone = np.zeros(n, dtype=bool)
        if len(self.redone) == n:
            redone[:first_change] = self.redone[:first_change]
        self.redone = redone

    def _refresh_after_edits(self, encoded_before: int) -> None:
        """`refresh_window` tokens after each edit re-encoded with it (a benchmark option)."""
        marks = getattr(self, "_edit_marks", [])
        for end in marks:
            self._encode(end, min(self.frontier, end + self.options.refresh_window))

    def _repair_in_place(self) -> None:
        """The baselines in a layout without a gap: "conflict" moves slots without re-rotating
        (the suffix keeps stale positions); "prefix_reuse" re-encodes from the first change."""
        faults.hit("repair")
        mode = self.options.mode
        runs = list(self.runs)
        self._edit_marks = []
        if mode == "prefix_reuse":
            runs = self._from_first_change(runs)
        h = self.h
        n = len(self.ids)
        cache = self.cache
        cache.ensure_capacity(h + n + 1)  # a free last slot lets small writes replay as CUDA graphs
        placed = []
        pos = 0
        for run in runs:
            placed.append((run, pos))
            pos += len(run)
        old_positions = self.slot_positions.copy()
        new_positions = np.arange(h + n, dtype=np.int64)
        new_positions[:h] = old_positions[:h]
        moves = [(r, s) for r, s in placed if r.ids is None and s != r.a]
        rotate = mode != "conflict"
        for run, start in sorted((m for m in moves if m[1] < m[0].a), key=lambda m: m[0].a):
            self._move(h + run.a, h + run.b, start - run.a, rotate)
        for run, start in sorted((m for m in moves if m[1] > m[0].a), key=lambda m: -m[0].a):
            self._move(h + run.a, h + run.b, start - run.a, rotate)
        fresh = []
        first_change = None
        for run, start in placed:
            if run.ids is None:
                shift = start - run.a
                if shift and first_change is None:
                    first_change = start
                new_positions[h + start : h + start + len(run)] = old_positions[h + run.a : h + run.b] + (
                    shift if rotate else 0)
            else:
                first_change = start if first_change is None else first_change
                self._encode_new(start, run.ids)
                fresh.append((start, start + len(run)))
        self.frontier = pos
        self.gap_at = pos
        self.slot_positions = new_positions
        self._set_stale_from(len(self.ids) if first_change is None else first_change, fresh)
        if cache.capacity > 2 * (h + n) + 2 * SPARE_SLOTS:
            cache.shrink(h + n + SPARE_SLOTS)
            self._wrote(h + n + SPARE_SLOTS, 1 << 62)
        cache.extent = h + n + SPARE_SLOTS

    def _from_first_change(self, runs: list[_Run]) -> list[_Run]:
        """Everything from the first changed token on becomes one new run."""
        pos = 0
        for i, run in enumerate(runs):
            if run.ids is not None or run.a != pos:
                return runs[:i] + [_Run(ids=tuple(self.ids[pos : pos + sum(len(r) for r in runs[i:])]))]
            pos += len(run)
        return runs

    # ---- staleness ---------------------------------------------------------------------------

    def refresh(self, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        """Re-encode stale tokens from the first one on (at most `max_tokens`); returns how many.
        With `should_stop`, in small chunks that poll it (background work)."""
        self.ensure_encoded_without_refresh()
        stale = np.flatnonzero(self.stale[: self.frontier])
        if not len(stale):
            return 0
        first = int(stale[0])
        last = self.frontier if max_tokens is None else min(self.frontier, first + max_tokens)
        if should_stop is None:
            self._encode(first, last)
            return last - first
        done, step = first, encode_chunk(self.model)
        pacer = self.model.pacer  # the device at most one chunk behind (engine/pacing.py)
        while done < last and not should_stop():
            hi = min(last, done + step)
            self._encode(done, hi)
            pacer.step()
            done = hi
        return done - first

    def refresh_before(self, end: int, count: int) -> int:
        """Re-encode the stale tokens among `ids[end - count:end]` (and the fresh ones between
        them); returns how many were encoded."""
        self.ensure_encoded_without_refresh()
        end = max(0, min(end, self.frontier))
        lo = max(0, end - count)
        redone = self.redone[lo:end] if len(self.redone) == len(self.stale) else False
        stale = np.flatnonzero(self.stale[lo:end] & ~redone)
        if not len(stale):
            return 0
        first = max(0, end - count) + int(stale[0])
        self._encode(first, end)
        return end - first

    def ensure_encoded_without_refresh(self) -> None:
        if self.cache is None:
            self.ensure_ready()
        elif self.pending_edits:
            self.repair()


def _split(runs: list[_Run], index: int) -> tuple[list[_Run], list[_Run]]:
    """Runs before token `index` and from it on."""
    left: list[_Run] = []
    pos = 0
    for i, run in enumerate(runs):
        if pos + len(run) <= index:
            left.append(run)
            pos += len(run)
            continue
        cut = index - pos
        right = ([run.cut(cut, len(run))] if cut < len(run) else []) + runs[i + 1 :]
        if cut > 0:
            left.append(run.cut(0, cut))
        return left, right
    return left, []


def _merge(runs: list[_Run]) -> list[_Run]:
    """Join adjacent new-id runs and adjacent contiguous cached runs; drop empty ones."""
    out: list[_Run] = []
    for run in runs:
        if not len(run):
            continue
        if out and run.ids is not None and out[-1].ids is not None:
            out[-1] = _Run(ids=out[-1].ids + run.ids)
        elif out and run.ids is None and out[-1].ids is None and out[-1].b == run.a:
            out[-1] = _Run(out[-1].a, run.b)
        else:
            out.append(run)
    return out


@dataclass
class ViewStats:
    """What building a view cost."""

    cached_tokens: int = 0
    encoded_tokens: int = 0
    ms: float = 0.0
    extra: dict = field(default_factory=dict)
