"""Superposed decoding's device steps: the same drafts as the host loop, its pieces against theirs."""

import random

import numpy as np
import pytest
import torch
from editkv.edit_cache.document import Document
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.decoding.superposed import NgramMixture, SuperposedParams, superposed_drafts
from editkv.engine.decoding.superposed_device import (
    LEFT,
    LENGTH,
    ORDERS,
    SuperposedBuffers,
    corpus_keys,
    device_corpus,
    ngram_probs,
    token_rules,
)
from editkv.engine.generate import Output, StopRules
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.ngram import NgramTable
from editkv.engine.prompting import doc_start_ids, healed_left_to_right_ids
from editkv.kernels.context_hash import context_hash_int

HOST = 0  # SuperposedParams.device_steps that keeps every step on the host
PROMPTS = ["def add(a, b):\n", "import os\nfor name in", "class Point:\n    def __init__(self, x, y):\n        self."]


def _both(loaded, make_state, k, rules, params, **kwargs):
    """(host drafts, device drafts, the device run's static forward) of one request, each from a
    fresh state; the static forward's `eager` counts the decoding's eager forwards only."""
    model = loaded.runner
    out = []
    for steps in (HOST, params.device_steps):
        model.enable_graphs(bucket=256, max_width=16, mode="static")
        try:
            p = SuperposedParams(**{**params.__dict__, "device_steps": steps})
            state = make_state()
            static, eager = model.static, model.static.eager  # a prefill wider than 16 ran eagerly
            out.append(superposed_drafts(state, k, rules, params=p, **kwargs))
            static.eager -= eager  # what decoding passed back to the eager path
        finally:
            model.disable_graphs()
    return out[0], out[1], static


def _same(host, device):
    assert [d.ids for d in device.drafts] == [d.ids for d in host.drafts]
    assert [d.text for d in device.drafts] == [d.text for d in host.drafts]
    assert [d.stop_reason for d in device.drafts] == [d.stop_reason for d in host.drafts]
    # the device takes log-probabilities from logit_summary, the host from log_softmax: at T = 0.06 the
    # fp32 rounding of logits / T shows in the fifth decimal, and adds up over a draft's steps
    assert [d.score for d in device.drafts] == pytest.approx([d.score for d in host.drafts], abs=2e-3)


def _corpus_from(rng, vocab, n=3000):
    return NgramTable.build(np.array([rng.randrange(vocab) for _ in range(n)], dtype=np.int64), max_order=4)


def test_corpus_keys_are_the_table_hash():
    rng = random.Random(0)
    ctx = torch.tensor([[rng.randrange(-7, 16000) if rng.random() > 0.1 else -7 for _ in range(ORDERS)]
                        for _ in range(50)])
    keys = corpus_keys(ctx, max_order=4)
    for i in range(len(ctx)):
        row = ctx[i].tolist()
        for c in range(1, 4):
            assert keys[i, c - 1] == context_hash_int(tuple(row[ORDERS - c :])) + (c << 50)
        assert (keys[i, 3:] == -1).all()  # orders the table does not have


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ngram_probs_are_the_host_mixture(seed):
    """Workspace counts over the staged stream and corpus lookups give NgramMixture's p_ng."""
    rng = random.Random(seed)
    vocab = 12  # a small vocabulary: contexts repeat, every order is seen
    index = NgramIndex()
    for d in range(3):
        index.add(f"doc{d}", [rng.randrange(vocab) for _ in range(rng.randrange(50, 400))])
    corpus = _corpus_from(rng, vocab)
    params = SuperposedParams()
    mixture = NgramMixture(index, corpus, params.lambdas, params.workspace_weight)
    k, m = 3, 4
    buf = SuperposedBuffers(k, m, 32, vocab, torch.device("cpu"))
    buf.stage_stream(index)
    dc = device_corpus(corpus, torch.device("cpu"))
    seen = 0
    for _ in range(20):
        left = [rng.randrange(vocab) for _ in range(rng.randrange(0, 3))]
        length = rng.randrange(0, 5)
        drafts = [([rng.randrange(vocab) for _ in range(length)], 0.0, True, 0) for _ in range(k)]
        buf.stage(drafts, left, {"length": length, "committed": 0, "budget": 32, "position": 0, "slot": 0,
                                 "left": len(left), "max_tokens": 32})
        assert int(buf.meta[LENGTH]) == length and int(buf.meta[LEFT]) == len(left)
        cand = torch.tensor([rng.sample(range(vocab), m) for _ in range(k)])  # each draft its own
        got = ngram_probs(buf, cand, dc, params.lambdas, params.workspace_weight)
        for i, (ids, _, _, _) in enumerate(drafts):
            want = mixture((left + ids)[-ORDERS:], cand[i].tolist())
            assert got[i].tolist() == pytest.approx(want, abs=1e-12)
        seen += int((got > 0).sum())
    assert seen > 50  # not vacuous: most contexts were seen


