"""Workspace n-gram index: counts of every token n-gram (n = 2..6) of open documents and files.

Data flow: a document's token ids (edit_cache's `doc.ids`) -> `add(uri, ids)`; each later
edit `(start, end, new_ids)` (edit_cache's `TokenEdit`, or anything with those fields) -> `apply_edit(uri, edit)`, which
removes the n-grams that touch the replaced span (every n-gram within `max_n - 1` tokens of
it) and adds the n-grams of the new tokens and their neighbours; decoding asks
`next_probs(context, candidates)` for the unsmoothed p_n(x | last n-1 tokens), n = 2..max_n.

Owns: a copy of each indexed document's ids and two count tables shared by all documents,
`contexts[key(ctx)]` (how often `ctx` is followed by some token) and
`ngrams[key(ctx, next)]`, where a key is a 64-bit hash of the tokens and their number
(collisions are possible and ignored: at 2^-64 per pair they never matter here). A table is
a sorted numpy array of keys with int64 counts (16 bytes an entry, against ~90 for a Python
dict) plus a small dict of pending changes merged in when it grows. N-grams never span two
documents. Memory is bounded by `max_tokens` over all documents, least recently used
documents evicted first. Refuses to know text, tokenizers and models: ids in, counts out.

Hashing: a context is folded from its last token backwards, so the keys of the contexts of
length 1..5 ending at one place cost one mixing step each, and `key(ctx, next)` is one
more step from `key(ctx)`. numpy computes the same keys over whole documents at once.
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

_MASK = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15
_SEED = 0x2545F4914F6CDD1D
_LENGTH_TAG = 1 << 40  # mixed in after a context, so contexts of different lengths differ


class TokenSpanEdit(Protocol):
    """Tokens `[start, end)` replaced by `new_ids` (edit_cache.tokens.TokenEdit has this shape; the
    engine does not import edit_cache)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def new_ids(self) -> Sequence[int]: ...
_U_MULT = np.uint64(_MULT)
_U_ONE = np.uint64(1)
_U_29 = np.uint64(29)
_BULK = 1024  # updates with more keys than this are merged at once; smaller ones (edits) wait in a dict


def _mix(h: int, t: int) -> int:
    h = ((h ^ (t + 1)) * _MULT) & _MASK
    return h ^ (h >> 29)


def _mix_np(h: np.ndarray, t: np.ndarray | np.uint64) -> np.ndarray:  # [N] uint64 (wraps like _mix)
    h = (h ^ (t + _U_ONE)) * _U_MULT
    return h ^ (h >> _U_29)


def context_keys(context: Sequence[int], max_len: int) -> list[int]:
    """Keys of the last 1..max_len tokens of `context` (fewer if it is shorter)."""
    keys = []
    h = _SEED
    for c in range(1, min(max_len, len(context)) + 1):
        h = _mix(h, context[-c])
        keys.append(_mix(h, _LENGTH_TAG + c))
    return keys


def ngram_key(context_key: int, next_id: int) -> int:
    """Key of (context, next token) from the context's key."""
    return _mix(context_key, next_id)


