"""Warm-up at load: an editing session on made-up documents, so keystrokes never pay first-use costs.

Where a model's small forwards replay CUDA graphs, the first forward of each shape (tokens
written, rows of logits, 1024-slot attention bucket; engine/static_decode.py) captures its
graph: ~30-50 ms on the H100 with Qwen2.5-Coder-0.5B, and the first request after start-up
also compiles every Triton kernel it reaches (seconds). On the session-14 H100 replay these
were the tail: the first file's keystrokes waited up to 600 ms, and later ones 29-51 ms when a
repair hit a bucket no earlier request had used. Since every document's cache is a region of
one KV pool (engine/kv_pool.py), a graph serves every document of its shape, so they can all be
made once, before the server says it is ready.

`warm_up` makes them the way a user would: for each attention bucket from the smallest to
`max_bucket` it opens a generated Python file whose cache fills that bucket, asks for a
suggestion in its middle (the text before the cursor encoded in interruptible chunks, then the
rest as idle work), pastes and deletes blocks of 1, 2, 4, ... 256 tokens with a suggestion
after each (every repair width, every view part, decode chains and speculation), types one
character, asks for the dropdown (beam lanes or superposed steps), and closes the file. What it
leaves behind is only the graphs and compiled kernels: the made-up documents, their n-gram
index entries and the speculator's drafts and acceptance estimates are dropped (its measured
forward costs are kept), and the request counters start from zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from editkv.edit_cache.positions import Position, Range
from editkv.lsp_server.request import CompletionRequest

if TYPE_CHECKING:
    from editkv.lsp_server.backend import ModelBackend

URI = "editkv-warm-up:///bucket-{}.py"  # never an editor's: no client sees these documents
MAX_BUCKET = 16384  # slots: documents up to ~15k tokens find every graph they need ready
MAX_SECONDS = 60.0  # a slower device stops warming between buckets past this; the rest come on first use
EDGE = 1024  # slots a warm-up document leaves free below its bucket's top (gap, spare, pastes, scratch)


@dataclass
class WarmUpReport:
    """What a warm-up did: buckets in order, and what it cost."""

    buckets: list[int] = field(default_factory=list)
    requests: int = 0
    graphs: int = 0  # graphs captured (keys taken, in the static mode)
    ms: float = 0.0
    stopped: bool = False  # `should_stop` ended it early

    def as_dict(self) -> dict:
        return {"buckets": self.buckets, "requests": self.requests, "graphs": self.graphs,
                "ms": round(self.ms, 1), "stopped": self.stopped}


def source_text(tokenizer, tokens: int) -> str:
    """Python source of about `tokens` tokens (functions that differ in their names and numbers)."""
    def block(i: int) -> str:
        return (f"def step_{i}(values, limit={i % 7 + 2}):\n"
                f"    total = {i}\n"
                f"    for value in values[:limit]:\n"
                f"        if value > {i * 3 % 11}:\n"
                f"            total += value * {i % 5 + 1}\n"
                f"    return total\n\n\n")

    sample = "".join(block(i) for i in range(8))
    per_block = max(1, len(tokenizer.encode(sample)) // 8)
    return "".join(block(i) for i in range(max(1, tokens // per_block)))


def paste_text(tokenizer, tokens: int) -> str:
    """A line of code of at most `tokens` tokens on its own, as many as its pattern allows."""
    if tokens <= 1:
        return "x"

    def line(terms: int) -> str:
        return "\n    total += " + " + ".join(f"v{j}" for j in range(terms))

    def words(terms: int) -> str:  # (for counts shorter than the line's least)
        return "x" + " x" * (terms - 1)

    text = line if len(tokenizer.encode(line(1))) <= tokens else words
    lo, hi = 1, tokens  # the most terms whose text fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tokenizer.encode(text(mid))) <= tokens else (lo, mid - 1)
    return text(lo)


def shapes(max_width: int) -> list[tuple[int, str]]:
    """(width, rows) of the forwards requests make: repairs and encoding chunks (no logits), views
    (the last row's), verifications and beam steps (every row's, at most 16 tokens wide)."""
    out, width = [], 1
    while width <= max_width:
        out += [(width, "none"), (width, "all" if width == 1 else "last")]
        if 1 < width <= 16:
            out.append((width, "all"))
        width *= 2
    return out


def buckets(backend: ModelBackend, max_bucket: int) -> list[int]:
    """The attention buckets worth warming: 1024 slots, doubling, up to `max_bucket` and half the KV
    pool. Not capped by the model's context: a bucket counts the slots a forward reaches in its
    document's region, and a file longer than the context, though it attends to a window of it,
    reaches past it (capped at the default model's 4,096-token context, buckets 8,192 and 16,384
    went unwarmed, and an 8k-token file took their graphs on first use)."""
    static = backend.loaded.runner.static
    top = max_bucket
    pool = backend.loaded.runner.kv_pool
    if pool is not None:
        top = min(top, pool.slots // 2)
    out, b = [], static.bucket
    while b <= top:
        out.append(b)
        b *= 2
    return out


def warm_up(backend: ModelBackend, *, view: str = "auto", num_drafts: int = 3, max_tokens: int = 64,
            max_bucket: int = MAX_BUCKET, max_seconds: float = MAX_SECONDS,
            should_stop: Callable[[], bool] = lambda: False) -> WarmUpReport:
    """Capture the graphs (and compile the kernels) a served session uses, see the module docstring."""
    from editkv.engine.decoding.speculative import Speculator

    report = WarmUpReport()
    static = backend.loaded.runner.static
    if static is None or static.mode == "off":
        return report
    started, captures = time.perf_counter(), static.captures
    tokenizer = backend.loaded.tokenizer
    opened: list[str] = []

    def complete(uri: str, line: int, character: int, drafts: int = 1) -> None:
        backend.complete(CompletionRequest(uri, line, character, max_tokens=max_tokens, max_lines=None,
                                           num_drafts=drafts, view=view))
        report.requests += 1

    try:
        for bucket in buckets(backend, max_bucket):
            if should_stop() or time.perf_counter() - started >= max_seconds:
                report.stopped = True
                break
            pool = backend.loaded.runner.kv_pool
            if pool is not None:  # every forward shape of this bucket, over the pool every document shares
                for width, rows in shapes(static.max_width):
                    static.capture_shape(pool.buffer, bucket, width, rows)
            uri = URI.format(bucket)
            text = source_text(tokenizer, max(64, bucket - EDGE) if bucket > EDGE else 64)
            backend.open(uri, text)
            opened.append(uri)
            lines = text.split("\n")
            line = len(lines) // 2
            while line > 0 and not lines[line].startswith("    total = "):
                line -= 1
            end = Position(line, len(lines[line]))
            complete(uri, line, end.character)
            while backend.refresh_idle(256, lambda: False):  # the rest of the file, as idle work encodes it
                pass
            for width in (w for w, rows in shapes(static.max_width) if rows == "none"):  # every repair width
                paste = paste_text(tokenizer, width // 2 + 1 if width > 1 else 1)
                backend.change(uri, [(Range(end, end), paste)], "utf-32")
                pasted = paste.split("\n")
                after = Position(line + len(pasted) - 1, (end.character if len(pasted) == 1 else 0) + len(pasted[-1]))
                complete(uri, after.line, after.character)
                backend.change(uri, [(Range(end, after), "")], "utf-32")
            backend.change(uri, [(Range(end, end), "\n    ")], "utf-32")  # Enter and its indent
            complete(uri, line + 1, 4, drafts=max(1, num_drafts))
            complete(uri, line + 1, 4)
            report.buckets.append(bucket)
            backend.close(uri)
            opened.remove(uri)
    finally:
        for uri in opened:
            backend.close(uri)
        # the made-up files' drafts and acceptance are no user's; the forwards' measured costs are kept
        fresh = Speculator(backend.speculator.config)
        fresh.cost = backend.speculator.cost
        backend.speculator = fresh
        backend.encoded_tokens = 0
        report.graphs = static.captures - captures
        report.ms = 1000 * (time.perf_counter() - started)
    return report
