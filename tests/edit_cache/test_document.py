"""PIE repair and views on a CPU document (tiny random Llama model, real forward passes)."""

import random
from dataclasses import replace

import pytest
import torch
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.generate import prefill
from editkv.engine.healing import healer_for
from editkv.engine.prompting import fim_ids

BASE = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\r\n    y = [1, 2]  # é ✓\n" * 3
PIECES = ["x", " = ", "\n", "    ", "return ", "😀", "(1)", "\r\n", "\n\n", "def g():\n    pass\n", ""]


@pytest.fixture(scope="module")
def template():
    return Document.create_simulated(BASE)


def _doc(template, text=BASE, **options):
    return Document(template.model, template.tokenizer, text, head=template.head,
                    options=DocumentOptions(**options))


def _random_edit(doc, rng):
    text = doc.text
    a = rng.randint(0, len(text))
    b = min(len(text), a + rng.choice([0, 0, 1, 3, 8]))
    new = rng.choice(PIECES)
    start = to_position(text, a)
    end = to_position(text, b)
    doc.apply_change(Range(start, end), new)


def _fresh_keys(doc):
    ids = doc.head + doc.ids
    cache = doc.model.new_cache(len(ids))
    prefill(doc.model, ids, cache, logits="none")
    return cache


def _keys(doc):
    """The document's keys and values in text order, acting at their positions."""
    if doc.options.mode == "conflict":  # no gap: slots in text order, keys where they were left
        n = doc.h + len(doc.ids)
        return doc.cache.k[:, :, :, :n], doc.cache.v[:, :, :, :n]
    return doc.materialize()


def _layer0_error(doc):
    doc.ensure_ready()
    fresh = _fresh_keys(doc)
    n = doc.h + len(doc.ids)
    return (_keys(doc)[0][0] - fresh.k[0, :, :, :n]).abs().max().item()


def test_layer0_keys_equal_fresh_prefill_after_edits(template):
    doc = _doc(template)
    doc.ensure_ready()
    rng = random.Random(0)
    for step in range(30):
        for _ in range(rng.randint(1, 4)):  # several pending edits per repair
            _random_edit(doc, rng)
        assert _layer0_error(doc) < 1e-5, step
        assert doc.positions().tolist() == list(range(doc.h + len(doc.ids)))


def test_rotation_error_does_not_accumulate_over_1000_edits(template):
    doc = _doc(template, BASE * 4)
    doc.ensure_ready()
    rng = random.Random(1)
    for _ in range(1000):
        _random_edit(doc, rng)
        doc.repair()
    assert doc.stats.edits >= 900
    assert _layer0_error(doc) < 1e-5


def test_conflict_mode_keeps_stale_positions_and_wrong_keys(template):
    doc = _doc(template, mode="conflict")
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 5), to_position(doc.text, 5)), "abc = 1\n")
    assert _layer0_error(doc) > 1e-3  # suffix keys rotated for their old positions
    assert doc.positions().tolist() != list(range(doc.h + len(doc.ids)))


def test_prefix_reuse_reencodes_from_the_first_change(template):
    doc = _doc(template, mode="prefix_reuse")
    doc.ensure_ready()
    before = doc.stats.tokens_encoded
    doc.apply_change(Range(to_position(doc.text, 20), to_position(doc.text, 20)), "z")
    doc.ensure_ready()
    first_change = 5  # tokens before char 20 are few; everything after is re-encoded
    assert doc.stats.tokens_encoded - before >= len(doc.ids) - 20 > first_change
    assert _layer0_error(doc) < 1e-5


def test_pie_encodes_only_the_new_tokens(template):
    doc = _doc(template)
    doc.ensure_ready()
    before = doc.stats.tokens_encoded
    doc.apply_change(Range(to_position(doc.text, 30), to_position(doc.text, 30)), "q")
    doc.ensure_ready()
    assert 0 < doc.stats.tokens_encoded - before <= 4
    assert doc.num_stale > 0


def test_refresh_window_and_stale_budget(template):
    doc = _doc(template, refresh_window=8)
    doc.ensure_ready()
    before = doc.stats.tokens_encoded
    doc.apply_change(Range(to_position(doc.text, 30), to_position(doc.text, 30)), "q")
    doc.ensure_ready()
    assert doc.stats.tokens_encoded - before >= 8
    # a stale budget is for background work: a request's repair never re-encodes the stale tokens
    budget = _doc(template, stale_budget=5)
    budget.ensure_ready()
    before = budget.stats.tokens_encoded
    budget.apply_change(Range(to_position(budget.text, 3), to_position(budget.text, 3)), "q")
    budget.ensure_ready()
    assert budget.num_stale > 5 and budget.stats.refreshes == 0
    assert budget.stats.tokens_encoded - before <= 4
    stale = budget.num_stale
    assert budget.refresh() == stale and budget.num_stale == 0


