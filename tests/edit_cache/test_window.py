"""Texts longer than the model's context: attention reaches back at most the context size,
with the document start moved in front as a sink (engine.generate.windowed), in every forward
of prefill, repair, refresh, views and decoding."""

import random
from dataclasses import replace

import pytest
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.generate import StopRules, prefill, windowed
from editkv.engine.model import KVCache, Span

CONTEXT = 96
LINE = "def f(x):\n    return x + 1\n"


def _cache(slots=64):
    from editkv.engine.config import ModelConfig

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=1, num_kv_heads=1)
    return KVCache.allocate(config, slots)


def test_windowed_drops_old_keys_and_moves_the_sink_before_the_rest():
    cache, other = _cache(), _cache()
    spans = [Span(cache, 0, 40), Span(other, 0, 10, 50)]  # positions 0..39 and 50..59
    assert windowed(spans, 0, (cache, 1)) == spans  # everything is after keep_from
    assert windowed(spans, 1, (cache, 1)) == spans  # only the sink itself would go
    kept = windowed(spans, 30, (cache, 1))
    assert kept == [Span(cache, 0, 1, 29), Span(cache, 30, 40), Span(other, 0, 10, 50)]
    assert windowed(spans, 55, (cache, 1)) == [Span(cache, 0, 1, 54), Span(other, 5, 10, 50)]
    assert windowed(spans, 30, None) == [Span(cache, 30, 40), Span(other, 0, 10, 50)]


@pytest.fixture()
def long_doc():
    doc = Document.create_simulated(LINE * 30)  # ~300 tokens, 3x the context below
    doc.model.model.config = replace(doc.model.config, max_position_embeddings=CONTEXT)
    return doc


def _record_reach(doc, reach):
    """Wrap the model so every (eager) forward notes how far back its queries attend into the document."""
    model = doc.model.model
    inner = model.forward

    def forward(ids, positions, *args, context=(), groups=None, **kw):
        # a document cache slot's position is its index plus its span's shift; scratch
        # (a view's own tokens) holds positions after the cursor, never the farthest key.
        # Token groups (several prefill chunks in one forward) each see their own spans.
        first = 0
        for count, spans in ([(g.count, g.context) for g in groups] if groups else [(positions.shape[-1], context)]):
            keys = [p for s in spans if s.end > s.start and s.cache is doc.cache
                    for p in (s.start + s.shift, s.end - 1 + s.shift)]
            if keys:
                reach.append(int(positions[..., first : first + count].max()) - min(keys))
            first += count
        return inner(ids, positions, *args, context=context, groups=groups, **kw)

    model.forward = forward


def test_no_forward_attends_further_back_than_the_context(long_doc):
    doc = long_doc
    reach = []
    _record_reach(doc, reach)
    doc.ensure_ready()
    assert len(doc.ids) > 2 * CONTEXT
    rng = random.Random(0)
    for _ in range(5):
        at = rng.randrange(len(doc.text))
        pos = to_position(doc.text, at)
        doc.apply_change(Range(pos, pos), "y = 2\n")
    doc.ensure_ready()
    doc.refresh()
    rules = StopRules(max_tokens=8)  # what the views were built for: their window plans for 8 new tokens
    for cursor in (10, len(doc.text) // 2, len(doc.text) - 5):
        left_to_right(doc, cursor, max_new_tokens=8).decode(rules=rules)
        fill_in_middle(doc, cursor, suffix="next_line", max_new_tokens=8).decode(rules=rules)
    assert reach and max(reach) < CONTEXT + doc.h  # the sink sits right before the window
    assert max(reach) >= CONTEXT - 1  # and the window is used, not just a few keys


def test_long_document_views_match_a_windowed_fresh_prefill(long_doc):
    """A windowed document cache (nothing stale) gives the logits of a fresh prefill of the same
    prompt under the same window: the window is a property of the text, not of the path."""
    doc = long_doc
    doc.ensure_ready()
    cursor = len(doc.text) - 3
    view = left_to_right(doc, cursor, max_new_tokens=8)
    ids = view.prompt_ids
    cache = doc.model.new_cache(len(ids) + 64)
    want = prefill(doc.model, ids, cache, window=CONTEXT, sink=(cache, doc.h))
    # the view's first token may look back a little less far (it reserves room for decoding)
    assert (view.first_logits - want).abs().max() < 0.1 * want.abs().max()
    # without the window the same prompt attends far beyond the context: clearly different
    unbounded = prefill(doc.model, ids, doc.model.new_cache(len(ids)))
    assert (unbounded - want).abs().max() > (view.first_logits - want).abs().max()


def test_short_documents_are_not_affected(long_doc):
    doc = Document.create_simulated(LINE * 3)
    doc.ensure_ready()
    ids = left_to_right(doc, len(doc.text)).prompt_ids
    assert len(ids) < doc.context_size
    view = left_to_right(doc, len(doc.text))
    exact = prefill(doc.model, ids, doc.model.new_cache(len(ids)))
    assert (view.first_logits - exact).abs().max() < 1e-4


def test_a_gap_in_a_long_document_keeps_every_key_what_a_windowed_prefill_gives(long_doc):
    """Edits in the middle of a document 3x the context (the gap stays there), encoding in the
    background past the gap, then a refresh: every layer's keys and values equal a windowed
    fresh prefill of the text, wherever they sit."""
    doc = long_doc
    left_to_right(doc, len(doc.text) // 2, max_new_tokens=8).decode()  # encodes the first half
    assert doc.num_unencoded > 0
    at = len(doc.text) // 3
    for piece in ("z = 3\n", "w", "= [1, 2]\n"):
        pos = to_position(doc.text, at)
        doc.apply_change(Range(pos, pos), piece)
        at += len(piece)
        left_to_right(doc, at, max_new_tokens=4).decode()
    assert 0 < doc.gap_at < doc.frontier
    while doc.extend(40):
        pass
    doc.refresh()
    ids = doc.head + doc.ids
    cache = doc.model.new_cache(len(ids))
    prefill(doc.model, ids, cache, logits="none", window=CONTEXT, sink=(cache, doc.h))

    def error(d):
        k, v = d.materialize()
        return max((k - cache.k).abs().max().item(), (v - cache.v).abs().max().item())

    # a window is applied per prefill chunk (a chunk's first query sees a little less), so
    # encodings chunked differently differ a little: the same text encoded front to back in one
    # go, with no gap, is the yardstick; a key at a wrong position would be off by far more
    plain = Document(doc.model, doc.tokenizer, doc.text, head=doc.head)
    plain.ensure_ready()
    assert error(doc) <= 2 * error(plain) + 1e-4, (error(doc), error(plain))
    assert error(plain) < 0.1
