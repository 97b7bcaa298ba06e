"""The static-shape forward (what CUDA graphs replay) computes what the span forward computes.

On the CPU it runs in "static" mode: the same static-shape code, without capture. The GPU
test compares replayed graphs with it.
"""

import random
from dataclasses import replace

import pytest
import torch
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.generate import StopRules
from editkv.engine.loading import load_model
from editkv.engine.model import KVCache, Span
from editkv.engine.prompting import doc_start_ids
from editkv.engine.static_decode import StaticForward, visibility
from helpers import make_checkpoint

TEXT = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\r\n    y = [1, 2]  # é ✓\n" * 4
PIECES = ["x", " = ", "\n", "    ", "return ", "😀", "(1)", "def g():\n    pass\n", ""]


@pytest.fixture(scope="module")
def template():
    return Document.create_simulated(TEXT)


def _edit_session(template, static: StaticForward | None, seed: int = 0, text: str = TEXT, keep: list | None = None):
    """A document through random edits, repairs and views; what each view decodes. `keep`: a list
    the document is added to (so that it stays open, as in a server)."""
    model = template.model
    model.use_graphs(static)
    try:
        doc = Document(model, template.tokenizer, text, head=template.head)
        if keep is not None:
            keep.append(doc)
        rng = random.Random(seed)
        out = []
        for step in range(6):
            for _ in range(rng.randint(1, 3)):
                text = doc.text
                a = rng.randint(0, len(text))
                b = min(len(text), a + rng.choice([0, 0, 2, 5]))
                doc.apply_change(Range(to_position(text, a), to_position(text, b)), rng.choice(PIECES))
            doc.ensure_ready()
            cursor = rng.randint(1, len(doc.text))
            view = (left_to_right if step % 2 else fill_in_middle)(doc, cursor, max_new_tokens=10)
            completion = view.decode(rules=StopRules(max_tokens=10, max_lines=None))
            out.append((view.first_logits.clone(), completion.ids, completion.logprob))
        keys = doc.materialize()[0]  # in text order: the layouts differ (views on graphs move the gap)
        return out, keys
    finally:
        model.disable_graphs()


def test_static_forward_matches_span_forward_through_edits_and_views(template):
    static = StaticForward(template.model.model, bucket=32, max_width=8, mode="static")
    want, want_keys = _edit_session(template, None)
    got, got_keys = _edit_session(template, static)
    assert static.handled > 20, "repairs, views and decode steps should have taken the static path"
    assert static.eager > 0, "the full prefill (and wide writes) stay eager"
    assert static.chains >= 6, "each view's greedy decode should have chained its steps"
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)  # padding rows wrote nothing live
    for (g_logits, g_ids, g_lp), (w_logits, w_ids, w_lp) in zip(got, want, strict=True):
        torch.testing.assert_close(g_logits, w_logits, atol=1e-4, rtol=1e-4)
        assert g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-3)


def test_documents_of_a_kv_pool_match_and_share_one_set_of_graphs(template):
    """Documents that are regions of one KV pool compute what documents with buffers of their own
    compute, and a second document replays the first one's graphs (the keys a capture is taken
    for): graphs are per shape, not per document buffer."""
    from editkv.engine.kv_pool import KVPool

    model = template.model
    want, want_keys = _edit_session(template, None)
    for pooled in (False, True):
        pool = KVPool(model.config, 4000, dtype=model.dtype, device=model.device) if pooled else None
        model.use_pool(pool)
        static = StaticForward(model.model, bucket=32, max_width=8, mode="static", max_graphs=10_000)
        try:
            docs = []  # both stay open
            got, got_keys = _edit_session(template, static, keep=docs)
            first = static.num_graphs
            again, _ = _edit_session(template, static, keep=docs)  # another document, the same edits
        finally:
            model.drop_pool()
        torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
        for (g_logits, g_ids, _), (w_logits, w_ids, _) in zip(got, want, strict=True):
            torch.testing.assert_close(g_logits, w_logits, atol=1e-4, rtol=1e-4)
            assert g_ids == w_ids
        assert [ids for _, ids, _ in again] == [ids for _, ids, _ in got]
        if pooled:
            assert pool.allocations >= 2 and static.handled > 40
            assert static.num_graphs == first, "the second document should replay the first one's graphs"
        else:
            assert static.num_graphs > first  # a buffer of its own: graphs of its own


