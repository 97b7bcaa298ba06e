"""Superposed decoding and the workspace n-gram index: counts, bounds, greedy equivalence, the mixed input."""

import random
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from editkv.edit_cache.document import Document
from editkv.edit_cache.tokens import TokenEdit, TokenizedText
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.decoding.superposed import (
    SuperposedParams,
    _corpus_distribution,
    left_context,
    superposed_drafts,
)
from editkv.engine.generate import DecodeState, DecodeStats, StopRules, decode
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.model import Span
from editkv.engine.ngram import NgramTable, _hash_one
from editkv.engine.prompting import doc_start_ids, healed_fim_ids, healed_left_to_right_ids, left_to_right_ids
from editkv.engine.static_decode import StaticForward
from editkv.engine.tokenizer import Tokenizer
from editkv.kernels.context_hash import context_hash_int

GREEDY = SuperposedParams(alpha=0.0, keep_empty=True)
PROMPTS = ["def add(a, b):\n", "import os\nfor name in", "class Point:\n    def __init__(self, x, y):\n        self."]


def _state(loaded, prefix, *, heal=True, max_new_tokens=32):
    if heal:
        ids, healed = healed_left_to_right_ids(loaded.tokenizer, loaded.config, prefix)
    else:
        ids, healed = left_to_right_ids(loaded.tokenizer, loaded.config, prefix), b""
    return DecodeState.from_prompt(loaded.runner, loaded.tokenizer, ids, heal=healed, max_new_tokens=max_new_tokens)


def _greedy(state, rules):
    return decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                  next_position=state.next_position, rules=rules, scratch=state.scratch,
                  scratch_used=state.scratch_used, heal=state.heal)


def _brute_force(docs, max_n=6):
    grams, contexts = Counter(), Counter()
    for doc in docs:
        for n in range(2, max_n + 1):
            for i in range(len(doc) - n + 1):
                grams[tuple(doc[i : i + n])] += 1
                contexts[tuple(doc[i : i + n - 1])] += 1
    return grams, contexts


def _assert_index_equals(index, docs):
    grams, contexts = _brute_force(docs, index.max_n)
    for gram, n in grams.items():
        assert index.count(list(gram[:-1]), gram[-1]) == n, gram
    for ctx, n in contexts.items():
        assert index.context_count(list(ctx)) == n, ctx
    # nothing else is stored: no stale keys, no zero counts
    assert len(index.ngrams) == len(grams) and len(index.contexts) == len(contexts)


# ---- the workspace n-gram index -------------------------------------------------------------


@pytest.mark.parametrize("merge_at", [4, 1 << 16])  # merged into the arrays often / edits kept pending
def test_index_counts_equal_brute_force_after_random_edits(merge_at):
    rng = random.Random(merge_at)
    index = NgramIndex()
    index.contexts.merge_at = index.ngrams.merge_at = merge_at
    docs = {"a": [rng.randrange(6) for _ in range(400)], "b": [rng.randrange(6) for _ in range(50)]}
    for uri, ids in docs.items():
        index.add(uri, ids)
    for _ in range(400):
        uri = rng.choice("ab")
        doc = docs[uri]
        start = rng.randrange(len(doc) + 1)
        end = min(len(doc), start + rng.choice([0, 0, 1, 2, 7]))
        new = [rng.randrange(6) for _ in range(rng.choice([0, 1, 1, 3, 8]))]
        index.apply_edit(uri, TokenEdit(start, end, tuple(new)))
        doc[start:end] = new
    _assert_index_equals(index, docs.values())
    assert index.num_tokens == sum(map(len, docs.values()))


def test_index_forgets_an_edited_document_whose_edits_wait_unmerged():
    """A document too large for the pending dictionary is added and removed in bulk; the n-grams an
    edit added before (still pending) are removed with it, not found missing."""
    rng = random.Random(3)
    index = NgramIndex()
    ids = [rng.randrange(50) for _ in range(3000)]
    index.add("big", ids)
    index.add("small", [1, 2, 3, 4])
    for at in (10, 500, 2000):  # n-grams no document had: they exist only in the pending counts
        index.apply_edit("big", TokenEdit(at, at, (1000 + at, 1001 + at)))
        ids[at:at] = [1000 + at, 1001 + at]
    assert index.ngrams.pending
    index.remove("big")
    _assert_index_equals(index, [[1, 2, 3, 4]])


