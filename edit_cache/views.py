"""Context views: what a completion at a cursor attends to, built on a document's cache.

A view never mutates the document's slots. It names document slots to attend to (`Span`s)
and encodes the few tokens no cached slot holds into a scratch window (free slots of the
document's cache after its last one); the decoding strategy then writes generated tokens
into the same scratch. With everything in one buffer, the steps replay as CUDA graphs.

left-to-right: `<start> text[:cursor]`. Cached slots up to a safe cut point before the
cursor (the start of the cursor's line, or of an earlier non-blank line, which is a token
boundary for line-local tokenizers) plus the line's text up to the cursor, encoded fresh.

fill-in-the-middle: `<PRE> prefix <SUF> suffix <MID>`. In document order this is a virtual
insertion of `<SUF>` (and of the fresh text up to the next safe point) at the cursor: the
cached suffix slots are attended to with a position shift instead of being re-encoded. They
never saw `<SUF>`, like PIE's stale suffix. `suffix="next_line"` leaves the rest of the
cursor's line out of the suffix, so the model may rewrite it.

The suffix's first `fim_fresh_suffix` cached tokens are re-encoded after a `<SUF>` of their own
(a real model reads a suffix that never saw `<SUF>` noticeably worse). That window attends to
the cached text before the cursor's line, not to the line, so it is kept between requests
(`SuffixWindow`, in spare slots after the document's) and a keystroke on the cursor's line
encodes the line's text before the cursor, `<SUF>`, the line's rest and `<MID>` only; an edit
above the line, inside the window or over its slots drops it (`Document.invalidate_views`,
`Document._wrote`). `fim_suffix_cache=False` re-encodes it after the line every request.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from editkv.edit_cache.crossfile import ContextBlock
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import common_prefix, common_suffix
from editkv.engine.generate import Completion, DecodeState, DecodeStats, StopRules, decode, windowed
from editkv.engine.healing import healer_for
from editkv.engine.model import KVCache, Span, TokenGroup
from editkv.engine.prompting import fim_heals, fim_suffix_budget, fim_tail
from editkv.engine.sampling import SamplingParams

DRAFT_SLOTS = 33  # scratch beyond max_new_tokens: a speculative draft verified at the last step
# with other files' context in front (a `block`), a FIM view re-encodes the document's last this
# many tokens before the cursor with it: they were cached without the block, and a FIM model's
# first tokens read them most (BENCHMARKS.md, cross-file: with Qwen2.5-Coder-0.5B the FIM view's
# first-token KL to an exact prefill of [block + prompt] fell from 0.22 to 0.04; l2r needs none)
BLOCK_FRESH_PREFIX = 128
_CONTENT = re.compile(r"[ \t\f\v]*[^\s]")
_TERMINATOR = re.compile(r"\r\n|\r|\n")


class StaleView(RuntimeError):
    """A view used after its document's cache moved on (see ContextView.check_current)."""


@dataclass
class ContextView:
    """Everything a decoding strategy needs to continue at a cursor."""

    kind: str  # "l2r" | "fim"
    document: Document
    context: list[Span]  # document slots the generated tokens attend to
    scratch: KVCache  # view tokens [0, scratch_used), generated tokens after
    scratch_used: int
    next_position: int
    first_logits: torch.Tensor  # [1, V]: distribution of the first generated token
    prompt_ids: list[int]  # the exact prompt this view stands for
    heal: bytes = b""  # text of the cursor's token, dropped from the prompt (token healing)
    cached_tokens: int = 0
    encoded_tokens: int = 0
    build_ms: float = 0.0
    extra: dict = field(default_factory=dict)
    epoch: int | None = None  # the document's `view_epoch` when this view was built

    def check_current(self) -> None:
        """Raise StaleView if the document changed its cache or gave the scratch to a newer view."""
        if self.epoch is not None and self.epoch != self.document.view_epoch:
            raise StaleView("this view's document was repaired, or a newer view of it took the scratch "
                            "slots, since the view was built; build the view again")

    def state(self) -> DecodeState:
        """This view as the starting point of any decoding strategy."""
        self.check_current()
        doc = self.document
        return DecodeState(doc.model, doc.tokenizer, self.first_logits, self.context, self.scratch,
                           self.scratch_used, self.next_position, self.heal, self.prompt_ids)

    def decode(self, params: SamplingParams | None = None, rules: StopRules | None = None,
               stats: DecodeStats | None = None, first_logits: torch.Tensor | None = None) -> Completion:
        """Plain decoding from this view (greedy unless `params` samples).

        `first_logits` replaces the view's first distribution (e.g. to force a first token).
        Decodes may run one after another on the same view: each overwrites the last's tokens.
        """
        self.check_current()
        doc = self.document
        logits = self.first_logits if first_logits is None else first_logits
        return decode(doc.model, doc.tokenizer, logits, context=self.context,
                      next_position=self.next_position, params=params, rules=rules,
                      scratch=self.scratch, scratch_used=self.scratch_used, stats=stats, heal=self.heal)