def test_deferred_captures_run_eagerly_then_are_taken_when_idle_without_touching_documents(template):
    """With deferred captures a forward whose graph is not taken yet runs the same ops eagerly
    and leaves its key pending; `capture_pending` takes them later, its runs writing only the
    spare last slot, so the open documents' keys stay as they were."""
    from editkv.engine.kv_pool import KVPool

    model = template.model
    want, _ = _edit_session(template, None)
    model.use_pool(KVPool(model.config, 4000, dtype=model.dtype, device=model.device))
    static = StaticForward(model.model, bucket=32, max_width=8, mode="static", max_graphs=10_000)
    static.defer_captures = True
    try:
        docs = []
        got, _ = _edit_session(template, static, keep=docs)
        assert static.num_graphs == 0 and static.pending_captures > 5
        assert [ids for _, ids, _ in got] == [ids for _, ids, _ in want]
        before = [d.cache.k.clone() for d in docs]
        pending = static.pending_captures
        assert static.capture_pending(limit=2) == 2 and static.num_graphs == 2
        assert static.capture_pending(lambda: True) == 0  # work came: stops before the next one
        assert static.capture_pending(limit=10_000) == pending - 2 and static.pending_captures == 0
        assert all(torch.equal(b, d.cache.k) for b, d in zip(before, docs, strict=True))
        again, _ = _edit_session(template, static, keep=docs)  # the same shapes: nothing new pending
        assert static.pending_captures == 0 and [ids for _, ids, _ in again] == [ids for _, ids, _ in want]
    finally:
        model.drop_pool()


@pytest.mark.parametrize("logits", ["all", "last", "none"])
def test_a_forward_up_to_twice_the_width_runs_as_parts(template, logits):
    """A forward wider than the graphs but at most MAX_SPLIT times as wide (a FIM view's `<SUF>` and
    fresh suffix) runs as parts of at most max_width tokens, each seeing the ones before it: the
    logits and keys of one eager forward. Wider ones stay eager."""
    model = template.model
    ids = torch.tensor([template.tokenizer.encode(TEXT)[:60]])
    prefix = 20

    def run(static):
        model.use_graphs(static)
        try:
            cache = model.new_cache(128)
            model(ids[:, :prefix], torch.arange(prefix), write=cache, write_at=0, logits="none")
            out = model(ids[:, prefix:], torch.arange(prefix, 60) + 3, write=cache, write_at=prefix,
                        context=[Span(cache, 0, prefix)], logits=logits)
            return out, cache.k[:, :, :, :60].clone()
        finally:
            model.disable_graphs()

    want, want_keys = run(None)
    static = StaticForward(model.model, bucket=32, max_width=32, mode="static")  # 40 new tokens: 32 + 8
    got, got_keys = run(static)
    assert static.split == 1 and static.handled == 3 and static.eager == 0  # the 20-token prefill, 2 parts
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
    if logits == "none":
        assert got is None and want is None
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    narrow = StaticForward(model.model, bucket=32, max_width=8, mode="static")  # 20 and 40 > 2 x 8: eager
    run(narrow)
    assert narrow.split == 0 and narrow.eager == 2