def test_index_follows_tokenized_text_edits():
    """The edits TokenizedText.update reports keep the index equal to one built from scratch."""
    if not (DEFAULT_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("no default tokenizer")
    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    rng = random.Random(1)
    text = "def f(x):\n    return x + 1\n\n\nclass A:\n    y = [1, 2]\n" * 4
    tt = TokenizedText(tok, text)
    index = NgramIndex()
    index.add("doc", tt.ids)
    pieces = ["x", " = ", "\n", "    ", "return ", "(1)", "def g():\n    pass\n", ""]
    for _ in range(60):
        a = rng.randint(0, len(tt.text))
        b = min(len(tt.text), a + rng.choice([0, 1, 3, 8]))
        new_text = tt.text[:a] + rng.choice(pieces) + tt.text[b:]
        edit = tt.update(new_text, a, b)
        if edit is not None:
            index.apply_edit("doc", edit)
    assert tt.ids == tok.encode(tt.text)
    _assert_index_equals(index, [tt.ids])


def test_index_memory_bound_evicts_least_recently_used():
    rng = random.Random(2)
    index = NgramIndex(max_tokens=1000)
    docs = {f"d{i}": [rng.randrange(50) for _ in range(300)] for i in range(6)}
    for i, (uri, ids) in enumerate(docs.items()):
        index.add(uri, ids)
        if i == 1:
            index.touch("d0")  # d0 is used again: d1 goes first
        if i == 3:
            assert list(index.docs) == ["d0", "d2", "d3"]
        assert index.num_tokens <= 1000
    assert list(index.docs) == ["d3", "d4", "d5"] and index.evictions == 3
    _assert_index_equals(index, [docs[u] for u in index.docs])
    assert index.nbytes() < 1000 * 200  # ~16 bytes an entry, <= 10 entries a token, plus the ids
    assert index.add("huge", list(range(1001))) is False and "huge" not in index.docs
    # an edit that grows a document past the bound evicts the others
    last = list(index.docs)[-1]
    index.apply_edit(last, TokenEdit(0, 0, tuple(range(500))))
    docs[last] = list(range(500)) + docs[last]
    assert index.num_tokens <= 1000 and last in index.docs
    _assert_index_equals(index, [docs[u] for u in index.docs])


def test_next_probs_are_unsmoothed_relative_frequencies():
    index = NgramIndex()
    index.add("a", [1, 2, 3, 1, 2, 4, 1, 2, 3])
    probs = index.next_probs([9, 1, 2], [3, 4, 5])
    assert probs[0] == pytest.approx([2 / 3, 1 / 3, 0.0])  # after "2": 3, 4, 3
    assert probs[1] == pytest.approx([2 / 3, 1 / 3, 0.0])  # after "1 2"
    assert probs[2] is None and probs[3] is None  # "9 1 2" never seen, nor anything longer
    assert index.next_probs([3], [1, 2])[0] == pytest.approx([1.0, 0.0])
    assert index.next_probs([7], [1]) == [None] * 5


def test_corpus_hash_and_distribution_match_ngram_table():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, 3000)
    table = NgramTable.build(tokens, max_order=4, top_k=4)
    for _ in range(200):
        ctx = rng.integers(0, 20, 5).tolist()
        for c in (1, 2, 3):
            assert context_hash_int(tuple(ctx[-c:])) == _hash_one(ctx, c)
            assert _corpus_distribution(table, tuple(ctx[-c:])) == table.distribution(ctx, c)


# ---- superposed decoding --------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PROMPTS)
@pytest.mark.parametrize("heal", [False, True])
def test_k1_alpha0_is_greedy_decoding(tiny, prefix, heal):
    rules = StopRules(max_tokens=12, max_lines=None)
    state = _state(tiny, prefix, heal=heal)
    expect = _greedy(state, rules)
    out = superposed_drafts(state, 1, rules, params=GREEDY)
    assert len(out.drafts) == 1
    assert out.drafts[0].ids == expect.ids and out.drafts[0].text == expect.text
    assert out.drafts[0].stop_reason == expect.stop_reason
    assert out.stats.forwards == expect.stats.forwards and out.stats.resets == 0


