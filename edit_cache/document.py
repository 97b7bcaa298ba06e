"""One open document: text <-> tokens <-> KV cache, repaired after edits with PIE.

Data flow: LSP content change -> `apply_change` updates the text and, through
`TokenizedText`, yields the minimal token edit `[a, b) -> new ids`; the edit is recorded as
pending (the current token sequence is kept as pieces: runs of cached slots and runs of new
ids). `repair` applies all pending edits at once, left to right:
  1. cached runs move to their new slots and their keys are re-rotated by the shift (one fused
     kernel per run, kernels/rerotate.py); prefix runs don't move;
  2. new runs (plus, optionally, `refresh_window` tokens after each) are encoded by forward
     passes at their positions, attending to everything before them.
The cache holds `head` (the model's document-start token, see engine.prompting) then the
document's tokens: token i lives in slot `h + i`, encoded at position `slot_positions[h + i]`
(contiguous after a PIE repair).

Cached tokens after an edit never saw the new tokens: they are *stale*. The document counts
them; `refresh` re-encodes from the first stale token, on demand or when `stale_budget` is
crossed. Modes other than PIE exist for benchmarks: "conflict" moves slots without
re-rotating (the suffix keeps stale positions), "prefix_reuse" re-encodes everything from
the first changed token (what llama.cpp / vLLM prefix caching do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from editkv.edit_cache.positions import Range, apply_change
from editkv.edit_cache.tokens import TokenEdit, TokenizedText
from editkv.engine.generate import prefill
from editkv.engine.model import KVCache, Span, Transformer
from editkv.engine.tokenizer import Tokenizer
from editkv.kernels.rerotate import move_rerotate

MODES = ("pie", "conflict", "prefix_reuse")
SPARE_SLOTS = 256  # free slots kept after a document's last one: views' scratch windows live there


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
    stale_budget: int | None = None  # refresh everything stale once more than this many
    prefill_chunk: int | None = None  # tokens per prefill forward (None: the device's default, engine.generate)
    # FIM views re-encode this many of the suffix's first cached tokens after <SUF> (they were
    # cached without it; a real model reads a suffix that never saw <SUF> noticeably worse)
    fim_fresh_suffix: int = 0
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
# measured with Qwen2.5-Coder-0.5B on 100 realedits targets (BENCHMARKS.md, edit cache): with
# both, PIE's exact matches equal full recompute's in both views (without: -3 l2r, -1 FIM).
TUNED = ("fim_fresh_suffix", "refresh_near_cursor")
RECOMMENDED = {"fim_fresh_suffix": 64, "refresh_near_cursor": 64}


class Document:
    """Text, tokens and a PIE-repaired KV cache for one open file."""

    def __init__(
        self,
        model: Transformer,
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
        self.runs: list[_Run] = []
        self.slot_positions = np.zeros(0, dtype=np.int64)
        self.stale = np.zeros(0, dtype=bool)
        self.stats = RepairStats()
        self.pending_edits = 0
        self.version = 0
        self.last_used = time.monotonic()
        # Bumped whenever the cache's slots change or a view takes the scratch window: a view
        # built at another epoch must not decode (ContextView.check_current)
        self.view_epoch = 0

    @classmethod
    def create_simulated(cls, text: str = "", **kwargs) -> Document:
        """A CPU document over a tiny random Llama model, for tests that need no real weights."""
        from editkv.engine.config import ModelConfig

        config = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2)
        from editkv.engine.training.bpe import train_tokenizer

        torch.manual_seed(0)
        model = Transformer(config).eval()
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
        return int(self.stale.sum())

    def apply_change(self, rng: Range | None, new_text: str, encoding: str = "utf-16") -> TokenEdit | None:
        """Apply one LSP content change (range None = whole document); KV repair stays pending."""
        text, start, old_end = apply_change(self.text, rng, new_text, encoding)
        edit = self.tokens.update(text, start, old_end)
        self.version += 1
        if edit is not None and self.cache is not None:
            self._record(edit)
        return edit

    def _record(self, edit: TokenEdit) -> None:
        left, rest = _split(self.runs, edit.start)
        _, right = _split(rest, edit.end - edit.start)
        middle = [_Run(ids=edit.new_ids)] if edit.new_ids else []
        self.runs = _merge(left + middle + right)
        self.pending_edits += 1

    # ---- the cache ---------------------------------------------------------------------------

    @property
    def is_encoded(self) -> bool:
        return self.cache is not None

    def scratch_window(self, size: int) -> KVCache:
        """`size` free slots right after the document's last slot, for a view's own tokens.

        They are spare capacity of the document's cache, so a view's decode steps attend to
        one buffer (and replay as CUDA graphs); the document's slots are never written. The
        slot after the window stays free too (see engine/static_decode.py).
        """
        end = self.h + len(self.ids)
        self.cache.ensure_capacity(end + size + 1)
        self.view_epoch += 1
        return self.cache.window(end, size)

    def kv_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def drop_kv(self) -> None:
        """Forget the cache (memory pressure); the next view rebuilds it by chunked prefill."""
        self.view_epoch += 1
        self.cache = None
        self.runs = []
        self.pending_edits = 0

    def ensure_ready(self) -> None:
        """Make the cache match the text: full prefill if there is none, else repair."""
        if self.cache is None:
            self._full_prefill()
        elif self.pending_edits:
            self.repair()
        budget = self.options.stale_budget
        if budget is not None and self.num_stale > budget:
            self.refresh()
        self.last_used = time.monotonic()

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

    def _full_prefill(self) -> None:
        self.view_epoch += 1
        started = time.perf_counter()
        ids = self.head + self.ids
        self.cache = self.model.new_cache(len(ids) + SPARE_SLOTS)
        if ids:
            prefill(self.model, ids, self.cache, chunk=self.options.prefill_chunk, logits="none", **self._window())
        self.runs = [_Run(0, len(self.ids))] if self.ids else []
        self.cache.extent = len(ids) + SPARE_SLOTS
        self.slot_positions = np.arange(len(ids), dtype=np.int64)
        self.stale = np.zeros(len(self.ids), dtype=bool)
        self.pending_edits = 0
        self.stats.full_prefills += 1
        self.stats.tokens_encoded += len(ids)
        self.stats.repair_ms += 1000 * (time.perf_counter() - started)

    def repair(self) -> None:
        """Apply every pending edit to the cache (PIE, or the benchmark baselines)."""
        if self.cache is None:
            self._full_prefill()
            return
        if not self.pending_edits:
            return
        self.view_epoch += 1
        started = time.perf_counter()
        mode = self.options.mode
        runs = list(self.runs)
        if mode == "prefix_reuse":
            runs = self._from_first_change(runs)
        elif self.options.refresh_window:
            runs = self._widen(runs, self.options.refresh_window)
        h = self.h
        n = len(self.ids)
        cache = self.cache
        cache.ensure_capacity(h + n + 1)  # a free last slot lets small writes replay as CUDA graphs
        # Where each run lands: (run, new start).
        placed = []
        pos = 0
        for run in runs:
            placed.append((run, pos))
            pos += len(run)
        assert pos == n, (pos, n)
        old_positions = self.slot_positions.copy()
        old_stale = self.stale
        new_positions = np.empty(h + n, dtype=np.int64)
        new_positions[:h] = old_positions[:h]
        new_stale = np.zeros(n, dtype=bool)
        # 1. move cached runs: leftward moves first (ascending), then rightward (descending).
        moves = [(r, s) for r, s in placed if r.ids is None and s != r.a]
        rotate = mode != "conflict"
        for run, start in sorted((m for m in moves if m[1] < m[0].a), key=lambda m: m[0].a):
            self._move(run, start - run.a, rotate)
        for run, start in sorted((m for m in moves if m[1] > m[0].a), key=lambda m: -m[0].a):
            self._move(run, start - run.a, rotate)
        seen_change = False
        for run, start in placed:
            if run.ids is None:
                shift = start - run.a
                seen_change = seen_change or shift != 0
                old_pos = old_positions[h + run.a : h + run.b]
                new_positions[h + start : h + start + len(run)] = old_pos + (shift if rotate else 0)
                new_stale[start : start + len(run)] = old_stale[run.a : run.b] | seen_change
            else:
                seen_change = True
        # 2. encode new runs left to right, each attending to everything before it.
        for run, start in placed:
            if run.ids is None:
                continue
            first_position = h + start  # new tokens at their true positions, in every mode
            context = [Span(cache, 0, h + start)] if h + start > 0 else []
            prefill(self.model, list(run.ids), cache, start=h + start, first_position=first_position,
                    context=context, chunk=self.options.prefill_chunk, logits="none", **self._window())
            new_positions[h + start : h + start + len(run)] = np.arange(
                first_position, first_position + len(run)
            )
            self.stats.tokens_encoded += len(run)
        self.slot_positions = new_positions
        self.stale = new_stale
        self.runs = [_Run(0, n)] if n else []
        self.stats.repairs += 1
        self.stats.edits += self.pending_edits
        self.pending_edits = 0
        if cache.capacity > 2 * (h + n) + 2 * SPARE_SLOTS:
            cache.shrink(h + n + SPARE_SLOTS)
        cache.extent = h + n + SPARE_SLOTS
        self.stats.repair_ms += 1000 * (time.perf_counter() - started)

    def _move(self, run: _Run, delta: int, rotate: bool) -> None:
        cache = self.cache
        h = self.h
        half = self.model.config.rotary_dim // 2
        if rotate:
            cos, sin = self.model.rotary.delta_cos_sin(delta)
            cos, sin = cos[:half].contiguous(), sin[:half].contiguous()
        else:
            cos = torch.ones(half, device=cache.device)
            sin = torch.zeros(half, device=cache.device)
        move_rerotate(cache.k, cache.v, h + run.a, h + run.b, delta, cos, sin, self.model.config.rotary_dim)
        self.stats.slots_moved += len(run)

    def _widen(self, runs: list[_Run], window: int) -> list[_Run]:
        """Re-encode `window` cached tokens after each new run together with it."""
        out: list[_Run] = []
        pos = 0
        take = 0
        for run in runs:
            if run.ids is not None:
                out.append(run)
                take = window
            elif take:
                k = min(take, len(run))
                out.append(_Run(ids=tuple(self.ids[pos : pos + k])))
                if k < len(run):
                    out.append(run.cut(k, len(run)))
                take = 0
            else:
                out.append(run)
            pos += len(run)
        return _merge(out)

    def _from_first_change(self, runs: list[_Run]) -> list[_Run]:
        """Everything from the first changed token on becomes one new run."""
        pos = 0
        for i, run in enumerate(runs):
            if run.ids is not None or run.a != pos:
                return runs[:i] + [_Run(ids=tuple(self.ids[pos:]))]
            pos += len(run)
        return runs

    def refresh(self, max_tokens: int | None = None) -> int:
        """Re-encode stale tokens from the first one on (at most `max_tokens`); returns how many."""
        self.ensure_encoded_without_refresh()
        stale = np.flatnonzero(self.stale)
        if not len(stale):
            return 0
        first = int(stale[0])
        last = len(self.ids) if max_tokens is None else min(len(self.ids), first + max_tokens)
        return self._encode_range(first, last)

    def refresh_before(self, end: int, count: int) -> int:
        """Re-encode the stale tokens among `ids[end - count:end]` (and the fresh ones between
        them); returns how many were encoded."""
        self.ensure_encoded_without_refresh()
        end = max(0, min(end, len(self.ids)))
        stale = np.flatnonzero(self.stale[max(0, end - count) : end])
        if not len(stale):
            return 0
        first = max(0, end - count) + int(stale[0])
        return self._encode_range(first, end)

    def _encode_range(self, first: int, last: int) -> int:
        self.view_epoch += 1
        h = self.h
        started = time.perf_counter()
        prefill(self.model, self.ids[first:last], self.cache, start=h + first, first_position=h + first,
                context=[Span(self.cache, 0, h + first)] if h + first else [], chunk=self.options.prefill_chunk,
                logits="none", **self._window())
        self.slot_positions[h + first : h + last] = np.arange(h + first, h + last)
        self.stale[first:last] = False
        self.stats.refreshes += 1
        self.stats.tokens_encoded += last - first
        self.stats.repair_ms += 1000 * (time.perf_counter() - started)
        return last - first

    def ensure_encoded_without_refresh(self) -> None:
        if self.cache is None:
            self._full_prefill()
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
