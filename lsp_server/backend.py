"""The seam between the language server and the model: documents in, drafts out.

The server talks to a `Backend` only, from its single engine worker thread: `open`,
`change`, `close` keep the backend's copy of each document in step with the editor;
`complete` builds a context view at a position and runs a decoding strategy. The server
never touches tensors. `ModelBackend` is the real one (edit_cache + engine);
`FakeBackend` answers instantly and deterministically, for protocol tests only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edit_cache.positions import Position, Range, to_offset

if TYPE_CHECKING:  # the model stack (torch) is imported when a ModelBackend is made, not before
    from edit_cache.document import DocumentOptions
    from engine.generate import DecodeStats, StopRules
    from engine.loading import LoadedModel


@dataclass(frozen=True)
class CompletionRequest:
    """One completion at a position of an open document."""

    uri: str
    line: int
    character: int
    encoding: str = "utf-16"
    max_tokens: int = 64
    max_lines: int | None = 1  # None: no line limit (multi-line policy "always")
    num_drafts: int = 1
    view: str = "auto"  # "auto" (the model's preferred view), "fim", "l2r"
    suffix: str = "next_line"  # FIM: "next_line" leaves the rest of the cursor's line out


@dataclass
class Draft:
    """One suggestion: its text and its mean token log-probability."""

    text: str
    score: float
    stop_reason: str = ""


@dataclass
class CompletionResult:
    """Drafts best first, with what producing them cost."""

    drafts: list[Draft]
    stats: dict = field(default_factory=dict)


class Backend(Protocol):
    """What the language server needs from a completion engine."""

    description: str

    def open(self, uri: str, text: str) -> None: ...

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str) -> None: ...

    def close(self, uri: str) -> None: ...

    def text(self, uri: str) -> str: ...

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool]) -> CompletionResult: ...


class ModelBackend:
    """Completions from a real model over PIE-repaired per-document caches."""

    def __init__(self, loaded: LoadedModel, *, budget_bytes: int | None = None,
                 options: DocumentOptions | None = None, recompute: bool = False) -> None:
        from edit_cache.manager import DocumentCache

        self.loaded = loaded
        self.cache = DocumentCache(loaded.model, loaded.tokenizer, loaded.config,
                                   budget_bytes=budget_bytes, options=options)
        self.description = f"{loaded.source} on {loaded.device}"
        self.recompute = recompute  # baseline: drop the document's KV before every request

    def configure(self, *, budget_bytes: int | None, options: DocumentOptions, recompute: bool = False) -> None:
        """New cache settings, applied from each document's next repair on."""
        self.cache.set_options(options, budget_bytes)
        self.recompute = recompute

    def drop_caches(self) -> None:
        """Forget every document's KV (after running out of memory); texts stay."""
        for doc in self.cache.docs.values():
            doc.drop_kv()

    def open(self, uri: str, text: str) -> None:
        self.cache.open(uri, text)

    def change(self, uri: str, changes: list[tuple[Range | None, str]], encoding: str = "utf-16") -> None:
        for rng, text in changes:
            self.cache.change(uri, rng, text, encoding)

    def close(self, uri: str) -> None:
        self.cache.close(uri)

    def text(self, uri: str) -> str:
        return self.cache.get(uri).text

    def complete(self, request: CompletionRequest, should_stop: Callable[[], bool] = lambda: False) -> CompletionResult:
        from edit_cache.views import fill_in_middle, left_to_right
        from engine.generate import DecodeStats, StopRules

        started = time.perf_counter()
        doc = self.cache.get(request.uri)
        cursor = to_offset(doc.text, Position(request.line, request.character), request.encoding)
        if self.recompute:
            doc.drop_kv()
        repair_ms_before = doc.stats.repair_ms
        doc = self.cache.prepare(request.uri)
        view_kind = self.loaded.preferred_view if request.view == "auto" else request.view
        use_fim = view_kind == "fim" and doc.tokenizer.fim is not None
        if use_fim:
            view = fill_in_middle(doc, cursor, suffix=request.suffix, max_new_tokens=request.max_tokens)
        else:
            view = left_to_right(doc, cursor, max_new_tokens=request.max_tokens)
        stats = DecodeStats()
        drafts: list[Draft] = []
        if view is not None:
            rules = StopRules(max_tokens=request.max_tokens, max_lines=request.max_lines, should_stop=should_stop)
            drafts = self._drafts(view, rules, request.num_drafts, stats)
        return CompletionResult(drafts, {
            "repair_ms": doc.stats.repair_ms - repair_ms_before,
            "view": "fim" if use_fim else "l2r",
            "view_ms": view.build_ms if view is not None else 0.0,
            "view_encoded_tokens": view.encoded_tokens if view is not None else 0,
            "decode_tokens": stats.decode_tokens,
            "forwards": stats.forwards,
            "total_ms": 1000 * (time.perf_counter() - started),
        })

    def _drafts(self, view, rules: StopRules, num_drafts: int, stats: DecodeStats) -> list[Draft]:
        """Greedy for one draft; for several, greedy continuations of the top first tokens."""
        if num_drafts <= 1:
            out = view.decode(rules=rules, stats=stats)
            return [Draft(out.text, out.logprob / max(len(out.ids), 1), out.stop_reason)]
        first = view.first_logits
        if view.heal:  # only first tokens that spell the healed text out again
            from engine.healing import healer_for

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


class FakeBackend:
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
        from edit_cache.positions import apply_change

        if uri not in self.texts:
            from edit_cache.manager import UnknownDocument  # imports torch: only on this error path

            raise UnknownDocument(uri)
        for rng, text in changes:
            self.texts[uri] = apply_change(self.texts[uri], rng, text, encoding)[0]

    def close(self, uri: str) -> None:
        self.texts.pop(uri, None)

    def text(self, uri: str) -> str:
        if uri not in self.texts:
            from edit_cache.manager import UnknownDocument  # imports torch: only on this error path

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