def test_stream_keeps_recent_documents_whole():
    index = NgramIndex()
    index.add("old", list(range(100, 160)))
    index.add("new", list(range(10, 20)))
    buf = SuperposedBuffers(2, 2, 16, 200, torch.device("cpu"))
    buf.stage_stream(index)
    stream = buf.stream[ORDERS : ORDERS + buf.stream_length].tolist()
    assert stream[:11] == [*range(10, 20), -1] and stream[11:72] == [*range(100, 160), -1]
    assert set(stream[72:]) == {-1} and buf.stream_length == 1024


def test_token_rules_classes(default):
    from editkv.engine.healing import healer_for

    tok = default.tokenizer
    rules = token_rules(Output(tok, StopRules(max_lines=1), b""), default.config.vocab_size, torch.device("cpu"))
    by_bytes = {b: t for t, b in healer_for(tok).token_bytes.items()}
    nl = by_bytes[b"\n"]
    stop = next(iter(tok.stop_ids))
    # a newline and a stop id both leave the draft's text as it was: one class; other line ends
    # share a class exactly when they share the bytes before their newline
    assert rules.finish_class[nl] == rules.finish_class[stop] == 0
    before = {}
    for b, t in by_bytes.items():
        if b"\n" in b and t not in tok.stop_ids:
            before.setdefault(int(rules.finish_class[t]), set()).add(b[: b.index(b"\n")])
    assert len(before) > 20 and all(len(texts) == 1 for texts in before.values())
    closing = by_bytes[b"))\n"]
    assert rules.finish_class[closing] > 0 and rules.content_before_end[closing]
    word = tok.encode("return")[0]
    assert rules.finish_class[word] == -1 and rules.content[word] and not rules.content[nl]
    assert rules.is_stop[stop] and not rules.is_stop[nl]
    assert token_rules(Output(tok, StopRules(max_lines=2), b""), default.config.vocab_size, torch.device("cpu")) is None
    free = token_rules(Output(tok, StopRules(max_lines=None), b""), default.config.vocab_size, torch.device("cpu"))
    assert free.finish_class[nl] == -1 and free.finish_class[stop] == 0


PARAMS = (SuperposedParams(reset_every=3, device_steps=2), SuperposedParams(finish_ratio=None),
          SuperposedParams(alpha=0.0, device_steps=5, keep_empty=True, device_in_flight=1))


@pytest.mark.parametrize("max_lines", [1, None])
def test_one_draft_on_the_device_is_the_host_loop(tiny, max_lines):
    """k = 1 on a tiny random model: chains of device steps return the host loop's draft."""
    tok, cfg = tiny.tokenizer, tiny.config
    corpus = _corpus_from(random.Random(0), cfg.vocab_size)
    rules = StopRules(max_tokens=20, max_lines=max_lines)
    for prefix in PROMPTS:
        index = NgramIndex()
        index.add("doc", tok.encode(prefix * 3))
        for params in PARAMS:
            def make():
                doc = Document(tiny.runner, tok, prefix, head=doc_start_ids(tok, cfg))  # noqa: B023
                return left_to_right(doc, len(prefix)).state()  # noqa: B023

            host, device, static = _both(tiny, make, 1, rules, params, ngram_index=index, corpus=corpus)
            _same(host, device)
            assert device.stats.steps == host.stats.steps and device.stats.device_steps >= device.stats.steps > 0


CODE = ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
        "def write(path, text):\n    with open(path, 'w') as f:\n        f.write(text)\n\n\n"
        "class Store:\n    def __init__(self, root):\n        self.root = root\n\n"
        "    def path(self, name):\n        return os.path.join(self.root, name)\n")