def test_superposed_input_is_the_score_weighted_sum_of_embeddings(tiny):
    model = tiny.runner
    seen = []
    forward = model.model.forward  # (no static forward here: every forward is the model's)

    def spy(*args, **kwargs):
        if kwargs.get("input_embeds") is not None:
            seen.append(kwargs["input_embeds"].clone())
        return forward(*args, **kwargs)

    trace = []
    state = _state(tiny, PROMPTS[0], heal=False)
    model.model.forward = spy
    try:
        out = superposed_drafts(state, 3, StopRules(max_tokens=8, max_lines=None),
                                params=SuperposedParams(alpha=0.0, weight_scale=0.05), trace=trace)
    finally:
        del model.model.forward
    assert trace and len(seen) == len(trace)
    weights = model.model.embed_tokens.weight
    for rec, embeds in zip(trace, seen, strict=True):
        assert embeds.shape == (1, 1, model.config.hidden_size)
        gamma = torch.softmax(0.05 * torch.tensor(rec["scores"], dtype=torch.float64), 0)
        manual = sum(float(g) * weights[i] for g, i in zip(gamma, rec["last_ids"], strict=True))
        torch.testing.assert_close(embeds[0, 0], manual, rtol=1e-5, atol=1e-6)
    # one forward per step, plus one per reset
    assert out.stats.forwards == out.stats.steps + out.stats.resets


def test_first_drafts_come_from_first_logits_and_see_the_mixed_input(tiny):
    """Step 1: the top k first tokens; step 2 extends them from one forward of the mixture."""
    model = tiny.runner
    state = _state(tiny, PROMPTS[1], heal=False)
    params = SuperposedParams(alpha=0.0, keep_empty=True, weight_scale=0.05)
    trace = []
    superposed_drafts(state, 2, StopRules(max_tokens=3, max_lines=None), params=params, trace=trace)
    rec = trace[0]
    first = state.first_logits[0]
    top2 = first.topk(2).indices.tolist()
    assert rec["last_ids"] == top2
    lp = torch.log_softmax(first.float() / params.temperature, -1)[top2]
    assert rec["scores"] == pytest.approx((lp - torch.logsumexp(lp, 0)).tolist(), abs=1e-4)
    # the same mixture, encoded by hand into a copy of the scratch, predicts the next tokens
    gamma = torch.softmax(0.05 * torch.tensor(rec["scores"], dtype=torch.float64), 0)
    mixed = sum(float(g) * model.model.embed_tokens.weight[i] for g, i in zip(gamma, top2, strict=True))
    scratch = model.new_cache(state.scratch.capacity)
    scratch.k.copy_(state.scratch.k)
    scratch.v.copy_(state.scratch.v)
    logits = model(None, torch.tensor([state.next_position]), write=scratch, write_at=state.scratch_used,
                   context=[*state.context, Span(scratch, 0, state.scratch_used)], logits="last",
                   input_embeds=mixed[None, None])
    assert len(trace) >= 2 and set(trace[1]["last_ids"]) <= set(logits[0].topk(2).indices.tolist())


@pytest.mark.parametrize("max_lines,max_tokens", [(1, 24), (None, 5), (2, 16)])
def test_drafts_are_distinct_and_respect_stop_rules(tiny, max_lines, max_tokens):
    state = _state(tiny, PROMPTS[2])
    rules = StopRules(max_tokens=max_tokens, max_lines=max_lines)
    index = NgramIndex()
    index.add("doc", tiny.tokenizer.encode(PROMPTS[2] * 3))
    out = superposed_drafts(state, 3, rules, ngram_index=index)
    texts = [d.text.rstrip() for d in out.drafts]
    assert 1 <= len(texts) <= 3 and len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    scores = [d.score for d in out.drafts]
    assert scores == sorted(scores, reverse=True)
    for d in out.drafts:
        assert len(d.ids) <= max_tokens
        assert not set(d.ids) & tiny.tokenizer.stop_ids
        if max_lines is not None:
            assert d.text.count("\n") < max_lines
        assert d.stop_reason in ("stop_token", "lines", "max_tokens")
    # a stop id is never part of a draft
    stop = out.drafts[0].ids[0]
    stopped = superposed_drafts(state, 3, StopRules(max_tokens=max_tokens, max_lines=max_lines,
                                                    stop_ids=frozenset({stop})))
    assert all(stop not in d.ids for d in stopped.drafts)


