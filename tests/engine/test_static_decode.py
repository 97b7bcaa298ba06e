"""The static-shape decoder computes what the span-based forward computes (CPU, no graphs)."""

import pytest
import torch
from helpers import make_checkpoint

from edit_cache.document import Document
from edit_cache.positions import Range, to_position
from edit_cache.views import fill_in_middle, left_to_right
from engine.loading import load_model
from engine.model import Span
from engine.static_decode import StaticDecoder

TEXT = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\r\n    y = [1, 2]  # é ✓\n" * 4


@pytest.fixture(scope="module")
def template():
    return Document.create_simulated(TEXT)


def _greedy(decoder, view, steps):
    """Greedy ids and per-step logits from the static decoder, starting at `view`."""
    decoder.load(view.state())
    logits = view.first_logits[0]
    ids, all_logits = [], []
    position = view.next_position
    for _ in range(steps):
        token = int(logits.argmax())
        ids.append(token)
        logits = decoder.step([token], [position])[0]
        all_logits.append(logits)
        position += 1
    return ids, all_logits


def _eager(view, steps):
    """The same from the span-based forward, one step at a time."""
    model = view.document.model
    logits = view.first_logits[0]
    ids, all_logits = [], []
    used = view.scratch_used
    view.scratch.ensure_capacity(used + steps + 1, keep=used)
    for step in range(steps):
        token = int(logits.argmax())
        ids.append(token)
        logits = model(torch.tensor([[token]]), torch.tensor([view.next_position + step]),
                       write=view.scratch, write_at=used + step,
                       context=[*view.context, Span(view.scratch, 0, used + step)], logits="last")[0]
        all_logits.append(logits)
    return ids, all_logits


def _edited(template):
    doc = Document(template.model, template.tokenizer, TEXT, head=template.head)
    doc.ensure_ready()
    text = doc.text
    at = text.index("class A")
    doc.apply_change(Range(to_position(text, at), to_position(text, at)), "import os\n")
    return doc


@pytest.mark.parametrize("kind", ["l2r", "fim"])
def test_static_steps_match_span_forward(template, kind):
    doc = _edited(template)  # a pending PIE repair, so the views read repaired slots
    cursor = doc.text.index("pass") + 2
    make = left_to_right if kind == "l2r" else fill_in_middle
    view = make(doc, cursor, max_new_tokens=16)
    if kind == "fim":
        assert any(span.shift for span in view.context), "the FIM view should attend to a shifted suffix"
    decoder = StaticDecoder(doc.model, 64, bucket=32, max_width=4)
    assert not decoder.use_graphs
    ids, logits = _greedy(decoder, view, 12)
    want_ids, want_logits = _eager(view, 12)
    assert ids == want_ids
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_multi_token_step_and_rewind(template):
    doc = _edited(template)
    view = left_to_right(doc, len(doc.text) - 3, max_new_tokens=16)
    decoder = StaticDecoder(doc.model, 16, bucket=16, max_width=8)
    decoder.load(view.state())
    start = decoder.used
    p = view.next_position
    draft = [5, 9, 17]  # three tokens, padded to a width of four
    together = decoder.step(draft, [p, p + 1, p + 2])
    assert decoder.used == start + 3
    decoder.rewind(start)
    one_by_one = torch.stack([decoder.step([t], [p + i])[0] for i, t in enumerate(draft)])
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=1e-4)
    # a rejected draft: rewind and step a different token at the same slot
    decoder.rewind(start + 1)
    other = decoder.step([11], [p + 1])[0]
    decoder.rewind(start)
    decoder.step([5], [p])
    torch.testing.assert_close(decoder.step([11], [p + 1])[0], other, atol=1e-5, rtol=1e-5)


def test_arena_grows_to_fit_a_longer_view(template):
    doc = Document(template.model, template.tokenizer, TEXT * 3, head=template.head)
    view = left_to_right(doc, len(doc.text) - 1, max_new_tokens=8)
    decoder = StaticDecoder(doc.model, 8, bucket=16, max_width=2)
    small = decoder.capacity
    ids, logits = _greedy(decoder, view, 4)
    assert decoder.capacity > small >= 8
    assert ids == _eager(view, 4)[0]


@pytest.mark.parametrize("family", ["llama-gqa-tied-linear", "phi3-partial-rotary", "qwen2", "yarn"])
def test_families_and_shifted_spans(tmp_path, family):
    loaded = load_model(make_checkpoint(tmp_path / family, family))
    model = loaded.model
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (1, 40))
    cache = model.new_cache(40)
    model(ids, torch.arange(40), write=cache, write_at=0, logits="none")
    # slots 0..20 at their positions, slots 30..40 acting 7 positions later (a FIM-like gap)
    context = [Span(cache, 0, 20), Span(cache, 30, 40, 7)]
    scratch = model.new_cache(4)
    want = model(torch.tensor([[7, 8]]), torch.tensor([47, 48]), write=scratch, write_at=0,
                 context=context, logits="all")[0]
    from engine.generate import DecodeState

    state = DecodeState(model, loaded.tokenizer, want[:1], context, scratch, 0, 47)
    decoder = StaticDecoder(model, 32, bucket=16, max_width=2)
    decoder.load(state)
    torch.testing.assert_close(decoder.step([7, 8], [47, 48]), want, atol=1e-4, rtol=1e-4)


def test_graphs_need_cuda(template):
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(template.model, 16, graphs=True)