@pytest.mark.parametrize("max_lines", [1, None])
@pytest.mark.parametrize("k", [3, 4])
def test_device_drafts_equal_host_drafts(default, k, max_lines):
    """Chains of device steps (resets between them, the latency budget, n-grams from the
    workspace and the shipped corpus) return the host loop's drafts, token for token, wherever
    the host merged no two drafts of equal text (the one documented difference)."""
    tok, model = default.tokenizer, default.runner
    corpus = NgramTable.load(DEFAULT_MODEL_DIR / "ngram.npz")
    rules = StopRules(max_tokens=20, max_lines=max_lines)
    cursors = [CODE.index(s) + len(s) for s in ("with open(path) as f:\n        ", "return os.", "def ", "self.")]
    compared = merged = steps = resets = 0
    for cursor in cursors:
        for params in PARAMS:
            def make():
                doc = Document(model, tok, CODE, head=doc_start_ids(tok, default.config))
                index.add("doc", doc.ids)  # noqa: B023
                return left_to_right(doc, cursor).state()  # noqa: B023

            index = NgramIndex()
            host, device, static = _both(default, make, k, rules, params, ngram_index=index, corpus=corpus)
            assert device.stats.device_steps > 0 and static.superposed_chains > 0 and static.eager == 0
            assert len({d.text.rstrip() for d in device.drafts}) == len(device.drafts)
            if host.stats.merged:
                merged += 1
                continue
            _same(host, device)
            assert device.stats.steps == host.stats.steps and device.stats.resets == host.stats.resets
            compared += 1
            steps += device.stats.steps
            resets += device.stats.resets
    assert compared >= 8 and steps > 50 and resets > 0, (compared, merged, steps, resets)


@pytest.mark.parametrize("view", ["l2r", "fim"])
def test_default_model_views_on_the_device(default, view):
    """The server's path: a document's view, healing first on the host, then device chains with
    the document's n-grams and the shipped corpus table."""
    tok, model = default.tokenizer, default.runner
    text = ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
            "def write(path, text):\n    with open(path, 'w') as f:\n        \n")
    corpus = NgramTable.load(DEFAULT_MODEL_DIR / "ngram.npz")
    make_view = left_to_right if view == "l2r" else fill_in_middle
    rules = StopRules(max_tokens=24, max_lines=1)
    for cursor in (len(text) - 1, text.index("with open(path, 'w')") + 5, text.index("return f") + 3):
        doc = Document(model, tok, text, head=doc_start_ids(tok, default.config))
        index = NgramIndex()
        index.add("doc", doc.ids)

        def make():
            return make_view(doc, cursor).state()  # noqa: B023

        host, device, static = _both(default, make, 3, rules, SuperposedParams(), ngram_index=index, corpus=corpus)
        _same(host, device)
        assert len(device.drafts) == 3 and static.superposed_chains > 0 and static.eager == 0


def test_healing_steps_run_on_the_device(tiny):
    """Drafts still spelling out the healed text take their candidates from its healing rows."""
    tok, cfg = tiny.tokenizer, tiny.config
    text = "import os\nfor name in os.li"
    assert healed_left_to_right_ids(tok, cfg, text)[1]

    def make():
        doc = Document(tiny.runner, tok, text, head=doc_start_ids(tok, cfg))
        view = left_to_right(doc, len(text))
        assert view.state().heal
        return view.state()

    host, device, _ = _both(tiny, make, 1, StopRules(max_tokens=12, max_lines=1), SuperposedParams())
    _same(host, device)  # one draft: no text merges on the host, the drafts must be equal
    # every forward but resets ran in a device chain, the first ones while spelling the healed text
    assert device.stats.forwards == device.stats.steps + device.stats.resets
    assert device.stats.device_steps >= device.stats.steps > 0