def _window_keys(ids: np.ndarray, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(context keys, n-gram keys), uint64, of every n-gram of `ids` [N], n = 2..max_n."""
    ctx_out: list[np.ndarray] = []
    gram_out: list[np.ndarray] = []
    t = ids.astype(np.uint64)
    for c in range(1, max_n):
        ends = np.arange(c, len(t))  # index of the next token
        if len(ends) == 0:
            break
        h = np.full(len(ends), _SEED, dtype=np.uint64)
        for j in range(1, c + 1):
            h = _mix_np(h, t[ends - j])
        key = _mix_np(h, np.uint64(_LENGTH_TAG + c))
        ctx_out.append(key)
        gram_out.append(_mix_np(key, t[ends]))
    if not ctx_out:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return np.concatenate(ctx_out), np.concatenate(gram_out)


class CountTable:
    """uint64 key -> count: sorted arrays, plus pending changes in a dict until they are merged."""

    def __init__(self, merge_at: int = 1 << 16) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)  # [N] sorted, unique
        self.counts = np.zeros(0, dtype=np.int64)  # [N] > 0 after a merge
        self.pending: Counter[int] = Counter()
        self.merge_at = merge_at

    def add(self, keys: np.ndarray, sign: int = 1) -> None:
        """Count each of `keys` [N] uint64 once more (`sign` -1: once less)."""
        if len(keys) > _BULK:  # a whole document: straight into the arrays, after the pending edits
            self.merge()  # (a key an edit added may be one this removes)
            uniq, num = np.unique(keys, return_counts=True)
            self._merge_sorted(uniq, sign * num.astype(np.int64))
            return
        pending = self.pending
        for key in keys.tolist():
            pending[key] += sign
        if len(pending) > max(self.merge_at, len(self.keys) // 4):
            self.merge()

    def merge(self) -> None:
        """Fold the pending changes into the arrays."""
        if not self.pending:
            return
        dk = np.fromiter(self.pending.keys(), dtype=np.uint64, count=len(self.pending))
        dc = np.fromiter(self.pending.values(), dtype=np.int64, count=len(self.pending))
        self.pending = Counter()
        order = np.argsort(dk)
        self._merge_sorted(dk[order], dc[order])

    def _merge_sorted(self, dk: np.ndarray, dc: np.ndarray) -> None:
        """Add counts `dc` to sorted unique keys `dk`; keys whose count reaches 0 are dropped."""
        pos = np.searchsorted(self.keys, dk)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == dk[found]
        counts = self.counts.copy()
        np.add.at(counts, pos[found], dc[found])
        fresh = ~found & (dc != 0)
        keys = np.insert(self.keys, pos[fresh], dk[fresh])
        counts = np.insert(counts, pos[fresh], dc[fresh])
        keep = counts != 0
        if not keep.all():
            keys, counts = keys[keep], counts[keep]
        if (counts < 0).any():
            raise AssertionError("an n-gram was removed more often than it was added")
        self.keys, self.counts = keys, counts

    def get(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        base = int(self.counts[i]) if i < len(self.keys) and int(self.keys[i]) == key else 0
        return base + self.pending.get(key, 0)

    def get_many(self, keys: list[int]) -> np.ndarray:  # [len(keys)] int64
        arr = np.array(keys, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self.keys, arr), max(len(self.keys) - 1, 0))
        out = np.where(self.keys[pos] == arr, self.counts[pos], 0) if len(self.keys) else np.zeros(len(arr), np.int64)
        if self.pending:
            pending = self.pending
            out = out + np.array([pending.get(k, 0) for k in keys], dtype=np.int64)
        return out

    def __len__(self) -> int:
        """Entries after a merge (merges first)."""
        self.merge()
        return len(self.keys)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.counts.nbytes + 100 * len(self.pending)  # ~bytes of a dict entry + int


class NgramIndex:
    """Counts of the n-grams (n = 2..max_n) of a set of documents, updatable by token edits."""

    def __init__(self, max_n: int = 6, max_tokens: int = 1_000_000) -> None:
        if max_n < 2:
            raise ValueError(f"max_n must be >= 2 (n-grams of a context and a next token), got {max_n}")
        self.max_n = max_n
        self.max_tokens = max_tokens
        self.contexts = CountTable()
        self.ngrams = CountTable()
        self.docs: OrderedDict[str, array] = OrderedDict()  # least recently used first
        self.num_tokens = 0
        self.evictions = 0

    # ---- documents ---------------------------------------------------------------------------

    def add(self, uri: str, ids: Sequence[int]) -> bool:
        """Index (or re-index) a document; False when it alone exceeds `max_tokens`."""
        self.remove(uri)
        if len(ids) > self.max_tokens:
            return False
        self._make_room(len(ids), keep=uri)
        doc = array("q", ids)
        self.docs[uri] = doc
        self.num_tokens += len(doc)
        self._count(doc, 0, len(doc), +1)
        return True

    def remove(self, uri: str) -> None:
        """Forget a document (closed, deleted, or evicted)."""
        doc = self.docs.pop(uri, None)
        if doc is not None:
            self._count(doc, 0, len(doc), -1)
            self.num_tokens -= len(doc)

    def touch(self, uri: str) -> None:
        """Mark a document as recently used (the last to be evicted)."""
        if uri in self.docs:
            self.docs.move_to_end(uri)

    def apply_edit(self, uri: str, edit: TokenSpanEdit) -> None:
        """Tokens `[start, end)` of the document became `new_ids`: update the counts around them."""
        doc = self.docs.get(uri)
        if doc is None:
            return
        if not 0 <= edit.start <= edit.end <= len(doc):
            raise ValueError(f"edit [{edit.start}, {edit.end}) outside a document of {len(doc)} tokens; "
                             f"re-add the document with add()")
        reach = self.max_n - 1
        lo = max(0, edit.start - reach)
        self._count(doc, lo, min(len(doc), edit.end + reach), -1)
        doc[edit.start : edit.end] = array("q", edit.new_ids)
        self._count(doc, lo, min(len(doc), edit.start + len(edit.new_ids) + reach), +1)
        self.num_tokens += len(edit.new_ids) - (edit.end - edit.start)
        self.docs.move_to_end(uri)
        if self.num_tokens > self.max_tokens:
            if len(doc) > self.max_tokens:
                self.remove(uri)
            else:
                self._make_room(0, keep=uri)

    def _make_room(self, extra: int, keep: str) -> None:
        for uri in list(self.docs):
            if self.num_tokens + extra <= self.max_tokens:
                return
            if uri != keep:
                self.remove(uri)
                self.evictions += 1

    def _count(self, doc: array, lo: int, hi: int, sign: int) -> None:
        """Add (+1) or remove (-1) the n-grams lying inside `doc[lo:hi]`."""
        if hi - lo < 2:
            return
        ctx, grams = _window_keys(np.frombuffer(doc, dtype=np.int64)[lo:hi], self.max_n)
        self.contexts.add(ctx, sign)
        self.ngrams.add(grams, sign)

    # ---- lookups -------------------------------------------------------------------------------

    def context_count(self, context: Sequence[int]) -> int:
        """How often exactly `context` (1..max_n-1 tokens) is followed by a token."""
        return self.contexts.get(context_keys(context, len(context))[-1]) if context else 0

    def count(self, context: Sequence[int], next_id: int) -> int:
        """How often the n-gram `context + [next_id]` occurs."""
        if not context:
            return 0
        return self.ngrams.get(ngram_key(context_keys(context, len(context))[-1], next_id))

    def next_probs(self, context: Sequence[int], candidates: Sequence[int]) -> list[list[float] | None]:
        """For n = 2..max_n: p_n(x | last n-1 tokens) of each candidate x (None: context unseen).

        Unsmoothed relative frequencies. A context unseen at length c is unseen at every longer
        length (each occurrence of the longer one is one of the shorter), so only the seen
        lengths are looked up, in two array searches.
        """
        out: list[list[float] | None] = [None] * (self.max_n - 1)
        keys = context_keys(context, self.max_n - 1)
        if not keys or not candidates:
            return out
        totals = self.contexts.get_many(keys)
        seen = len(keys) if totals.all() else int(np.argmin(totals > 0))
        if not seen:
            return out
        counts = self.ngrams.get_many([ngram_key(key, x) for key in keys[:seen] for x in candidates])
        probs = (counts.reshape(seen, len(candidates)) / totals[:seen, None]).tolist()
        out[:seen] = probs
        return out

    # ---- size ----------------------------------------------------------------------------------

    @property
    def num_entries(self) -> int:
        """Distinct contexts plus distinct n-grams (merges pending changes first)."""
        return len(self.contexts) + len(self.ngrams)

    def nbytes(self) -> int:
        """Approximate bytes held: both tables and the documents' ids."""
        docs = sum(len(d) * d.itemsize for d in self.docs.values())
        return self.contexts.nbytes() + self.ngrams.nbytes() + docs