def test_documents_longer_than_the_context_take_the_static_path():
    """Windowed forwards (a sink moved in front of the window, a prefix from the window start)
    replay the static forward too, and compute what the span forward computes."""
    template = Document.create_simulated(TEXT)
    template.model.model.config = replace(template.model.config, max_position_embeddings=96)
    long_text = TEXT * 4  # ~4x the context
    static = StaticForward(template.model.model, bucket=32, max_width=8, mode="static")
    want, want_keys = _edit_session(template, None, text=long_text)
    got, got_keys = _edit_session(template, static, text=long_text)
    assert static.handled > 30 and static.chains >= 6
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
    for (g_logits, g_ids, g_lp), (w_logits, w_ids, w_lp) in zip(got, want, strict=True):
        torch.testing.assert_close(g_logits, w_logits, atol=1e-4, rtol=1e-4)
        assert g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-3)


@pytest.mark.parametrize("family", ["llama-gqa-tied-linear", "phi3-partial-rotary", "qwen2", "yarn"])
def test_families_with_a_shifted_span(tmp_path, family):
    loaded = load_model(make_checkpoint(tmp_path / family, family))
    model = loaded.runner
    torch.manual_seed(1)
    cache = model.new_cache(64)
    model(torch.randint(5, 300, (1, 40)), torch.arange(40), write=cache, write_at=0, logits="none")
    # slots 0..20 at their positions, 30..40 acting 7 later, a window of scratch at 40
    scratch = cache.window(40, 8)
    ids, positions = torch.tensor([[7, 8, 9]]), torch.tensor([47, 48, 49])
    context = [Span(cache, 0, 20), Span(cache, 30, 40, 7)]
    want = model(ids, positions, write=scratch, write_at=0, context=context, logits="all")
    want_kv = cache.k[:, :, :, 40:43].clone()
    cache.k[:, :, :, 40:].zero_()
    model.enable_graphs(bucket=16, mode="static")
    got = model(ids, positions, write=scratch, write_at=0, context=context, logits="all")
    assert model.static.handled == 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.k[:, :, :, 40:43], want_kv, atol=1e-5, rtol=1e-5)
    # one more token after those three, attending to them through the scratch span
    model.disable_graphs()
    want = model(torch.tensor([[11]]), torch.tensor([50]), write=scratch, write_at=3,
                 context=[*context, Span(scratch, 0, 3)], logits="last")
    model.enable_graphs(bucket=16, mode="static")
    got = model(torch.tensor([[11]]), torch.tensor([50]), write=scratch, write_at=3,
                context=[*context, Span(scratch, 0, 3)], logits="last")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_visibility_accepts_the_view_shapes_and_rejects_others(template):
    from editkv.engine.kv_pool import KVPool

    config = template.model.config
    pool = KVPool(config, 300, dtype=torch.float32, device="cpu")
    pool.allocate(40)  # the pool's first region: the next one starts at slot 40
    for cache in (KVCache.allocate(config, 100), pool.allocate(100)):
        origin = cache.offset  # 0 for a buffer of its own, 40 in the pool

        def flat(*args, cache=cache, origin=origin):  # the first written slot, then the static meta
            found = visibility(*args)
            assert found.base is (cache.base or cache) and found.meta[8] == origin
            return [found.at - origin, *found.meta[:8]]

        scratch = cache.window(60, 20)
        assert scratch.region is cache and scratch.origin == origin
        other = KVCache.allocate(config, 100)
        # FIM-like: prefix, shifted suffix, scratch; the write lands after the scratch span
        fim = [Span(cache, 0, 30), Span(cache, 40, 60, 9), Span(scratch, 0, 5)]
        assert flat(scratch, 5, 2, fim) == [65, 30, 40, 60, 9, 60, 0, 0, 0]
        # a repair: one span from 0 to the write slot
        assert flat(cache, 30, 3, [Span(cache, 0, 30)]) == [30, 0, 0, 0, 0, 0, 0, 0, 0]
        assert flat(cache, 30, 3, []) == [30, 0, 0, 0, 0, 30, 0, 0, 0]
        # windowed (a document longer than the context): the sink [0, 2) moved on by 20, the window
        # [22, 30), the suffix, the scratch; and a windowed repair
        windowed = [Span(cache, 0, 2, 20), Span(cache, 22, 30), Span(cache, 40, 60, 9), Span(scratch, 0, 5)]
        assert flat(scratch, 5, 1, windowed) == [65, 30, 40, 60, 9, 60, 22, 2, 20]
        assert flat(cache, 30, 3, [Span(cache, 0, 2, 20), Span(cache, 22, 30)]) == [30, 0, 0, 0, 0, 22, 0, 2, 20]
        assert visibility(scratch, 0, 1, [Span(other, 0, 10)]) is None  # another buffer
        assert visibility(scratch, 0, 1, [Span(cache, 3, 10, 2), Span(cache, 20, 30, 4)]) is None  # two suffixes
        # a FIM suffix that lands at its own positions (shift 0) is still the suffix
        assert flat(scratch, 0, 1, [Span(cache, 0, 10), Span(cache, 20, 30)]) == [60, 10, 20, 30, 0, 60, 0, 0, 0]
        assert visibility(scratch, 0, 1, [Span(cache, 0, 10), Span(cache, 20, 30), Span(cache, 40, 50, 3)]) is None
    assert visibility(cache, 30, 3, [Span(pool.allocate(10), 0, 10)]) is None  # another region of the pool
    alone = KVCache.allocate(config, 100)
    assert visibility(alone, 98, 2, [Span(alone, 0, 98)]) is None  # no free last slot for padding rows