def test_should_stop_cancels_before_the_next_forward(tiny):
    state = _state(tiny, PROMPTS[0])
    out = superposed_drafts(state, 3, StopRules(max_tokens=20, max_lines=None, should_stop=lambda: True),
                            params=SuperposedParams(keep_empty=True))
    assert out.stats.forwards == 0
    assert out.drafts and all(d.stop_reason == "cancelled" and len(d.ids) == 1 for d in out.drafts)


def test_healing_first_tokens_spell_the_cut_text(default):
    tok = default.tokenizer
    prefix = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    ret"
    state = _state(default, prefix)
    assert state.heal == b" ret"  # "    ret" is tokenized "   " + " ret"
    stats = DecodeStats()
    index = NgramIndex()
    index.add("doc", tok.encode(prefix))
    out = superposed_drafts(state, 3, StopRules(max_tokens=12, max_lines=1), ngram_index=index, stats=stats)
    assert out.drafts
    for d in out.drafts:
        full = tok.decode(d.ids)
        assert full.startswith(" ret")
        assert d.text == full.split("\n")[0][len(" ret"):]
    assert stats.forwards == out.stats.forwards and stats.decode_ms > 0


def test_left_context_is_the_text_before_the_cursor(default):
    tok, cfg = default.tokenizer, default.config
    ids, _ = healed_fim_ids(tok, cfg, "x = 1\ny = x + 1\n", "z = 2\n")
    state = DecodeState.from_prompt(default.runner, tok, ids)
    assert left_context(state, 3) == tok.encode("x = 1\ny = x + 1\n")[-3:]
    l2r, _ = healed_left_to_right_ids(tok, cfg, "a")
    assert left_context(DecodeState.from_prompt(default.runner, tok, l2r), 5) == []  # only the head is left


@pytest.mark.parametrize("view", ["l2r", "fim"])
def test_default_model_through_document_views(default, view):
    tok, model = default.tokenizer, default.runner
    text = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "def mul(a, b):\n    \n\n\ndef div(a, b):\n    return a / b\n")
    cursor = text.index("    \n\n\ndef div") + 4
    doc = Document(model, tok, text, head=doc_start_ids(tok, default.config))
    make = left_to_right if view == "l2r" else fill_in_middle
    rules = StopRules(max_tokens=16, max_lines=1)
    greedy = make(doc, cursor).decode(rules=rules)
    out = superposed_drafts(make(doc, cursor).state(), 1, rules, params=GREEDY)
    assert out.drafts[0].ids == greedy.ids and out.drafts[0].text == greedy.text
    index = NgramIndex()
    index.add("doc", doc.ids)
    corpus = NgramTable.load(DEFAULT_MODEL_DIR / "ngram.npz")
    out = superposed_drafts(make(doc, cursor).state(), 3, rules, ngram_index=index, corpus=corpus)
    texts = [d.text for d in out.drafts]
    assert len(texts) == 3 and len({t.rstrip() for t in texts}) == 3
    assert all("\n" not in t for t in texts)
    assert out.stats.ngram_lookups > 0 and out.stats.forwards == out.stats.steps + out.stats.resets
    assert out.stats.forwards <= rules.max_tokens + out.stats.resets