def _line_start(text: str, pos: int) -> int:
    return max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1


def _line_has_content(text: str, start: int) -> bool:
    end = _TERMINATOR.search(text, start)
    return bool(_CONTENT.match(text[start : end.start() if end else len(text)]))


def prefix_cut(text: str, cursor: int) -> int:
    """A token boundary at or before `cursor`, in both the whole text and `text[:cursor]`."""
    pos = _line_start(text, cursor)
    while pos > 0:
        if _line_has_content(text, pos) and not (text[pos - 1] == "\r" and text.startswith("\n", pos)):
            return pos
        pos = _line_start(text, pos - 1)
    return 0


def suffix_cut(text: str, start: int) -> int:
    """A token boundary after the line holding `start`: the start of the next non-blank line."""
    m = _TERMINATOR.search(text, start)
    while m is not None:
        pos = m.end()
        if _line_has_content(text, pos):
            return pos
        m = _TERMINATOR.search(text, pos)
    return len(text)


def _split_prefix(doc: Document, cursor: int) -> tuple[int, list[int]]:
    """(document tokens reused from the cache, fresh ids for the rest of text[:cursor])."""
    text = doc.text
    if doc.tokens.line_local:
        cut = prefix_cut(text, cursor)
        t = 0 if cut == 0 else doc.tokens.first_token_at_or_after(cut)
        return t, doc.tokenizer.encode(text[cut:cursor])
    fresh = doc.tokenizer.encode(text[:cursor])
    t = common_prefix(doc.ids, fresh)
    return t, fresh[t:]


def _split_suffix(doc: Document, start: int) -> tuple[int, list[int]]:
    """(first document token reused from the cache, fresh ids for text[start:] before it)."""
    text = doc.text
    if doc.tokens.line_local:
        cut = suffix_cut(text, start)
        t = len(doc.ids) if cut >= len(text) else doc.tokens.first_token_at_or_after(cut)
        return t, doc.tokenizer.encode(text[start:cut])
    fresh = doc.tokenizer.encode(text[start:])
    k = common_suffix(doc.ids, fresh)
    return len(doc.ids) - k, fresh[: len(fresh) - k]


def _prefix_part(doc: Document, cursor: int, *, heal: bool = True, again: int = 0,
                 floor: int = 0) -> tuple[int, list[int], bytes]:
    """(document tokens used from the cache, fresh ids, healed bytes); the cache is made ready
    for those tokens (encoded as far, pending edits repaired, stale ones near the cursor redone).
    `heal`: drop the cursor's token for the model to spell again (engine/healing.py). `again`: the
    last this many cached tokens (not below token `floor`) become fresh ids too, encoded with the view."""
    t, fresh = _split_prefix(doc, cursor)
    back = min(t, max(floor, t - again))
    doc.ensure_ready(upto=back)
    if back < t:
        fresh, t = doc.ids[back:t] + fresh, back
    if doc.options.refresh_near_cursor:
        doc.refresh_before(t, doc.options.refresh_near_cursor)
    if not heal:
        return t, fresh, b""
    fresh, healed = healer_for(doc.tokenizer).split(fresh)
    return t, fresh, healed


def _context_before(doc: Document, used: int, block: ContextBlock | None = None) -> list[Span]:
    """The head and document tokens making up the first `used` prompt ids, at their positions
    (with a cross-file `block`: the block, which ends with the head, then the tokens moved by
    its shift)."""
    if block is not None:
        if used <= doc.h + block.document_tokens:
            return block.spans(block.shift + used)
        return [*block.spans(), *doc.spans(block.document_tokens, used - doc.h, block.shift)]
    if used <= doc.h:
        return [Span(doc.cache, 0, used)] if used else []
    return doc.head_spans(used - doc.h)