def test_graph_modes_are_checked(template):
    with pytest.raises(ValueError, match="CUDA"):
        StaticForward(template.model.model, mode="graphs")
    with pytest.raises(ValueError, match="mode"):
        StaticForward(template.model.model, mode="fast")
    assert StaticForward(template.model.model).mode == "off"  # auto on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pooled,deferred", [(False, False), (True, False), (True, True)])
def test_cuda_graph_replay_matches_static_forward(tmp_path, pooled, deferred):
    from editkv.engine.kv_pool import KVPool

    loaded = load_model(make_checkpoint(tmp_path / "qwen2", "qwen2"), device="cuda", dtype="float32")
    template = Document(loaded.runner, loaded.tokenizer, TEXT, head=[0])
    static = StaticForward(loaded.runner.model, bucket=32, max_width=8, mode="static")
    graphs = StaticForward(loaded.runner.model, bucket=32, max_width=8, mode="graphs")
    want, want_keys = _edit_session(template, static)
    if pooled:  # the graphs read regions of one pool; the static forward read buffers of their own
        loaded.runner.use_pool(KVPool(loaded.runner.config, 4000, dtype=loaded.runner.dtype, device="cuda"))
    if deferred:  # a first session runs eagerly, its graphs are taken "when idle", a second replays them
        graphs.defer_captures = True
        docs = []
        first, _ = _edit_session(template, graphs, keep=docs)
        assert graphs.replays == 0 and graphs.deferred > 10 and graphs.pending_captures > 0
        assert [ids for _, ids, _ in first] == [ids for _, ids, _ in want]
        before = [d.cache.k.clone() for d in docs]
        assert graphs.capture_pending(limit=10_000) > 0 and graphs.pending_captures == 0
        assert all(torch.equal(b, d.cache.k) for b, d in zip(before, docs, strict=True))
    got, got_keys = _edit_session(template, graphs)
    loaded.runner.drop_pool()
    assert graphs.replays > 10 and graphs.captures > 0 and graphs.chains > 0
    assert graphs.replays > graphs.captures, "graphs should be replayed, not captured every time"
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
    for (g_logits, g_ids, _), (w_logits, w_ids, _) in zip(got, want, strict=True):
        torch.testing.assert_close(g_logits, w_logits, atol=1e-4, rtol=1e-4)
        assert g_ids == w_ids


