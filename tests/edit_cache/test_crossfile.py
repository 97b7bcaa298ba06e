"""Cross-file context blocks (edit_cache/crossfile.py) on a tiny random Llama model, CPU, fp32."""

from dataclasses import replace

import pytest
import torch
from editkv.edit_cache import views
from editkv.edit_cache.crossfile import (
    block_layout,
    build_block,
    choose_chunks,
    context_format,
    definition_units,
)
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import _split_prefix, fill_in_middle, left_to_right
from editkv.engine.generate import prefill
from editkv.engine.model import Transformer
from editkv.engine.runner import ModelRunner

HELPERS = (
    "import os\n\nLIMIT_VALUE = 10\n\n\ndef helper_alpha(x):\n    return x * 2\n\n\n"
    "def unused_thing(y):\n    return [y, y, y, y]\n\n\n"
    "class Point:\n    origin = 0\n\n    def __init__(self, x):\n        self.coord = x\n\n"
    "    def shifted(self, d):\n        return self.coord + d\n\n    def never_called(self):\n        pass\n"
)
SMALL = "def tiny_fn(a):\n    return a\n"
CURRENT = "from helpers import helper_alpha, Point\n\nvalue = helper_alpha(3)\np = Point(1)\nq = p.shifted(2)\n"


@pytest.fixture(scope="module")
def template():
    return Document.create_simulated("x = 1\n")


def _doc(template, text):
    doc = Document(template.model, template.tokenizer, text, head=template.head)
    doc.ensure_ready()
    return doc


def _docs(template, edit_helpers=True):
    helpers = _doc(template, HELPERS)
    if edit_helpers:  # a PIE-repaired document: a gap, spans acting at shifted positions
        text = helpers.text
        at = text.index("def unused_thing")
        helpers.apply_change(Range(to_position(text, at), to_position(text, at)), "# note\n")
        helpers.ensure_ready()
    return helpers, _doc(template, SMALL), _doc(template, CURRENT)


def _exact_cache(model, ids):
    cache = model.new_cache(len(ids) + 1)
    logits = prefill(model, ids, cache, logits="last")
    return cache, logits


def test_a_full_recompute_equals_an_exact_prefill_of_the_block(template):
    helpers, small, current = _docs(template)
    model, tok = current.model, current.tokenizer
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    layout = block_layout(tok, model.config, chunks, current.head, path="cur.py", style="plain")
    block = build_block(model, layout, recompute_ratio=1.0)
    assert block.reused_tokens == layout.reused_tokens > 0
    assert block.recomputed_tokens == block.length
    exact, _ = _exact_cache(model, layout.ids)
    n = block.length
    assert (block.cache.k[:, :, :, :n] - exact.k[:, :, :, :n]).abs().max() < 1e-4
    assert (block.cache.v[:, :, :, :n] - exact.v[:, :, :, :n]).abs().max() < 1e-4
    # the document's own tokens were cached without the block: a view is exact at its start only
    for cursor, exact_view in ((0, True), (len(current.text) - 3, False)):
        view = left_to_right(current, cursor, block=block)
        assert view.prompt_ids[:n] == layout.ids
        _, logits = _exact_cache(model, view.prompt_ids)
        assert ((view.first_logits - logits).abs().max() < 1e-4) == exact_view
        view.decode()


def test_a_full_recompute_over_the_document_too_is_exact_for_a_view(template):
    helpers, small, current = _docs(template)
    model, tok = current.model, current.tokenizer
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    for cursor in (45, len(current.text) - 3):
        cut = current.tokens.first_token_at_or_after(current.text.rindex("\n", 0, cursor) + 1)
        layout = block_layout(tok, model.config, chunks, current.head, style="plain", document=current,
                              document_tokens=cut)
        block = build_block(model, layout, recompute_ratio=1.0)
        assert block.reused_tokens == layout.reused_tokens == sum(c.num_tokens for c in chunks) + cut
        view = left_to_right(current, cursor, block=block)
        assert view.prompt_ids[: block.length] == layout.ids
        _, logits = _exact_cache(model, view.prompt_ids)
        assert (view.first_logits - logits).abs().max() < 1e-4
        # the cursor above the block's document tokens: the view takes a prefix of the block
        view = left_to_right(current, 3, block=block)
        _, logits = _exact_cache(model, view.prompt_ids)
        assert (view.first_logits - logits).abs().max() < 1e-4