def _prompt_before(doc: Document, used: int, block: ContextBlock | None) -> list[int]:
    """The prompt ids `_context_before` stands for."""
    if block is None:
        return (doc.head + doc.ids)[:used]
    if used <= doc.h + block.document_tokens:
        return block.ids[: block.shift + used]
    return block.ids + doc.ids[block.document_tokens: used - doc.h]


def _sink(doc: Document, block: ContextBlock | None) -> tuple[KVCache, int]:
    return doc.sink if block is None else block.sink


def _graphs_on(doc: Document) -> bool:
    """Whether the model's runner has a static forward (CUDA graphs), which wants a view's spans in
    one shape (see engine/static_decode.py): then a FIM view moves the document's gap out of its suffix."""
    return doc.model.static is not None


def left_to_right(doc: Document, cursor: int, *, max_new_tokens: int = 64,
                  block: ContextBlock | None = None) -> ContextView | None:
    """View for continuing `text[:cursor]`; None when there is nothing to condition on.

    `block`: other files' context in front of the document (edit_cache/crossfile.py)."""
    started = time.perf_counter()
    t, fresh, heal = _prefix_part(doc, cursor)
    used = doc.h + t
    if not fresh:
        if used == 0:
            return None
        used -= 1  # re-encode the last cached token to get its logits
        fresh = [(doc.head + doc.ids)[used]]
    off = block.shift if block is not None else 0
    first_position = used + off  # a key acts at its index in the prompt (the gap's shift says so)
    model = doc.model
    scratch = doc.scratch_window(len(fresh) + max_new_tokens + DRAFT_SLOTS)
    context = _context_before(doc, used, block)
    # the last position this view may reach, and what it can see from there
    context = windowed(context, first_position + scratch.capacity - doc.context_size, _sink(doc, block))
    logits = model(torch.tensor([fresh], device=model.device),
                   torch.arange(first_position, first_position + len(fresh), device=model.device),
                   write=scratch, write_at=0, context=context, logits="last")
    prompt = _prompt_before(doc, used, block) + fresh
    return ContextView("l2r", doc, context, scratch, len(fresh), first_position + len(fresh), logits, prompt,
                       heal=heal, cached_tokens=used, encoded_tokens=len(fresh),
                       build_ms=1000 * (time.perf_counter() - started), epoch=doc.view_epoch,
                       extra={"block": block} if block is not None else {})