# ---- chained greedy steps (StaticForward.chain) on the trained default model ----------------

DEFAULT_TEXT = (
    "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
    "        return [line.rstrip() for line in f]\n\n\n"
    "def write_lines(path, lines):\n    with open(path, 'w') as f:\n        for line in lines:\n"
    "            f.write(line + '\\n')\n\n\n"
    "def count_words(path):\n    words = 0\n    for line in read_lines(path):\n"
    "        words += len(line.split())\n    return words\n"
)


@pytest.fixture(scope="module")
def trained():
    return load_model(None)


@pytest.mark.parametrize("max_tokens,max_lines", [(64, 1), (13, None), (40, 3), (1, None)])
def test_chained_greedy_decoding_equals_step_by_step(trained, max_tokens, max_lines):
    """Chains stop mid-way on line ends and stop tokens, end on odd token budgets and start after
    token healing; their text, ids, stop reason and logprob are step-by-step decoding's."""
    model, tok = trained.runner, trained.tokenizer
    rules = StopRules(max_tokens=max_tokens, max_lines=max_lines)
    marks = ("def write_", "        for line in l", "    words = 0\n", "return [li")
    cursors = [DEFAULT_TEXT.index(s) + len(s) for s in marks]
    outputs = {}
    for chain_steps in (0, 4, 8):
        model.enable_graphs(bucket=64, max_width=8, mode="static", chain_steps=chain_steps)
        try:
            doc = Document(model, tok, DEFAULT_TEXT, head=doc_start_ids(tok, trained.config))
            got = []
            for cursor in cursors:
                for build in (left_to_right, fill_in_middle):
                    view = build(doc, cursor, max_new_tokens=max_tokens)
                    out = view.decode(rules=rules)
                    got.append((out.ids, out.text, out.stop_reason, round(out.logprob, 3), view.heal))
            outputs[chain_steps] = got
            assert (model.static.chains > 0) == (chain_steps > 0 and max_tokens > 1), model.static.chains
        finally:
            model.disable_graphs()
    assert outputs[4] == outputs[0] and outputs[8] == outputs[0]
    reasons = {r for _, _, r, _, _ in outputs[0]}
    assert max_tokens == 1 or len(reasons) > 1 or "lines" in reasons, reasons  # stops inside chains happened
    assert any(heal for *_, heal in outputs[0]), "one cursor should sit inside a token (healing)"


def test_ignore_eos_decodes_past_the_end_token(trained):
    """A completion that ends at the model's end token goes on with `ignore_eos` (fixed-length
    benchmarks), the same tokens up to there, chained or step by step."""
    model, tok = trained.runner, trained.tokenizer
    doc = Document(model, tok, DEFAULT_TEXT, head=doc_start_ids(tok, trained.config))
    stopped = None
    for cursor in range(len(DEFAULT_TEXT) - 1, 0, -7):
        view = fill_in_middle(doc, cursor, max_new_tokens=24)
        out = view.decode(rules=StopRules(max_tokens=24, max_lines=None))
        if out.stop_reason == "stop_token":
            stopped = (cursor, out)
            break
    assert stopped is not None, "the default model should end some FIM completion with its end token"
    cursor, out = stopped
    for chain_steps in (0, 8):
        model.enable_graphs(bucket=64, max_width=8, mode="static", chain_steps=chain_steps)
        try:
            view = fill_in_middle(doc, cursor, max_new_tokens=24)
            longer = view.decode(rules=StopRules(max_tokens=24, max_lines=None, ignore_eos=True))
        finally:
            model.disable_graphs()
        assert longer.stop_reason == "max_tokens" and len(longer.ids) == 24
        assert longer.ids[: len(out.ids)] == out.ids and longer.ids[len(out.ids)] in tok.stop_ids


# ---- speculative decoding on the device (StaticForward.lookup_chain) --------------------------