def test_refresh_makes_the_cache_exact(template):
    doc = _doc(template)
    doc.ensure_ready()
    rng = random.Random(2)
    for _ in range(5):
        _random_edit(doc, rng)
    doc.ensure_ready()
    doc.refresh()
    fresh = _fresh_keys(doc)
    n = doc.h + len(doc.ids)
    k, v = _keys(doc)
    assert (k - fresh.k[:, :, :, :n]).abs().max() < 1e-4
    assert (v - fresh.v[:, :, :, :n]).abs().max() < 1e-4


def _exact_logits(doc, prompt):
    cache = doc.model.new_cache(len(prompt))
    return prefill(doc.model, prompt, cache)


@pytest.mark.parametrize("seed", range(6))
def test_views_stand_for_the_exact_prompt(template, seed):
    rng = random.Random(seed)
    doc = _doc(template)
    doc.ensure_ready()
    for _ in range(3):
        _random_edit(doc, rng)
    text = doc.text
    tok = doc.tokenizer
    healer = healer_for(tok)
    for cursor in [0, len(text), *(rng.randint(0, len(text)) for _ in range(4))]:
        prefix, heal = healer.split(tok.encode(text[:cursor]))
        view = left_to_right(doc, cursor)
        if prefix or not heal:  # an all-healed prefix re-encodes the head token instead
            assert view.prompt_ids == doc.head + prefix and view.heal == heal
        fim = fill_in_middle(doc, cursor)
        assert fim.heal == b""  # a FIM layout without a prefix tail is not healed (engine.prompting.fim_heals)
        assert fim.prompt_ids == (doc.head + tok.encode(text[:cursor]) + [tok.fim.suffix]
                                  + tok.encode(text[cursor:]) + [tok.fim.middle])
        nxt = fill_in_middle(doc, cursor, suffix="next_line")
        eol = text.find("\n", cursor)
        rest = "" if eol < 0 else text[eol + 1 :]
        if "\r" not in text[cursor : (eol if eol >= 0 else len(text))]:
            assert nxt.prompt_ids[-(len(tok.encode(rest)) + 1) :] == tok.encode(rest) + [tok.fim.middle]


def test_view_logits_match_exact_prefill_when_nothing_is_stale(template):
    doc = _doc(template)
    doc.ensure_ready()
    for cursor in (0, 17, 40, len(doc.text)):
        view = left_to_right(doc, cursor)
        assert (view.first_logits - _exact_logits(doc, view.prompt_ids)).abs().max() < 1e-4


def test_fim_view_error_is_bounded_and_decode_continues(template):
    doc = _doc(template)
    doc.ensure_ready()
    view = fill_in_middle(doc, 40)
    exact = _exact_logits(doc, view.prompt_ids)
    scale = exact.abs().max()
    # The suffix never saw <SUF>: close, not equal, on a random model.
    assert (view.first_logits - exact).abs().max() < 0.5 * scale
    out = view.decode()
    assert out.stats.decode_tokens == len(out.ids)


def test_fim_view_repeats_the_prefix_tail_when_the_model_asks(template):
    doc = _doc(template)
    doc.ensure_ready()
    tok = doc.tokenizer
    l2r_heal = left_to_right(doc, 40).heal
    plain = fill_in_middle(doc, 40, suffix="next_line")
    before = tok.fim
    tok.fim = replace(before, tail=5)
    try:
        view = fill_in_middle(doc, 40, suffix="next_line")
        # with a tail the cursor's token is healed, as in left-to-right; the plain layout is not
        assert plain.heal == b"" and view.heal == l2r_heal
        prefix = view.prompt_ids[doc.h:view.prompt_ids.index(tok.fim.suffix)]
        assert prefix == plain.prompt_ids[doc.h:doc.h + len(prefix)]
        suffix = plain.prompt_ids[plain.prompt_ids.index(tok.fim.suffix):]
        assert view.prompt_ids == doc.head + prefix + suffix + prefix[-5:]
        assert fim_ids(tok, doc.model.config, "ab\ncd", "ef")[-6:] == [tok.fim.middle] + tok.encode("ab\ncd")[-5:]
        exact = _exact_logits(doc, view.prompt_ids)
        assert (view.first_logits - exact).abs().max() < 0.5 * exact.abs().max()
        # the tail changes what the model sees last: the first logits are not the plain view's
        assert not torch.allclose(view.first_logits, plain.first_logits)
        out = view.decode()
        assert out.stats.decode_tokens == len(out.ids)
    finally:
        tok.fim = before


