"""A FIM view's re-encoded suffix window, kept between requests (views.SuffixWindow).

Two documents take the same edits and views: one keeps the window between views, the other
drops it before each view (the uncached path). Their views must agree (logits, prompts,
greedy drafts) while the first encodes fewer tokens per keystroke on the cursor's line.
"""

import pytest
import torch
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle, left_to_right

BASE = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\r\n    y = [1, 2]  # é ✓\n" * 3
WINDOW = 16


@pytest.fixture(scope="module")
def template():
    # three layers: a window's keys in layer 2 depend on the context's layer-1 keys, which
    # staleness changes (with two, its keys depend on layer 0 only, exact after any PIE repair)
    from editkv.engine.config import ModelConfig
    from editkv.engine.model import Transformer
    from editkv.engine.runner import ModelRunner

    doc = Document.create_simulated(BASE)
    config = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_layers=3, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    return Document(ModelRunner(Transformer(config).eval()), doc.tokenizer, BASE, head=doc.head)


def _pair(template, **options):
    def make():
        return Document(template.model, template.tokenizer, BASE, head=template.head,
                        options=DocumentOptions(**{"fim_fresh_suffix": WINDOW, "fim_suffix_cache": True, **options}))
    return make(), make()


def _insert(doc, at, text):
    p = to_position(doc.text, at)
    doc.apply_change(Range(p, p), text)


def _replace(doc, a, b, text):
    doc.apply_change(Range(to_position(doc.text, a), to_position(doc.text, b)), text)


def _views(cached, uncached, cursor, suffix="rest_of_line"):
    uncached.suffix_window = None  # the uncached path: the window is encoded again
    ref = fill_in_middle(uncached, cursor, suffix=suffix)
    view = fill_in_middle(cached, cursor, suffix=suffix)
    assert view.prompt_ids == ref.prompt_ids
    scale = ref.first_logits.abs().max()
    assert (view.first_logits - ref.first_logits).abs().max() <= 1e-5 * scale
    return view, ref


def test_cached_suffix_window_views_equal_the_uncached_path(template):
    cached, uncached = _pair(template)
    with torch.inference_mode():
        line = BASE.index("class A:") + len("class A:")  # the end of a line, mid-document
        cursor = line
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == 0 and view.encoded_tokens == ref.encoded_tokens
        saved = []
        # keystrokes on the cursor's line: the window is reused
        for ch in "  # ok":
            for doc in (cached, uncached):
                _insert(doc, cursor, ch)
            cursor += len(ch)
            view, ref = _views(cached, uncached, cursor)
            assert view.extra["suffix_window_reused"] == WINDOW
            saved.append(ref.encoded_tokens - view.encoded_tokens)
            assert view.cached_tokens == ref.cached_tokens + WINDOW
        assert saved == [WINDOW + 1] * len(saved)  # the window and its <SUF>, every keystroke
        assert torch.equal(torch.tensor(view.decode().ids), torch.tensor(ref.decode().ids))

        # an edit inside the window (a line below the cursor): encoded again
        below = cached.text.index("pass", cursor)
        for doc in (cached, uncached):
            _insert(doc, below, "z = 3; ")
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == 0

        # a left-to-right view in between leaves the window's slots alone
        left_to_right(cached, cursor).decode()
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == WINDOW

        # an edit above the cursor's line, same length: only the invalidation can tell
        above = cached.text.index("return x")
        for doc in (cached, uncached):
            _replace(doc, above + len("return "), above + len("return x"), "q")
        assert cached.suffix_window is None
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == 0
        for doc in (cached, uncached):
            _insert(doc, cursor, "!")
        cursor += 1
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == WINDOW

        # stale tokens before the cursor refreshed (background work): the window saw the old keys
        for doc in (cached, uncached):
            _insert(doc, 5, "yy")
        cursor += 2
        view, ref = _views(cached, uncached, cursor)
        for doc in (cached, uncached):
            doc.refresh()
        assert cached.suffix_window is None
        view, ref = _views(cached, uncached, cursor)
        for suffix in ("next_line", "rest_of_line"):  # another window, then the first again
            view, ref = _views(cached, uncached, cursor, suffix=suffix)
            assert view.extra["suffix_window_reused"] == 0
        assert torch.equal(torch.tensor(view.decode().ids), torch.tensor(ref.decode().ids))

        # the document's keys dropped (memory pressure): rebuilt, nothing stale reused
        for doc in (cached, uncached):
            doc.drop_kv()
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == 0