def _lookup_chain_run(model, view, buffer, steps, width):
    state = view.state()
    scratch, used = state.scratch, state.scratch_used
    first = int(state.first_logits.argmax())
    length = model.static.stage_source(buffer)
    return model.static.lookup_chain(first, state.next_position, scratch, used,
                                     [*state.context, Span(scratch, 0, used)], length, steps, width)


@pytest.mark.parametrize("width", [4, 8])
def test_lookup_chain_keeps_greedy_tokens_and_accepts_what_the_buffer_predicts(trained, width):
    """A search buffer that holds the greedy continuation (after the prompt's last tokens) is
    drafted from and accepted in full; one that holds nothing useful still gives greedy's
    tokens, one or more per verification."""
    model, tok = trained.runner, trained.tokenizer
    cursor = DEFAULT_TEXT.index("    words = 0\n") + 4
    steps = 3
    model.enable_graphs(bucket=64, max_width=16, mode="static")
    try:
        doc = Document(model, tok, DEFAULT_TEXT, head=doc_start_ids(tok, trained.config))
        view = left_to_right(doc, cursor, max_new_tokens=64)
        greedy = view.decode(rules=StopRules(max_tokens=1 + steps * width, max_lines=None, ignore_eos=True)).ids
        prompt = view.prompt_ids
        first = greedy[0]
        knowing = [-1, *prompt[-12:], *greedy, -1, *prompt, first]
        kept, logprobs, accepts = _lookup_chain_run(model, view, knowing, steps, width)
        assert accepts == [width - 1] * steps
        assert kept == greedy[1 : 1 + steps * width] and len(logprobs) == len(kept)
        assert all(lp <= 0 for lp in logprobs)
        unknowing = [-1, 7, 7, 7, -1, *prompt, first]
        kept, _, accepts = _lookup_chain_run(model, view, unknowing, steps, width)
        assert len(kept) == steps + sum(accepts) and kept == greedy[1 : 1 + len(kept)]
        # a chain that does not fit the scratch window is refused, not run
        state = view.state()
        assert model.static.lookup_chain(first, state.next_position, state.scratch, state.scratch_used,
                                         [*state.context, Span(state.scratch, 0, state.scratch_used)],
                                         10, 16, 16) is None
    finally:
        model.disable_graphs()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_beam_lanes_replay_graphs_and_find_the_eager_beams():
    """Beam search on graphs (its beams as lanes of the view's scratch, the Triton kernel's lane
    rule) finds the beams the eager batch cache finds, with the same log-probs."""
    from editkv.engine.decoding.beam import beam_search

    loaded = load_model(None, device="cuda", dtype="float32")
    model, tok = loaded.runner, loaded.tokenizer
    rules = StopRules(max_tokens=12, max_lines=1)
    marks = ("def write_", "        for line in l", "    words = 0\n", "return [li")
    cursors = [DEFAULT_TEXT.index(s) + len(s) for s in marks]
    found = {}
    for graphs in (False, True):
        static = StaticForward(model.model, bucket=64, max_width=8, mode="graphs") if graphs else None
        model.use_graphs(static)
        try:
            got = []
            for cursor in cursors:
                doc = Document(model, tok, DEFAULT_TEXT, head=doc_start_ids(tok, loaded.config))
                for build in (left_to_right, fill_in_middle):
                    view = build(doc, cursor, max_new_tokens=3 * rules.max_tokens)
                    result = beam_search(view.state(), 3, rules)
                    assert bool(result.stats.extra.get("beam_lanes")) == graphs
                    got.append([(b.text, b.logprob) for b in result.beams])
            found[graphs] = got
            if graphs:
                assert static.replays > static.captures > 0
        finally:
            model.disable_graphs()
    for lanes, batch in zip(found[True], found[False], strict=True):
        assert [t for t, _ in lanes] == [t for t, _ in batch]
        assert [p for _, p in lanes] == pytest.approx([p for _, p in batch], abs=2e-3)