def test_fim_fresh_suffix_reencodes_the_suffix_start_after_the_marker(template):
    # re-encoded after the cursor's line each time (a kept window never saw the line: see
    # tests/edit_cache/test_suffix_window.py), so the whole suffix fresh is the exact prompt
    doc = _doc(template, fim_suffix_cache=False)
    doc.ensure_ready()
    cursor = 40
    cached = fill_in_middle(doc, cursor, suffix="next_line")
    exact = _exact_logits(doc, cached.prompt_ids)
    gap = (cached.first_logits - exact).abs().max()
    assert gap > 1e-3  # suffix keys cached without <SUF>: close, not equal
    doc.options.fim_fresh_suffix = 8
    some = fill_in_middle(doc, cursor, suffix="next_line")
    assert some.prompt_ids == cached.prompt_ids and some.encoded_tokens == cached.encoded_tokens + 8
    doc.options.fim_fresh_suffix = len(doc.ids)  # the whole suffix fresh: the exact prompt
    whole = fill_in_middle(doc, cursor, suffix="next_line")
    assert whole.prompt_ids == cached.prompt_ids
    assert (whole.first_logits - exact).abs().max() < 1e-4


def test_views_do_not_mutate_the_document_cache(template):
    doc = _doc(template)
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 50), to_position(doc.text, 50)), "z = 2\n")
    doc.ensure_ready()  # a gap in the middle of the document
    assert 0 < doc.gap_at < len(doc.ids) and doc.gap
    used = doc.end_slot
    k, v = doc.cache.k[:, :, :, :used].clone(), doc.cache.v[:, :, :, :used].clone()
    for make in (left_to_right, fill_in_middle):
        for cursor in (30, len(doc.text) - 3):  # before and after the gap
            view = make(doc, cursor)  # each built just before it decodes: views share the scratch slots
            view.decode()
            # the scratch is a window of spare slots after the document's last one (and after
            # the slots a FIM view keeps its suffix window in, views.SuffixWindow)
            assert view.scratch.base is doc.cache and view.scratch.offset == doc.scratch_start >= used
    assert torch.equal(k, doc.cache.k[:, :, :, :used]) and torch.equal(v, doc.cache.v[:, :, :, :used])


def test_empty_document(template):
    doc = _doc(template, text="")
    view = left_to_right(doc, 0)
    assert view.prompt_ids == doc.head
    doc.apply_change(None, "x = 1\n")
    assert left_to_right(doc, 6).prompt_ids == doc.head + doc.tokenizer.encode("x = 1\n")


def test_healing_drops_the_cursor_token_and_spells_it_again(template):
    doc = _doc(template, text="def f(x):\n    return x\n\n    ")
    view = left_to_right(doc, len(doc.text))
    heal = view.heal.decode()
    assert heal and heal.strip() == "" and "    ".endswith(heal)
    out = view.decode()
    # the generated ids spell the healed indentation first; the text returned leaves it out
    spelled = doc.tokenizer.decode(out.ids)
    assert spelled.startswith(heal)
    assert out.text == spelled[len(heal):].split("\n")[0]


def test_refresh_near_cursor_reencodes_only_the_stale_tokens_before_the_cursor(template):
    doc = _doc(template)
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 2), to_position(doc.text, 2)), "ab")  # above everything
    doc.ensure_ready()
    cursor = len(doc.text) - 5
    t = doc.tokens.first_token_at_or_after(cursor)
    assert doc.stale[:t].sum() > 20  # every token after the edit is stale
    stale = left_to_right(doc, cursor)
    exact = _exact_logits(doc, stale.prompt_ids)
    assert (stale.first_logits - exact).abs().max() > 1e-3
    doc.options.refresh_near_cursor = 16
    before = doc.stats.tokens_encoded
    near = left_to_right(doc, cursor)
    assert near.prompt_ids == stale.prompt_ids
    assert doc.stats.tokens_encoded - before == 16  # the 16 tokens before the cursor's cached prefix
    used = near.cached_tokens - doc.h
    # re-encoded once: still stale (they attended to the stale tokens before them, so they are not
    # exact; the background refresh redoes them), but the next view does not encode them again
    assert doc.redone[used - 16 : used].all() and doc.stale[used - 16 : used].all()
    again = doc.stats.tokens_encoded
    assert left_to_right(doc, cursor).prompt_ids == stale.prompt_ids and doc.stats.tokens_encoded == again
    doc.options.refresh_near_cursor = len(doc.ids)  # everything before the cursor: the exact prompt
    whole = left_to_right(doc, cursor)
    assert (whole.first_logits - exact).abs().max() < 1e-4
    before = doc.stats.tokens_encoded
    fill_in_middle(doc, cursor)  # nothing stale is left before the cursor: nothing to re-encode
    assert doc.stats.tokens_encoded == before