def test_no_recompute_keeps_the_other_documents_keys_rerotated(template):
    helpers, small, current = _docs(template)
    model, tok = current.model, current.tokenizer
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    layout = block_layout(tok, model.config, chunks, current.head, path="cur.py", style="plain")
    block = build_block(model, layout, recompute_ratio=0.0)
    assert block.recomputed_tokens == block.length - block.reused_tokens  # the wrapper tokens only
    assert block.check_tokens == 0
    moved = 0
    for piece in layout.pieces:
        doc = piece.document
        k, v = doc.materialize()  # keys rotated to the positions they act at in their document
        n = piece.end - piece.start
        src = slice(doc.h + piece.start, doc.h + piece.end)
        delta = piece.at - (doc.h + piece.start)
        moved += delta != 0
        cos, sin = model.rotary.delta_cos_sin(delta)
        half = model.config.rotary_dim // 2
        want = k[:, :, :, src].clone()
        from editkv.kernels.rerotate import move_rerotate_ref

        move_rerotate_ref(want, v[:, :, :, src].clone(), 0, n, 0, cos[:half], sin[:half], model.config.rotary_dim)
        got_k = block.cache.k[:, :, :, piece.at: piece.at + n]
        assert (got_k - want).abs().max() < 1e-5
        assert torch.equal(block.cache.v[:, :, :, piece.at: piece.at + n], v[:, :, :, src])
        if delta:  # without the re-rotation they would differ
            assert (k[:, :, :, src] - want).abs().max() > 1e-3
    assert moved