@pytest.mark.parametrize("view", ["l2r", "fim"])
def test_superposed_steps_take_the_static_path(default, view):
    """Superposed forwards from input embeddings run on the static forward the GPU replays
    (here its static form on the CPU), with the drafts of the eager path."""
    tok, model = default.tokenizer, default.runner
    text = ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
            "def write(path, text):\n    with open(path, 'w') as f:\n        \n")
    cursor = len(text) - 1
    make = left_to_right if view == "l2r" else fill_in_middle
    rules = StopRules(max_tokens=16, max_lines=1)
    index = NgramIndex()
    results = []
    for static in (None, StaticForward(model.model, bucket=256, max_width=16, mode="static")):
        model.use_graphs(static)
        try:
            doc = Document(model, tok, text, head=doc_start_ids(tok, default.config))
            index.add("doc", doc.ids)
            state = make(doc, cursor).state()
            eager_before = static.eager if static is not None else 0  # the prefill was wider than 16
            results.append(superposed_drafts(state, 3, rules, ngram_index=index))
        finally:
            model.disable_graphs()
    eager, staticed = results
    assert [d.ids for d in staticed.drafts] == [d.ids for d in eager.drafts]
    assert [d.score for d in staticed.drafts] == pytest.approx([d.score for d in eager.drafts], abs=1e-3)
    assert static.embedded > 0 and static.eager == eager_before  # every decoding forward static


def test_latency_budget_returns_partial_drafts_after_finished_ones(tiny):
    rules = StopRules(max_tokens=24, max_lines=1)
    for prefix in PROMPTS:
        state = _state(tiny, prefix)
        tight = superposed_drafts(state, 3, rules, params=SuperposedParams(finish_ratio=1.0, finish_slack=0))
        reasons = [d.stop_reason for d in tight.drafts]
        assert reasons == sorted(reasons, key=lambda r: r == "budget")  # finished first
        free = superposed_drafts(state, 3, rules, params=SuperposedParams(finish_ratio=None))
        assert "budget" not in [d.stop_reason for d in free.drafts]
        assert tight.stats.steps <= free.stats.steps


def test_drafts_emit_through_output_stop_text_and_the_lines_deadline(default):
    """Each draft is an engine.generate.Output: `stop_text` ends a draft where it says, a passed
    multi-line deadline ends drafts at their first line end with text before it (host loop), and
    a deadline still ahead changes nothing."""
    prefix = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    rules = StopRules(max_tokens=24, max_lines=None)
    free = superposed_drafts(_state(default, prefix), 3, rules)
    ahead = superposed_drafts(_state(default, prefix), 3, replace(rules, lines_until=time.perf_counter() + 1e6))
    assert [(d.ids, d.text, d.stop_reason) for d in ahead.drafts] == [(d.ids, d.text, d.stop_reason)
                                                                      for d in free.drafts]
    assert all("\n" in d.text for d in free.drafts)
    passed = superposed_drafts(_state(default, prefix), 3, replace(rules, lines_until=0.0))
    assert len(passed.drafts) == 3
    for d in passed.drafts:
        assert d.stop_reason == "lines" and d.text.strip() and default.tokenizer.decode(d.ids) == d.text + "\n"
    cut = superposed_drafts(_state(default, prefix), 3, rules, stop_text=lambda text: 6 if len(text) >= 6 else None)
    assert len(cut.drafts) == 3 and all(d.stop_reason == "stop_text" and len(d.text) == 6 for d in cut.drafts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_superposed_steps_replay_graphs():
    """On CUDA the superposed forwards replay graphs of their own (input embeddings), with the
    drafts of the static forward run eagerly (fp32)."""
    loaded = load_model(None, device="cuda", dtype="float32")
    tok, model = loaded.tokenizer, loaded.runner
    text = ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
            "def write(path, text):\n    with open(path, 'w') as f:\n        \n")
    rules = StopRules(max_tokens=16, max_lines=1)
    graphs = model.static
    out = []
    for static in (StaticForward(model.model, mode="static"), graphs):
        model.use_graphs(static)
        doc = Document(model, tok, text, head=doc_start_ids(tok, loaded.config))
        out.append(superposed_drafts(fill_in_middle(doc, len(text) - 1).state(), 3, rules))
    assert [d.ids for d in out[1].drafts] == [d.ids for d in out[0].drafts]
    assert graphs.embedded > 0 and graphs.replays > graphs.captures