def test_random_keystrokes_and_edits_match_the_uncached_path(template):
    import random

    cached, uncached = _pair(template)
    rng = random.Random(3)
    cursor = BASE.index("y = [1") + 4
    reused = 0
    with torch.inference_mode():
        for _ in range(25):
            roll = rng.random()
            if roll < 0.6:  # type at the cursor
                ch = rng.choice(["x", " ", "1", "(", "ab"])
                for doc in (cached, uncached):
                    _insert(doc, cursor, ch)
                cursor += len(ch)
            else:  # an edit elsewhere (above, inside or past the window)
                a = rng.randint(0, len(cached.text) - 1)
                if abs(a - cursor) < 3:
                    continue
                b = min(len(cached.text), a + rng.choice([0, 1, 4]))
                if a < cursor < b + 1:
                    continue
                new = rng.choice(["q", "\n", " = 2", ""])
                for doc in (cached, uncached):
                    _replace(doc, a, b, new)
                if a < cursor:
                    cursor += len(new) - (b - a)
            view, ref = _views(cached, uncached, cursor)
            reused += view.extra["suffix_window_reused"]
            assert view.encoded_tokens == ref.encoded_tokens - (view.extra["suffix_window_reused"] and WINDOW + 1)
    assert reused >= 5 * WINDOW


def test_off_encodes_the_window_with_the_cursor_line(template):
    off, _ = _pair(template, fim_suffix_cache=False)
    cursor = BASE.index("class A:") + 3
    view = fill_in_middle(off, cursor)
    again = fill_in_middle(off, cursor)
    assert off.suffix_window is None
    assert view.extra["suffix_window_reused"] == again.extra["suffix_window_reused"] == 0
    assert again.encoded_tokens == view.encoded_tokens


def test_a_document_encoded_up_to_the_cursor_grows_into_the_window_slots(template):
    """The server's path: the text before the cursor encoded, the rest later (background
    `extend`). Typed tokens move the document's end past the window's first slots; encoding the
    rest writes there, which must drop the window."""
    cached, uncached = _pair(template)
    cursor = BASE.index("return x + 1") + len("return x + 1")
    with torch.inference_mode():
        for doc in (cached, uncached):
            doc.ensure_ready(upto=doc.tokens.first_token_at_or_after(cursor))
        view, ref = (fill_in_middle(d, cursor, whole_suffix=False) for d in (cached, uncached))
        for ch in " * 2":
            for doc in (cached, uncached):
                _insert(doc, cursor, ch)
                doc.ensure_ready(upto=doc.tokens.first_token_at_or_after(cursor + 1))
            cursor += 1
            uncached.suffix_window = None
            ref = fill_in_middle(uncached, cursor, whole_suffix=False)
            view = fill_in_middle(cached, cursor, whole_suffix=False)
            assert view.extra["suffix_window_reused"] == WINDOW
            assert (view.first_logits - ref.first_logits).abs().max() <= 1e-5 * ref.first_logits.abs().max()
        window = cached.suffix_window
        assert cached.end_slot > window.start  # grown into the window's slots, not written yet
        for doc in (cached, uncached):
            doc.extend(len(doc.ids))  # background: the rest of the document
        assert cached.suffix_window is None
        view, ref = _views(cached, uncached, cursor)
        assert view.extra["suffix_window_reused"] == 0
        assert torch.equal(torch.tensor(view.decode().ids), torch.tensor(ref.decode().ids))