def fill_in_middle(doc: Document, cursor: int, *, suffix: str = "rest_of_line",
                   max_new_tokens: int = 64, whole_suffix: bool = True,
                   block: ContextBlock | None = None, block_fresh_prefix: int = BLOCK_FRESH_PREFIX,
                   block_cached_suffix: int | None = None) -> ContextView:
    """View for `<PRE> text[:cursor] <SUF> suffix <MID>` (suffix from the cursor or the next line).

    `whole_suffix=False`: the suffix as far as the document has keys (the server's path, where
    the rest is encoded in the background) instead of encoding the whole document first.

    Models whose layout repeats the prefix's last tokens after `<MID>` (`FimTokens.tail`) get
    them encoded with `<MID>`, like every other view token, and the cursor's token healed; other
    FIM layouts are not healed (engine.prompting.fim_heals). `block`: other files' context in
    front of the document (edit_cache/crossfile.py), and the document's last `block_fresh_prefix`
    tokens before the cursor re-encoded with it (`BLOCK_FRESH_PREFIX`); `block_cached_suffix`: with a
    block, at most this many of the suffix's cached tokens past its re-encoded window (they never saw
    the block; None: as many as without one).
    """
    fim = doc.tokenizer.fim
    if fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens; use the left-to-right view")
    if suffix not in ("rest_of_line", "next_line"):
        raise ValueError(f"suffix must be 'rest_of_line' or 'next_line', not {suffix!r}")
    started = time.perf_counter()
    text = doc.text
    if whole_suffix:
        doc.ensure_ready()
    # a FIM model's middle starts where the prefix's text ends: healed only for layouts with a tail
    t, fresh_prefix, heal = _prefix_part(doc, cursor, heal=fim_heals(doc.tokenizer),
                                         again=block_fresh_prefix if block is not None else 0,
                                         floor=block.document_tokens if block is not None else 0)
    off = block.shift if block is not None else 0
    used = doc.h + t
    first_position = used + off
    suffix_start = cursor
    if suffix == "next_line":
        m = _TERMINATOR.search(text, cursor)
        suffix_start = m.end() if m else len(text)
    t_suffix, fresh_suffix = _split_suffix(doc, suffix_start)
    h = doc.h
    extra = min(doc.options.fim_fresh_suffix, len(doc.ids) - t_suffix)
    window_ids = doc.ids[t_suffix:t_suffix + extra]
    t_suffix += extra
    # the suffix as far as it has keys (a document still being encoded in the background)
    n = max(t_suffix, min(len(doc.ids), doc.frontier))
    if block is not None and block_cached_suffix is not None:
        n = min(n, t_suffix + block_cached_suffix)
    graphs = _graphs_on(doc)
    if graphs and not t <= doc.gap_at <= t_suffix:
        doc.move_gap(min(max(doc.gap_at, t), t_suffix))  # prefix and suffix each one span
    # the re-encoded suffix window kept between requests (`SuffixWindow`); not with CUDA graphs,
    # whose static spans want the view's keys in the document's slots and its scratch only
    cache_window = bool(window_ids) and doc.options.fim_suffix_cache and not graphs and block is None
    head_ids = fresh_prefix + [fim.suffix] + fresh_suffix + ([] if cache_window else window_ids)
    kept = len(window_ids) if cache_window else 0  # window tokens not in head_ids
    model = doc.model
    if not cache_window:
        doc.suffix_window = None
    scratch_size = len(head_ids) + 1 + fim.tail + max_new_tokens + DRAFT_SLOTS
    if first_position + kept + (n - t_suffix) + scratch_size > doc.context_size:
        # longer than the model's context: a quarter of it for the suffix, the rest for the prefix
        n = min(n, t_suffix + max(0, fim_suffix_budget(doc.context_size) - len(fresh_suffix) - len(window_ids)))
    context = _context_before(doc, used, block)
    # past the last position a decode step reaches
    last = first_position + kept + (n - t_suffix) + scratch_size
    context = windowed(context, last - doc.context_size, _sink(doc, block))
    dev = model.device
    window_spans: list[Span] = []
    encoded = reused = 0
    window = None
    if cache_window:
        window, hit = _suffix_window(doc, context, first_position, window_ids, t)
        scratch = doc.scratch_window(scratch_size)  # (after the window's slots)
        encoded, reused = (0, len(window_ids)) if hit else (window.size, 0)
        # its tokens act right after the view's fresh <SUF> and text: shifted by their length
        window_spans = [Span(doc.cache, window.start + 1, window.start + window.size,
                             len(fresh_prefix) + len(fresh_suffix))]
        if hit:
            window = None  # nothing to encode
    else:
        scratch = doc.scratch_window(scratch_size)
    head_context = context
    suffix_position = first_position + len(head_ids) + kept
    context = [*context, *window_spans]
    if t_suffix < n:
        context = [*context, *doc.spans(t_suffix, n, suffix_position - (h + t_suffix))]
    middle_position = suffix_position + (n - t_suffix)
    # <MID>, then the prefix's last tokens again when the model's layout asks for them
    middle_ids = [fim.middle] + fim_tail(doc.tokenizer, (doc.head + doc.ids)[h:used] + fresh_prefix)
    middle_context = [*context, Span(scratch, 0, len(head_ids))]
    positions = [*range(first_position, first_position + len(head_ids)),
                 *range(middle_position, middle_position + len(middle_ids))]
    if graphs:  # (static shapes: a forward each, as the captured graphs have them)
        model(torch.tensor([head_ids], device=dev), torch.tensor(positions[:len(head_ids)], device=dev),
              write=scratch, write_at=0, context=head_context, logits="none")
        logits = model(torch.tensor([middle_ids], device=dev), torch.tensor(positions[len(head_ids):], device=dev),
                       write=scratch, write_at=len(head_ids), context=middle_context, logits="last")
    else:
        # one forward for all the view's tokens (on a CPU a forward costs a read of every weight,
        # whatever its few tokens): token groups, each seeing what a forward of its own would
        ids, groups = [*head_ids, *middle_ids], [TokenGroup(len(head_ids), head_context),
                                                 TokenGroup(len(middle_ids), middle_context)]
        write, write_at = scratch, 0
        right_after = scratch.offset == doc.cache.offset + window.start + window.size if window is not None else False
        if window is not None and scratch.home is doc.cache and right_after:
            # the window's slots right before the scratch: its tokens join the forward, first
            ids = [*_window_ids(doc, window), *ids]
            positions = [*range(first_position, first_position + window.size), *positions]
            groups.insert(0, TokenGroup(window.size, head_context))
            write, write_at, window = doc.cache, window.start, None
        if window is not None:
            _encode_window(doc, window, head_context, first_position)
        logits = model(torch.tensor([ids], device=dev), torch.tensor(positions, device=dev),
                       write=write, write_at=write_at, groups=groups, logits="last")
    prompt = _prompt_before(doc, used, block) + head_ids + window_ids[:kept] + doc.ids[t_suffix:n] + middle_ids
    encoded += len(head_ids) + len(middle_ids)
    return ContextView("fim", doc, context, scratch, len(head_ids) + len(middle_ids),
                       middle_position + len(middle_ids), logits, prompt,
                       heal=heal, cached_tokens=used + n - t_suffix + reused, encoded_tokens=encoded,
                       build_ms=1000 * (time.perf_counter() - started), epoch=doc.view_epoch,
                       extra={"block": block} if block is not None else {"suffix_window_reused": reused})