def test_model_tuned_options_come_from_the_user_then_the_model_then_the_recommendation():
    from editkv.edit_cache.document import RECOMMENDED

    base = DocumentOptions(mode="pie", stale_budget=7)
    assert base.tuned({}).fim_fresh_suffix == RECOMMENDED["fim_fresh_suffix"]
    assert base.tuned({"fim_fresh_suffix": 0}).fim_fresh_suffix == 0
    chosen = base.tuned({"fim_fresh_suffix": 0}, fim_fresh_suffix=16, refresh_near_cursor=None)
    assert chosen.fim_fresh_suffix == 16 and chosen.refresh_near_cursor == RECOMMENDED["refresh_near_cursor"]
    assert chosen.stale_budget == 7 and chosen.mode == "pie"
    with pytest.raises(ValueError, match="fim_fresh_sufix"):
        base.tuned({"fim_fresh_sufix": 3})


def test_a_view_refuses_to_decode_once_its_scratch_or_cache_moved_on(template):
    from editkv.edit_cache.views import StaleView

    doc = _doc(template)
    doc.ensure_ready()
    older = left_to_right(doc, 30)
    expected = older.decode().ids
    newer = fill_in_middle(doc, 30)  # takes the same scratch slots
    with pytest.raises(StaleView):
        older.decode()
    with pytest.raises(StaleView):
        older.state()
    newer.decode()
    again = left_to_right(doc, 30)
    assert again.decode().ids == expected and again.decode().ids == expected  # decodes may repeat
    doc.apply_change(Range(to_position(doc.text, 2), to_position(doc.text, 2)), "z")
    doc.ensure_ready()  # the repair moves slots
    with pytest.raises(StaleView):
        again.decode()


# ---- the gap buffer and front-to-back encoding ------------------------------------------------


def _all_error(doc):
    """Largest difference of every layer's keys and values from a fresh prefill of the text."""
    fresh = _fresh_keys(doc)
    n = doc.h + len(doc.ids)
    k, v = _keys(doc)
    assert k.shape[3] == n, "every token must have keys"
    return max((k - fresh.k[:, :, :, :n]).abs().max().item(), (v - fresh.v[:, :, :, :n]).abs().max().item())


def test_typing_at_one_place_moves_nothing_and_encodes_the_typed_tokens_only(template):
    doc = _doc(template, BASE * 12)
    doc.ensure_ready()
    at = 6 * len(BASE) + 7  # the middle of the document
    doc.apply_change(Range(to_position(doc.text, at), to_position(doc.text, at)), "\n")
    doc.ensure_ready()
    moved, encoded = doc.stats.slots_moved, doc.stats.tokens_encoded
    for i, ch in enumerate("value = compute(x, y) + 1"):
        pos = at + 1 + i
        doc.apply_change(Range(to_position(doc.text, pos), to_position(doc.text, pos)), ch)
        doc.ensure_ready()
    typed = len("value = compute(x, y) + 1")
    after = len(doc.ids) - doc.gap_at
    # the gap was already there: nothing after it moved (a keystroke that merges into the token
    # before it moves that one token across the gap)
    assert doc.stats.slots_moved - moved <= typed < after // 4
    assert doc.stats.tokens_encoded - encoded <= 2 * typed
    assert doc.positions().tolist() == list(range(doc.h + len(doc.ids)))
    assert _layer0_error(doc) < 1e-5
    doc.refresh()
    assert _all_error(doc) < 1e-4