def test_selective_recompute_counts_and_moves_toward_exact(template):
    # four layers: the check layer (1) leaves two that only the selected tokens go through
    torch.manual_seed(1)
    deep = ModelRunner(Transformer(replace(template.model.config, num_layers=4)).eval())
    deep_template = Document(deep, template.tokenizer, "", head=template.head)
    helpers, small, current = _docs(deep_template)
    model, tok = current.model, current.tokenizer
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    layout = block_layout(tok, model.config, chunks, current.head, path="cur.py", style="plain")
    exact, _ = _exact_cache(model, layout.ids)
    n = len(layout.ids)
    errors = []
    for ratio in (0.0, 0.5, 1.0):
        block = build_block(model, layout, recompute_ratio=ratio)
        fresh = n - layout.reused_tokens
        assert block.recomputed_tokens == fresh + round(ratio * layout.reused_tokens)
        last = model.config.num_layers - 1
        errors.append((block.cache.k[last, :, :, :n] - exact.k[last, :, :, :n]).norm().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_fim_view_with_a_block_puts_the_document_after_it(template):
    helpers, small, current = _docs(template, edit_helpers=False)
    model, tok = current.model, current.tokenizer
    chunks = choose_chunks(current.text, [("helpers.py", helpers)], budget=10_000)
    layout = block_layout(tok, model.config, chunks, current.head, style="plain")
    block = build_block(model, layout, recompute_ratio=1.0)
    view = fill_in_middle(current, 30, suffix="next_line", block=block)
    view.decode()
    _, logits = _exact_cache(model, view.prompt_ids)
    assert (view.first_logits - logits).abs().max() > 1e-4  # the suffix never saw <SUF> nor the block
    plain = fill_in_middle(current, 30, suffix="next_line")
    assert view.prompt_ids == layout.ids + plain.prompt_ids[current.h:]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("suffix", ["rest_of_line", "next_line"])
def test_fim_view_with_a_block_is_exact_when_nothing_is_cached_without_it(template, monkeypatch, graphs, suffix):
    # Issue 25: blend lost to no context in the FIM view. With the block recomputed in full, the
    # document's tokens before the cursor's line in it (blendall) and the whole suffix re-encoded
    # (fim_fresh_suffix), no key in the view was computed without the block: the view must equal an
    # exact prefill of [block + FIM prompt], so the view's positions, shifts and sink are right and
    # what blend loses in FIM is the document's cache never having seen the block.
    # `graphs`: the CUDA-graph branch (separate forwards for the view's head and middle, the gap moved).
    monkeypatch.setattr(views, "_graphs_on", lambda doc: graphs)
    helpers, small, _ = _docs(template)
    model, tok = helpers.model, helpers.tokenizer
    current = Document(model, tok, CURRENT, head=template.head, options=DocumentOptions(fim_fresh_suffix=10_000))
    current.ensure_ready()
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    for cursor in (3, 45, len(current.text) - 12):
        t, _ = _split_prefix(current, cursor)
        layout = block_layout(tok, model.config, chunks, current.head, style="plain", document=current,
                              document_tokens=t)
        block = build_block(model, layout, recompute_ratio=1.0)
        plain = fill_in_middle(current, cursor, suffix=suffix).prompt_ids
        view = fill_in_middle(current, cursor, suffix=suffix, block=block)
        assert view.prompt_ids == layout.ids + plain[current.h + t:]
        _, logits = _exact_cache(model, view.prompt_ids)
        assert (view.first_logits - logits).abs().max() < 1e-4, (cursor, suffix)
        # the generated tokens see the same keys at the same positions as after an exact prefill
        got = view.decode().ids
        cache = model.new_cache(len(view.prompt_ids) + len(got) + 1)
        prefill(model, view.prompt_ids + got, cache, logits="none")
        n = view.scratch_used + len(got) - 1  # the view's tokens, then the generated ones fed back
        start = len(view.prompt_ids) - view.scratch_used
        assert (view.scratch.k[:, :, :, :n] - cache.k[:, :, :, start: start + n]).abs().max() < 1e-4


def _long_current(template, fim_fresh_suffix):
    """(text, the current document: CURRENT and 30 lines more that use the helpers, the layout of
    the helpers' block without the document, the block recomputed in full)."""
    helpers, small, _ = _docs(template)
    model, tok = helpers.model, helpers.tokenizer
    text = CURRENT + "".join(f"r{i} = helper_alpha({i}) + Point({i}).x\n" for i in range(30))
    current = Document(model, tok, text, head=template.head, options=DocumentOptions(fim_fresh_suffix=fim_fresh_suffix))
    current.ensure_ready()
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    layout = block_layout(tok, model.config, chunks, current.head, style="plain")
    return text, current, layout, build_block(model, layout, recompute_ratio=1.0)


@pytest.mark.parametrize("graphs", [False, True])
def test_fim_view_with_a_block_re_encodes_the_documents_last_tokens_with_it(template, monkeypatch, graphs):
    # The cost blend paid in FIM: the document's tokens before the cursor were cached without the
    # block. A FIM view with a block re-encodes its last `block_fresh_prefix` of them with it: all
    # of them (and the whole suffix) re-encoded give an exact prefill of [block + FIM prompt]
    # without the document in the block (blend, not blendall); the default re-encodes 128.
    monkeypatch.setattr(views, "_graphs_on", lambda doc: graphs)
    text, current, layout, block = _long_current(template, 10_000)
    model = current.model
    for cursor in (45, text.index("r20 =") + 4, len(text) - 3):
        t, _ = _split_prefix(current, cursor)
        plain = fill_in_middle(current, cursor, suffix="next_line")
        whole = fill_in_middle(current, cursor, suffix="next_line", block=block, block_fresh_prefix=10**6)
        assert whole.prompt_ids == layout.ids + plain.prompt_ids[current.h:]
        _, logits = _exact_cache(model, whole.prompt_ids)
        assert (whole.first_logits - logits).abs().max() < 1e-4, cursor
        cached = fill_in_middle(current, cursor, suffix="next_line", block=block, block_fresh_prefix=0)
        default = fill_in_middle(current, cursor, suffix="next_line", block=block)
        assert cached.prompt_ids == default.prompt_ids == whole.prompt_ids
        assert whole.encoded_tokens - cached.encoded_tokens == t
        assert default.encoded_tokens - cached.encoded_tokens == min(t, views.BLOCK_FRESH_PREFIX)
        if t > 0:  # the cached prefix never saw the block: not the exact prefill's logits
            assert (cached.first_logits - logits).abs().max() > 1e-3, cursor
    assert t > views.BLOCK_FRESH_PREFIX


@pytest.mark.parametrize("graphs", [False, True])
def test_fim_view_with_a_block_can_leave_out_the_suffix_cached_without_it(template, monkeypatch, graphs):
    # `block_cached_suffix=0`: the suffix stops at its re-encoded window, so with the prefix
    # re-encoded too, no key of the view was computed without the block (exact prefill of the
    # shorter prompt); with the cached suffix kept, the view reads keys that never saw the block.
    monkeypatch.setattr(views, "_graphs_on", lambda doc: graphs)
    text, current, _, block = _long_current(template, 16)
    model = current.model
    for cursor in (45, text.index("r20 =") + 4):
        kept = fill_in_middle(current, cursor, suffix="next_line", block=block, block_fresh_prefix=10**6)
        cut = fill_in_middle(current, cursor, suffix="next_line", block=block, block_fresh_prefix=10**6,
                             block_cached_suffix=0)
        some = fill_in_middle(current, cursor, suffix="next_line", block=block, block_fresh_prefix=10**6,
                              block_cached_suffix=5)
        dropped = len(kept.prompt_ids) - len(cut.prompt_ids)
        assert dropped > 5 and len(kept.prompt_ids) - len(some.prompt_ids) == dropped - 5
        assert cut.encoded_tokens == kept.encoded_tokens  # the same tokens re-encoded, fewer read
        _, logits = _exact_cache(model, cut.prompt_ids)
        assert (cut.first_logits - logits).abs().max() < 1e-4, cursor
        _, logits = _exact_cache(model, kept.prompt_ids)
        assert (kept.first_logits - logits).abs().max() > 1e-3, cursor
        plain = fill_in_middle(current, cursor, suffix="next_line", block_cached_suffix=0)
        assert len(plain.prompt_ids) == len(kept.prompt_ids) - len(block.ids) + current.h  # (with a block only)


@pytest.mark.parametrize("graphs", [False, True])
def test_fim_view_with_a_block_moves_the_cached_suffix_by_the_blocks_shift(template, monkeypatch, graphs):
    # The suffix keys a FIM view reads from the document's cache (never re-encoded: no exact
    # prefill to compare with) act where they act without the block, moved by `block.shift`.
    monkeypatch.setattr(views, "_graphs_on", lambda doc: graphs)
    helpers, small, current = _docs(template)
    model, tok = current.model, current.tokenizer
    end = len(current.text) - 4  # a gap inside the suffix: its spans act at two shifts
    current.apply_change(Range(to_position(current.text, end), to_position(current.text, end)), "zz")
    current.ensure_ready()
    chunks = choose_chunks(current.text, [("helpers.py", helpers), ("small.py", small)], budget=10_000)
    for cursor, document in ((45, False), (45, True), (3, False)):
        t, _ = _split_prefix(current, cursor)
        layout = block_layout(tok, model.config, chunks, current.head, style="plain",
                              document=current if document else None, document_tokens=t if document else 0)
        block = build_block(model, layout, recompute_ratio=1.0)
        view = fill_in_middle(current, cursor, suffix="next_line", block=block)
        plain = fill_in_middle(current, cursor, suffix="next_line")

        def acting(v):  # document slots the view reads: (first, end) -> the position the first acts at
            return {(s.start, s.end): s.start + s.shift for s in v.context if s.cache is current.cache}

        got, want = acting(view), acting(plain)
        suffix = max(got)  # the suffix comes last in the document's slots (past a gap in it too)
        assert suffix in want and suffix[0] > current.h + t
        assert {k: want[k] + block.shift for k in got if k in want} == {k: got[k] for k in got if k in want}
        assert view.prompt_ids == layout.ids + plain.prompt_ids[current.h + block.document_tokens:]


def test_chunks_respect_the_budget_and_take_the_used_definitions(template):
    helpers, small, current = _docs(template, edit_helpers=False)
    sources = [("helpers.py", helpers), ("small.py", small)]
    whole = len(helpers.ids) + len(small.ids)
    assert [c.num_tokens for c in choose_chunks(current.text, sources, budget=whole, small_file_tokens=whole)] \
        == [len(helpers.ids), len(small.ids)]
    # by default a file is small up to an even share of the budget: the larger one gives its definitions
    assert [c.num_tokens < len(c.document.ids) for c in choose_chunks(current.text, sources, budget=whole)] \
        == [True, False]
    for budget in (0, 5, 20, 40, 80, whole - 1):
        chunks = choose_chunks(current.text, sources, budget=budget, small_file_tokens=len(small.ids))
        assert sum(c.num_tokens for c in chunks) <= budget
    chunks = choose_chunks(current.text, sources, budget=whole - 1, small_file_tokens=len(small.ids))
    text = "".join(helpers.tokenizer.decode(helpers.ids[a:b]) for a, b in chunks[0].ranges)
    assert "def helper_alpha" in text and "def shifted" in text and "class Point" in text
    assert "unused_thing" not in text and "never_called" not in text
    assert chunks[1].ranges == [(0, len(small.ids))]


def test_definition_units_split_classes_into_header_and_methods():
    units = definition_units(HELPERS)
    by_name = {n: u for u in units for n in u.names}
    assert HELPERS[slice(by_name["helper_alpha"].start, by_name["helper_alpha"].end)].startswith("def helper_alpha")
    assert by_name["coord"] is by_name["Point"]  # __init__ sets self.coord and stands for the class's call
    assert units[by_name["shifted"].needs].names == {"Point"}
    assert "LIMIT_VALUE" in by_name


def test_repo_format_for_models_with_repo_tokens(template):
    tok = template.tokenizer
    assert context_format(tok) == "plain"
    with pytest.raises(ValueError):
        block_layout(tok, template.model.config, [], template.head, style="nope")