@dataclass
class SuffixWindow:
    """A FIM view's re-encoded suffix start, kept between requests in spare slots after
the document's (`Document.scratch_start` keeps view scratch windows after them).

    `<SUF> window` encoded at positions `first_position ...`, attending to the cached text before
    the cursor's line (the view's context spans): everything the cursor's line is not. A view
    uses the window's tokens (not its <SUF>, it encodes its own after the line) shifted by the
    length of the line's fresh text, so they act where the prompt has them. Valid while `key`
    matches (same context, positions, ids, slots); the document drops it when the keys or ids of
    its first `attended` tokens change (`Document.invalidate_views`).
    """

    key: tuple
    start: int  # its first slot in the document's cache
    size: int  # 1 + window tokens
    attended: int  # document tokens [0, attended) it attended to


def _suffix_window(doc: Document, context: list[Span], first_position: int, window_ids: list[int],
                   attended: int) -> tuple[SuffixWindow, bool]:
    """The document's kept suffix window for this view and True, or a new one (slots taken, not
    encoded yet: `_encode_window`) and False."""
    # what the context stands for: the positions its keys act at (the same keys whichever side
    # of the gap they sit; a change of their contents drops the window, Document.invalidate_views)
    acting: list[list[int]] = []
    for s in context:
        lo, hi = s.start + s.shift, s.end + s.shift
        if acting and acting[-1][1] == lo:
            acting[-1][1] = hi
        elif hi > lo:
            acting.append([lo, hi])
    key = (tuple(map(tuple, acting)), first_position, tuple(window_ids))
    window = doc.suffix_window
    size = 1 + len(window_ids)
    # (the document may have grown into slots past the window's start: its writes there drop it,
    # Document._wrote)
    if window is not None and window.key == key and window.start + size <= doc.cache.capacity:
        return window, True
    doc.suffix_window = None
    window = SuffixWindow(key, doc.end_slot, size, attended)
    doc.cache.ensure_capacity(window.start + size)
    doc.suffix_window = window
    return window, False


def _window_ids(doc: Document, window: SuffixWindow) -> list[int]:
    """What the window's slots hold: `<SUF>` and the suffix tokens (its key's last part)."""
    return [doc.tokenizer.fim.suffix, *window.key[2]]


def _encode_window(doc: Document, window: SuffixWindow, context: list[Span], first_position: int) -> None:
    ids = _window_ids(doc, window)
    dev = doc.model.device
    doc.model(torch.tensor([ids], device=dev), torch.arange(first_position, first_position + window.size, device=dev),
              write=doc.cache, write_at=window.start, context=context, logits="none")