def test_views_on_both_sides_of_the_gap_stand_for_the_exact_prompt(template):
    doc = _doc(template, BASE * 2, fim_suffix_cache=False)  # the whole suffix fresh: exact
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 60), to_position(doc.text, 64)), "total = 0\n")
    doc.refresh()  # nothing stale: every view must be exact
    assert 0 < doc.gap_at < len(doc.ids) and doc.gap
    for cursor in (10, 61, 75, len(doc.text) // 2, len(doc.text)):
        view = left_to_right(doc, cursor)
        assert (view.first_logits - _exact_logits(doc, view.prompt_ids)).abs().max() < 1e-4, cursor
        doc.options.fim_fresh_suffix = 0
        fim = fill_in_middle(doc, cursor, suffix="next_line")
        exact = _exact_logits(doc, fim.prompt_ids)
        assert (fim.first_logits - exact).abs().max() < 0.5 * exact.abs().max(), cursor  # suffix w/o <SUF>
        doc.options.fim_fresh_suffix = len(doc.ids)
        whole = fill_in_middle(doc, cursor, suffix="next_line")
        assert whole.prompt_ids == fim.prompt_ids
        assert (whole.first_logits - exact).abs().max() < 1e-4, cursor
        out = whole.decode()
        assert out.stats.decode_tokens == len(out.ids)
    doc.options.fim_fresh_suffix = 0


def test_a_request_encodes_the_text_before_the_cursor_and_the_rest_comes_later(template):
    text = BASE * 4
    doc = _doc(template, text)
    cursor = len(BASE) + 20
    view = left_to_right(doc, cursor)
    needed = doc.tokens.first_token_at_or_after(cursor)
    assert doc.frontier <= needed < len(doc.ids) and doc.num_unencoded > 0
    full = _doc(template, text)
    full.ensure_ready()
    assert (view.first_logits - left_to_right(full, cursor).first_logits).abs().max() < 1e-5
    # a FIM view of the server's path uses the suffix as far as it has keys
    part = fill_in_middle(doc, cursor, whole_suffix=False)
    assert len(part.prompt_ids) < len(fill_in_middle(full, cursor).prompt_ids)
    # background work: a stop flag ends it between chunks, what was done stays
    calls = []
    assert doc.extend(10_000, should_stop=lambda: len(calls) > 1 or calls.append(1)) > 0
    assert doc.num_unencoded > 0
    while doc.extend(64, should_stop=lambda: False):
        pass
    assert doc.num_unencoded == 0 and doc.gap_at <= needed  # the gap stayed by the cursor
    assert _all_error(doc) < 1e-4


def test_a_stopped_request_keeps_what_it_encoded():
    doc = Document.create_simulated(BASE * 6, options=DocumentOptions(prefill_chunk=16))
    polls = []
    assert not doc.ensure_ready(should_stop=lambda: len(polls) >= 3 or polls.append(1))
    assert 0 < doc.frontier < len(doc.ids)
    assert doc.ensure_ready()
    assert doc.num_unencoded == 0 and _all_error(doc) < 1e-4


def test_a_gap_that_fills_up_grows_and_a_large_deletion_closes(template):
    from editkv.edit_cache.document import GAP_SLOTS

    doc = _doc(template, BASE * 2)
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 40), to_position(doc.text, 40)), "q")
    doc.ensure_ready()
    big = "def g(a, b):\n    return [a * i + b for i in range(10)]\n" * 20  # more tokens than the gap
    assert len(doc.tokenizer.encode(big)) > GAP_SLOTS
    doc.apply_change(Range(to_position(doc.text, 41), to_position(doc.text, 41)), big)
    doc.ensure_ready()
    assert _layer0_error(doc) < 1e-5
    doc.apply_change(Range(to_position(doc.text, 10), to_position(doc.text, 41 + len(big))), "")
    doc.ensure_ready()
    assert doc.gap <= max(4 * GAP_SLOTS, (doc.h + len(doc.ids)) // 2)
    assert doc.text == (BASE * 2)[:10] + (BASE * 2)[40:]
    doc.refresh()
    assert _all_error(doc) < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_random_edits_partial_encoding_and_background_work_keep_the_cache_exact(template, seed):
    """After any mix of edits, requests at random cursors, background encoding and a final
    refresh, every layer's keys and values equal a fresh prefill of the text."""
    rng = random.Random(seed)
    doc = _doc(template, BASE * 3)
    for _ in range(25):
        action = rng.random()
        if action < 0.55:
            for _ in range(rng.randint(1, 3)):
                _random_edit(doc, rng)
        elif action < 0.75:
            cursor = rng.randint(0, len(doc.text))
            view = (left_to_right if rng.random() < 0.5 else fill_in_middle)(doc, cursor)
            assert view is None or view.prompt_ids
        elif action < 0.9:
            doc.ensure_ready()
            doc.extend(rng.randint(1, 40))
        else:
            doc.refresh(max_tokens=rng.randint(1, 30))
        if doc.is_encoded and not doc.pending_edits:
            assert doc.positions().tolist() == list(range(doc.h + doc.frontier))
    doc.ensure_ready()
    doc.refresh()
    assert doc.num_unencoded == 0 and doc.num_stale == 0
    assert _all_error(doc) < 1e-4


def _exact_error(doc):
    fresh = _fresh_keys(doc)
    n = doc.h + len(doc.ids)
    k, v = _keys(doc)
    return max((k - fresh.k[:, :, :, :n]).abs().max().item(), (v - fresh.v[:, :, :, :n]).abs().max().item())


def test_a_deletion_before_new_tokens_makes_the_tokens_between_them_stale(template):
    """Found by tests/fuzz: a repair whose first change deleted tokens marked the cached tokens
    between it and the first new ones fresh, though they had attended to the deleted ones."""
    doc = _doc(template)
    doc.ensure_ready()
    lines = doc.text.split("\n")
    doc.apply_change(Range(to_position(doc.text, 0), to_position(doc.text, len(lines[0]) + 1)), "")  # line 0 goes
    at = doc.text.index("class A")
    doc.apply_change(Range(to_position(doc.text, at), to_position(doc.text, at)), "z = 2\n")
    doc.ensure_ready()
    assert doc.num_stale >= doc.tokens.first_token_at_or_after(at)  # everything after the deletion
    while doc.refresh():
        pass
    assert _exact_error(doc) < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_refreshing_in_chunks_makes_the_cache_exact(template, seed):
    """Tokens encoded after a stale token (new ones, near-cursor refreshes, background encoding)
    attended to stale keys: they stay stale, so chunked refreshes never skip them."""
    rng = random.Random(seed)
    doc = _doc(template, text=BASE * 2)
    doc.ensure_ready(upto=len(doc.ids) // 2)
    for _ in range(12):
        _random_edit(doc, rng)
        if rng.random() < 0.5:
            doc.ensure_ready(upto=rng.randint(0, len(doc.ids)))
            doc.refresh_before(rng.randint(0, doc.frontier), 16)
        if rng.random() < 0.3:
            doc.extend(rng.randint(1, 40))
        if rng.random() < 0.3:
            doc.refresh(max_tokens=rng.randint(1, 8))
    doc.ensure_ready()
    while doc.refresh(max_tokens=rng.randint(1, 5)):
        pass
    assert doc.num_stale == 0 and _exact_error(doc) < 1e-4


def test_new_tokens_after_stale_ones_are_stale_until_refreshed(template):
    """New tokens encoded after stale ones attended to stale keys: a refresh that stops right
    before them must not leave them out."""
    doc = _doc(template)
    doc.ensure_ready()
    doc.apply_change(Range(to_position(doc.text, 2), to_position(doc.text, 2)), "ab")  # all after it stale
    doc.ensure_ready()
    first = int(doc.stale.argmax())
    at = doc.text.index("class A")
    doc.apply_change(Range(to_position(doc.text, at), to_position(doc.text, at)), "z = 2\n")
    doc.ensure_ready()
    new_at = doc.tokens.first_token_at_or_after(at)
    assert doc.stale[new_at : new_at + 3].all()
    assert doc.refresh(max_tokens=new_at - first) == new_at - first  # up to the new tokens, exactly
    while doc.refresh():
        pass
    assert _exact_error(doc) < 1e-4


def test_conflict_mode_encodes_text_added_after_a_stopped_encoding(template):
    """Found by tests/fuzz: in "conflict" mode the table of slot positions was sized when the
    cache was allocated, so tokens encoded later (the rest of a text that grew meanwhile) fell
    outside it and the next repair failed."""
    doc = _doc(template, text=BASE * 2, mode="conflict")
    calls = []
    assert not doc.ensure_ready(should_stop=lambda: len(calls) > 1 or calls.append(1))  # stopped part way
    end = to_position(doc.text, len(doc.text))
    doc.apply_change(Range(end, end), "y = 1\n" * 10)
    doc.extend(10_000)
    assert doc.num_unencoded == 0
    doc.apply_change(Range(to_position(doc.text, 0), to_position(doc.text, 0)), "z")
    doc.ensure_ready()
    assert len(doc.positions()) == doc.h + len(doc.ids) and _layer0_error(doc) > 0  # stale positions, by design
