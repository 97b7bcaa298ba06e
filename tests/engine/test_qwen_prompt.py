"""Qwen2.5-Coder's prompt layouts, token for token, with its real token ids.

tests/fixtures/qwen_tokenizer_subset.json is Qwen2.5-Coder's tokenizer cut down to the texts
these tests use (tests/fixtures/make_qwen_tokenizer_subset.py checked it against the full one).
Qwen's file-level FIM layout is `<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`, the
parts tokenized apart; the middle follows. The exact prompts (full recompute, `editkv complete`)
and the edit cache's views must build it alike, with no token healed in FIM.
"""

import json
from pathlib import Path

import pytest
import torch
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.loading import load_model
from editkv.engine.prompting import doc_start_ids, fim_heals, healed_fim_ids, healed_left_to_right_ids
from editkv.engine.tokenizer import FimTokens, Tokenizer
from helpers import make_checkpoint
from tokenizers import Tokenizer as HFTokenizer

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "qwen_tokenizer_subset.json").read_text())
PRE, MID, SUF = 151659, 151660, 151661
# tests/fixtures' io.py with `data = f.read()` deleted, cursor after its 8 spaces:
# <|fim_prefix|> "import os\n\n\ndef load(path):\n    with open(path) as f:\n        "
PREFIX_IDS = [474, 2643, 1406, 750, 2795, 5581, 982, 262, 448, 1787, 5581, 8, 438, 282, 510, 260]
# "    return data.split(...)\n\n\nclass Store: ..." (the lines after the cursor's line)
NEXT_LINES_IDS = [262, 470, 821, 5289, 4921, 77, 25639, 1040, 9129, 510, 262, 707, 1304, 2327, 3804, 721, 11, 3704,
                  982, 286, 656, 12576, 284, 3704, 271, 262, 707, 1815, 1193, 11, 829, 982, 286, 470, 2643, 3875,
                  5446, 1193, 12576, 11, 829, 340]
NEWLINE, EIGHT_SPACES = 198, 260
FIM_NEXT_LINE = [PRE, *PREFIX_IDS, SUF, *NEXT_LINES_IDS, MID]
FIM_REST_OF_LINE = [PRE, *PREFIX_IDS, SUF, NEWLINE, *NEXT_LINES_IDS, MID]
L2R = [PRE, *PREFIX_IDS[:-1]]  # the 8 spaces healed: the model spells them with the next word


class _Config:  # what the prompt builders read of a Qwen2.5-Coder config
    bos_token_id = None
    max_position_embeddings = 32768


@pytest.fixture(scope="module")
def qwen_tok():
    return Tokenizer(HFTokenizer.from_str(json.dumps(FIXTURE["tokenizer"])), (151645,))


@pytest.fixture(scope="module")
def masked():
    doc = FIXTURE["documents"]["io.py"]
    line = "        data = f.read()"
    start = doc.index(line)
    cursor = start + 8
    return doc[:cursor] + doc[start + len(line):], cursor


@pytest.fixture(scope="module")
def qwen_vocab_model(tmp_path_factory):
    """A tiny random Qwen2 network with Qwen2.5-Coder's vocabulary size (its weights don't matter here)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("qwen-vocab"), "qwen2", vocab_size=151936,
                           max_position_embeddings=4096)
    return load_model(ckpt).runner


def test_the_subset_tokenizes_as_qwen_does(qwen_tok):
    for case in FIXTURE["cases"]:
        assert qwen_tok.encode(case["text"]) == case["ids"], case["text"]
    assert qwen_tok.fim == FimTokens("qwen", PRE, SUF, MID, 0)
    assert not fim_heals(qwen_tok)
    # control tokens end a completion; "</s>" is an ordinary token of Qwen's vocabulary (text)
    assert qwen_tok.stop_ids == {151643, 151645, 151659, 151660, 151661, 151662, 151663, 151664}
    assert qwen_tok.token_id("</s>") == 128247 and not qwen_tok.is_special(128247)


def test_exact_prompts_pin_qwens_layout(qwen_tok, masked):
    text, cursor = masked
    next_line = text[text.index("\n", cursor) + 1:]
    assert doc_start_ids(qwen_tok, _Config) == [PRE]
    assert healed_fim_ids(qwen_tok, _Config, text[:cursor], next_line) == (FIM_NEXT_LINE, b"")
    assert healed_fim_ids(qwen_tok, _Config, text[:cursor], text[cursor:]) == (FIM_REST_OF_LINE, b"")
    assert healed_left_to_right_ids(qwen_tok, _Config, text[:cursor]) == (L2R, b" " * 8)
    assert qwen_tok.decode([EIGHT_SPACES]) == " " * 8 and PREFIX_IDS[-1] == EIGHT_SPACES


@pytest.mark.parametrize("fresh_suffix", [0, 64])
def test_the_edit_cache_views_build_the_same_prompts(qwen_tok, qwen_vocab_model, masked, fresh_suffix):
    text, cursor = masked
    doc = Document(qwen_vocab_model, qwen_tok, text, head=doc_start_ids(qwen_tok, _Config),
                   options=DocumentOptions(fim_fresh_suffix=fresh_suffix))
    with torch.inference_mode():
        view = fill_in_middle(doc, cursor, suffix="next_line")
        assert (view.prompt_ids, view.heal) == (FIM_NEXT_LINE, b"")
        view = fill_in_middle(doc, cursor, suffix="rest_of_line")
        assert (view.prompt_ids, view.heal) == (FIM_REST_OF_LINE, b"")
        view = left_to_right(doc, cursor)
        assert (view.prompt_ids, view.heal) == (L2R, b" " * 8)
        # after an edit above the cursor (PIE repair), the views stand for the new text's exact prompts
        at = to_position(text, text.index("path):"))
        doc.apply_change(Range(at, at), "file_")
        edited = doc.text
        cursor += len("file_")
        next_line = edited[edited.index("\n", cursor) + 1:]
        want, heal = healed_fim_ids(qwen_tok, _Config, edited[:cursor], next_line)
        assert heal == b"" and want[:-len(NEXT_LINES_IDS) - 1][-1] == SUF
        view = fill_in_middle(doc, cursor, suffix="next_line")
        assert (view.prompt_ids, view.heal) == (want, b"")
        assert view.prompt_ids[-len(NEXT_LINES_IDS) - 1:] == [*NEXT_LINES_IDS, MID]
