"""Incremental tokenization equals a fresh tokenization after any edit sequence."""

import json

import pytest
from editkv.edit_cache.positions import Position, Range, apply_change, line_starts, to_offset, to_position
from editkv.edit_cache.tokens import TokenizedText, is_line_local
from editkv.engine.tokenizer import Tokenizer
from helpers import SNIPPETS, tiny_tokenizer_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _tokenizer(gpt2_style=False):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not gpt2_style:
        return Tokenizer(HFTokenizer.from_str(tiny_tokenizer_json()))
    # GPT-2's regex glues a newline to the next line's indentation: not line-local.
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(SNIPPETS * 20, trainer)
    return Tokenizer(backend)


LOCAL, GPT2 = _tokenizer(), _tokenizer(gpt2_style=True)

ALPHABET = st.sampled_from(
    list("ab xy_(){}:=.,'\"#\t\n\r") + ["\r\n", "é", "😀", "✓", "    ", "\n\n", "def ", "return "]
)
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


def test_probe_classifies_tokenizers():
    assert is_line_local(LOCAL)
    assert not is_line_local(GPT2)


@st.composite
def edit_sequences(draw):
    text = draw(TEXT)
    edits = []
    current = text
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.integers(0, 9)) == 0:
            new = draw(TEXT)
            edits.append((None, new))
            current = new
            continue
        a = draw(st.integers(0, len(current)))
        b = draw(st.integers(a, min(len(current), a + 6)))
        new = draw(TEXT)
        edits.append(((a, b), new))
        current = current[:a] + new + current[b:]
    return text, edits


def _check(tok, text, edits):
    doc = TokenizedText(tok, text)
    for rng, new in edits:
        if rng is None:
            new_text, start, old_end = apply_change(doc.text, None, new)
        else:
            a, b = rng
            # Express the edit as an LSP range in UTF-16, as an editor would send it.
            starts = line_starts(doc.text)
            lsp = Range(to_position(doc.text, a, "utf-16", starts), to_position(doc.text, b, "utf-16", starts))
            new_text, start, old_end = apply_change(doc.text, lsp, new)
        before_ids = list(doc.ids)
        edit = doc.update(new_text, start, old_end)
        fresh = tok.encode_with_offsets(new_text)
        assert doc.ids == fresh.ids, (doc.text, rng, new)
        assert doc.starts.tolist() == [s for s, _ in fresh.offsets]
        if edit is None:
            assert before_ids == doc.ids
        else:
            rebuilt = before_ids[: edit.start] + list(edit.new_ids) + before_ids[edit.end :]
            assert rebuilt == doc.ids


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(edit_sequences())
def test_line_local_tokenizer_window_updates(case):
    _check(LOCAL, *case)


@settings(max_examples=100, deadline=None)
@given(edit_sequences())
def test_non_local_tokenizer_falls_back_correctly(case):
    _check(GPT2, *case)


def test_utf16_positions_count_surrogate_pairs():
    text = "a😀b\r\nx"
    assert to_offset(text, Position(0, 3)) == 2  # 'a' (1) + emoji (2 units)
    assert to_offset(text, Position(0, 3), "utf-8") == 1  # inside the emoji's 4 bytes -> snaps
    assert to_offset(text, Position(0, 5), "utf-8") == 2
    assert to_offset(text, Position(0, 99)) == 3  # past the line end: the line end
    assert to_offset(text, Position(1, 1)) == 6
    assert to_position(text, 2) == Position(0, 3)
    assert to_position(text, 2, "utf-32") == Position(0, 2)


def test_out_of_range_line_is_an_error():
    from editkv.edit_cache.positions import PositionError

    with pytest.raises(PositionError, match="past the end"):
        to_offset("a\nb", Position(5, 0))
    with pytest.raises(PositionError, match="before its start"):
        apply_change("abc", Range(Position(0, 2), Position(0, 1)), "x")


def test_realedits_records_apply_to_after(tmp_path):
    """A few real records: applying `edits` gives `after`, and tokens stay fresh."""
    import gzip
    from pathlib import Path

    data = Path(__file__).resolve().parents[3] / "shared" / "realedits" / "dev.jsonl.gz"
    if not data.is_file():
        pytest.skip("realedits data not present")
    with gzip.open(data, "rt") as f:
        records = [json.loads(next(f)) for _ in range(5)]
    for rec in records:
        doc = TokenizedText(LOCAL, rec["before"])
        for change in rec["edits"]:
            r = change["range"]
            rng = Range(Position(**r["start"]), Position(**r["end"]))
            new_text, start, old_end = apply_change(doc.text, rng, change["text"])
            doc.update(new_text, start, old_end)
        assert doc.text == rec["after"]
        assert doc.ids == LOCAL.encode(rec["after"])