def test_cancel_between_chains(tiny):
    tok, cfg = tiny.tokenizer, tiny.config
    model = tiny.runner
    model.enable_graphs(bucket=256, max_width=16, mode="static")
    calls = []
    try:
        rules = StopRules(max_tokens=20, max_lines=None, should_stop=lambda: calls.append(1) or len(calls) > 1)
        doc = Document(model, tok, PROMPTS[2], head=doc_start_ids(tok, cfg))
        state = left_to_right(doc, len(PROMPTS[2])).state()
        out = superposed_drafts(state, 3, rules, params=SuperposedParams(device_steps=3, finish_ratio=None))
    finally:
        model.disable_graphs()
    assert out.stats.device_steps == 3  # one chain, then the cancel
    assert out.drafts and all(d.stop_reason in ("cancelled", "stop_token", "max_tokens") for d in out.drafts)
    assert any(d.stop_reason == "cancelled" and len(d.ids) == 3 for d in out.drafts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_chains_replay_graphs():
    """On CUDA each device step is one replayed graph (the forward with the selection); its drafts
    are the host loop's (fp32)."""
    loaded = load_model(None, device="cuda", dtype="float32")
    tok, model = loaded.tokenizer, loaded.runner
    text = ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n\n"
            "def write(path, text):\n    with open(path, 'w') as f:\n        \n")
    corpus = NgramTable.load(DEFAULT_MODEL_DIR / "ngram.npz")
    rules = StopRules(max_tokens=24, max_lines=1)
    graphs = model.static
    out = []
    for steps in (HOST, 4, 4):
        doc = Document(model, tok, text, head=doc_start_ids(tok, loaded.config))
        index = NgramIndex()
        index.add("doc", doc.ids)
        out.append(superposed_drafts(fill_in_middle(doc, len(text) - 1).state(), 3, rules, ngram_index=index,
                                     corpus=corpus, params=SuperposedParams(device_steps=steps)))
    _same(out[0], out[1])
    _same(out[0], out[2])
    assert graphs.superposed_chains > 0 and graphs.replays > graphs.captures


def test_heal_tables_rows(default):
    """One masked row per byte offset into the healed text (the healer's allowed tokens), every
    token allowed past it; a token adds content only past the healed bytes; 32 bytes and more
    leave the request to the host loop."""
    from editkv.engine.decoding.superposed_device import heal_rows, heal_tables
    from editkv.engine.healing import healer_for

    tok = default.tokenizer
    rules = token_rules(Output(tok, StopRules(max_lines=1), b""), default.config.vocab_size, torch.device("cpu"))
    healer = healer_for(tok)
    heal = b"    ret"
    rows = heal_rows(heal)
    assert rows == 8 and heal_rows(b" " * 31) == 32 and heal_rows(b" " * 32) is None
    masks, gain = heal_tables(rules, heal, rows)
    for o in range(len(heal)):
        assert set(torch.nonzero(masks[o]).flatten().tolist()) == set(healer.allowed(heal[o:]))
    assert masks[len(heal) :].all() and torch.equal(gain[-1], rules.gain)
    by_bytes = {b: t for t, b in healer.token_bytes.items()}
    spaces, ret, word = by_bytes[b"    "], by_bytes[b"ret"], by_bytes[b"return"]
    assert masks[0, spaces] and not gain[0, spaces]  # spells healed bytes only
    assert masks[4, ret] and not gain[4, ret] and masks[4, word] and gain[4, word]  # "urn" is past them
    assert not masks[0, word] and not masks[5, ret]
    buf = SuperposedBuffers(3, 3, 16, default.config.vocab_size, torch.device("cpu"))
    assert not buf.stage_heal(rules, b" " * 40) and buf.stage_heal(rules, heal) and buf.rows == 8



def test_chains_have_no_clock_and_no_text_rule(default):
    """The tables `token_rules` derives from the drafts' Output hold neither the multi-line time
    limit nor `stop_text`: chains run to the token limit past a deadline (as before there was
    one), and `stop_text` keeps a request on the host loop."""
    tok, model = default.tokenizer, default.runner
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    runs = {}
    for name, deadline, stop_text in (("free", None, None), ("passed", 0.0, None),
                                      ("text", None, lambda text: 3 if len(text) >= 3 else None)):
        model.enable_graphs(bucket=256, max_width=16, mode="static")
        try:
            doc = Document(model, tok, text, head=doc_start_ids(tok, default.config))
            runs[name] = superposed_drafts(left_to_right(doc, len(text)).state(), 3,
                                           StopRules(max_tokens=24, max_lines=None, lines_until=deadline),
                                           stop_text=stop_text)
        finally:
            model.disable_graphs()
    _same(runs["free"], runs["passed"])
    assert any("\n" in d.text.strip() for d in runs["passed"].drafts)  # where the host loop would have cut
    assert runs["passed"].stats.device_steps > 0 and runs["text"].stats.device_steps == 0
    assert all(len(d.text) <= 3 for d in runs["text"].drafts)
