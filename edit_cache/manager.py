"""All open documents of one model, under one KV memory budget.

The manager maps document ids (the server uses URIs) to `Document`s. When the KV bytes of
all documents pass the budget, the least recently used documents drop their caches (text
and tokens stay); a dropped document is rebuilt by chunked prefill the next time a view
needs it. The document being served is never evicted to make room for itself.

In idle time `verify_tokens` cross-checks the incremental tokenizer (edit_cache/tokens.py):
each document changed since its last check is compared with a full tokenization of its text;
a mismatch reopens it from its text (its KV is rebuilt) and is counted in `token_repairs`.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable

from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, line_starts
from editkv.edit_cache.tokens import TokenEdit, is_line_local
from editkv.engine.config import ModelConfig
from editkv.engine.model import KVCache
from editkv.engine.prompting import doc_start_ids
from editkv.engine.runner import ModelRunner
from editkv.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class UnknownDocument(KeyError):
    """A request named a document that is not open."""

    def __str__(self) -> str:
        return f"document {self.args[0]} is not open (send didOpen first)"


class DocumentCache:
    """Open documents and their KV caches, least recently used last to keep."""

    def __init__(
        self,
        model: ModelRunner,
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        budget_bytes: int | None = None,
        options: DocumentOptions | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.head = doc_start_ids(tokenizer, config)
        self.budget_bytes = budget_bytes
        self.options = options or DocumentOptions()
        self.line_local = is_line_local(tokenizer)
        self.docs: OrderedDict[str, Document] = OrderedDict()
        self.evictions = 0
        self.token_repairs = 0  # documents whose incremental tokens differed from a full tokenization
        self._checked: dict[str, int] = {}  # document -> its version when its tokens were last verified
        # KV bytes held outside the documents under the same budget (the server's cross-file
        # context blocks): the documents get what is left of the budget
        self.reserved: Callable[[], int] = lambda: 0

    def open(self, key: str, text: str) -> Document:
        """Open (or reopen, replacing) a document; its cache is built when first needed."""
        doc = self._document(text)
        self.docs[key] = doc
        self.docs.move_to_end(key)
        self._checked[key] = doc.version  # a full tokenization: nothing to verify yet
        return doc

    def _document(self, text: str) -> Document:
        """A Document of `text` with this cache's model, head and options (no cache until needed)."""
        return Document(self.model, self.tokenizer, text, head=self.head, options=self.options,
                        line_local=self.line_local)

    def get(self, key: str) -> Document:
        """The open document `key` (UnknownDocument if it isn't)."""
        try:
            return self.docs[key]
        except KeyError:
            raise UnknownDocument(key) from None

    def change(self, key: str, rng: Range | None, text: str, encoding: str = "utf-16") -> TokenEdit | None:
        """Apply one content change to an open document; the token edit it made (None: no change)."""
        return self.get(key).apply_change(rng, text, encoding)

    def close(self, key: str) -> None:
        """Forget a document and its cache."""
        self.docs.pop(key, None)
        self._checked.pop(key, None)

    def verify_tokens(self) -> tuple[int, list[str]]:
        """Idle work: cross-check one document changed since its last check (most recently used
        first) against a full tokenization; a mismatch reopens it from its text, in place.
        Returns (documents checked: 0 or 1, the keys reopened)."""
        for key in reversed(self.docs):
            doc = self.docs[key]
            if self._checked.get(key) == doc.version:
                continue
            fresh = self.tokenizer.encode_with_offsets(doc.text)
            self._checked[key] = doc.version
            if fresh.ids == doc.ids and [s for s, _ in fresh.offsets] == doc.tokens.starts.tolist():
                return 1, []
            self.token_repairs += 1
            log.warning("incremental tokens of %s differ from a full tokenization (%d vs %d tokens): reopened",
                        key, len(doc.ids), len(fresh.ids))
            reopened = self._document(doc.text)
            reopened.last_used = doc.last_used
            self.docs[key] = reopened  # (same place in the LRU order)
            self._checked[key] = reopened.version
            return 1, [key]
        return 0, []

    def prepare(self, key: str, upto: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Document, bool]:
        """Bring `key`'s cache up to date for its first `upto` tokens (None: all) and keep the
        total under budget; (the document, False if `should_stop` ended the encoding early)."""
        doc = self.get(key)
        self.docs.move_to_end(key)
        ready = doc.ensure_ready(upto, should_stop)
        self.enforce_budget(keep=key)
        return doc, ready

    def window(self, key: str, cursor: int, before: int, after: int) -> tuple[Document, int, int]:
        """A throwaway document over whole lines of `key` around `cursor` (a character offset): from
        the line `before` tokens back to the line `after` tokens on, for requests that cannot wait
        for the whole text before the cursor to be encoded; (it, the offset of its first character
        in `key`'s text, its first line). Not one of `docs`: its cache goes with it."""
        doc = self.get(key)
        text, starts = doc.text, doc.tokens.starts
        at = doc.tokens.first_token_at_or_after(cursor)
        lines = line_starts(text)
        first = bisect.bisect_right(lines, int(starts[at - before]) if at - before > 0 else 0) - 1
        far = int(starts[at + after]) if at + after < len(starts) else len(text)
        last = bisect.bisect_right(lines, max(far, cursor)) - 1
        lo, hi = lines[first], (lines[last + 1] if last + 1 < len(lines) else len(text))
        return self._document(text[lo:hi]), lo, first

    def total_kv_bytes(self) -> int:
        """The documents' KV bytes plus what `reserved` holds outside them."""
        return sum(doc.kv_bytes() for doc in self.docs.values()) + self.reserved()

    def enforce_budget(self, keep: str | None = None) -> None:
        """Drop least recently used caches until the total fits the budget."""
        if self.budget_bytes is None:
            return
        for key, doc in list(self.docs.items()):
            if self.total_kv_bytes() <= self.budget_bytes:
                return
            if key != keep and doc.is_encoded:
                doc.drop_kv()
                self.evictions += 1

    def reclaim(self, keep: KVCache | None = None) -> bool:
        """Drop the least recently used document's KV whose cache is a region of a KV pool, other
        than `keep` and never the most recently used document's (the one a request is being
        served for: its views may be taking scratch buffers); whether one was dropped. The pool
        calls it when a region can't fit (engine/kv_pool.py: `KVPool.reclaim`), so that a document
        fits the pool after an eviction instead of leaving it for a buffer of its own."""
        for doc in list(self.docs.values())[:-1]:  # least recently used first
            cache = doc.cache
            if cache is not None and cache is not keep and cache.pool is not None and doc.is_encoded:
                doc.drop_kv()
                self.evictions += 1
                return True
        return False

    def refresh_idle(self, max_tokens: int, should_stop: Callable[[], bool] | None = None) -> int:
        """Background work, up to `max_tokens` tokens (in chunks that poll `should_stop`): first
        the tokens of the most recently used document that have no keys yet, then its stale
        ones, then other documents'. Returns how many tokens were encoded (0: nothing to do)."""
        docs = sorted((d for d in self.docs.values() if d.cache is not None), key=lambda d: -d.last_used)
        for doc in docs:
            if doc.num_unencoded:
                doc.ensure_encoded_without_refresh()  # pending edits first
                done = doc.extend(max_tokens, should_stop)
                self.enforce_budget()
                if done or (should_stop is not None and should_stop()):
                    return done
        for doc in docs:
            if doc.pending_edits or doc.num_stale:
                before = doc.stats.tokens_encoded
                doc.refresh(max_tokens=max_tokens, should_stop=should_stop)  # repairs pending edits first
                self.enforce_budget()  # a repair may have grown the cache
                return doc.stats.tokens_encoded - before
        return 0

    def urgent_work(self) -> bool:
        """Whether background work should start without waiting for the editor to go idle: a
        document has tokens with no keys, or more stale tokens than the options' `stale_budget`."""
        budget = self.options.stale_budget
        return any(d.cache is not None and (d.num_unencoded or (budget is not None and d.num_stale > budget))
                   for d in self.docs.values())

    def set_options(self, options: DocumentOptions, budget_bytes: int | None) -> None:
        """New settings apply to every document from its next repair on (a new cache mode drops
        the caches: the modes lay slots out differently)."""
        self.options = options
        self.budget_bytes = budget_bytes
        for doc in self.docs.values():
            if doc.options.mode != options.mode:
                doc.drop_kv()
            doc.options = options
        self.enforce_budget()
