"""ModelBackend's decoding strategies through the real path: documents -> edit_cache views -> engine.

The trained default model on realedits contexts: one-draft requests give the same text with
n-gram speculation on and off (speculation is lossless), several drafts come from superposed
decoding and are distinct, every request reports its counters, and the workspace n-gram
index follows open / change / close within its bound.
"""

import gzip
import json
import math
from pathlib import Path

import pytest
from editkv.edit_cache.positions import line_starts, to_position
from editkv.engine.decoding.adadec import AdaDecConfig, adadec_decode
from editkv.engine.loading import load_model
from editkv.lsp_server.backend import CompletionRequest, DecodingOptions, ModelBackend
from editkv.lsp_server.settings import Settings
from helpers import make_checkpoint

DATA = Path(__file__).resolve().parents[3] / "shared" / "realedits" / "dev.jsonl.gz"


@pytest.fixture(scope="module")
def trained():
    return load_model(None)


def _contexts(n, max_file_chars=6000):
    """(uri, text with the target line's rest deleted, cursor, the deleted text) from realedits."""
    if not DATA.exists():
        pytest.skip(f"realedits data not found at {DATA}")
    out = []
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if len(rec["after"]) > max_file_chars:
                continue
            target = rec["targets"][0]
            text = rec["after"]
            cursor = line_starts(text)[target["line"]] + len(target["prefix"])
            deleted = text[:cursor] + text[cursor + len(target["expected"]):]
            out.append((f"file:///realedits/{i}.py", deleted, cursor, target["expected"]))
            if len(out) >= n:
                break
    return out


def _request(uri, text, cursor, **kw):
    pos = to_position(text, cursor)
    return CompletionRequest(uri, pos.line, pos.character, **kw)


def _type(backend, uri, text, cursor, typed):
    """Insert `typed` at `cursor` as an editor would (one change per keystroke); the new text and cursor."""
    for ch in typed:
        pos = to_position(text, cursor)
        from editkv.edit_cache.positions import Range

        backend.change(uri, [(Range(pos, pos), ch)])
        text, cursor = text[:cursor] + ch + text[cursor:], cursor + 1
    return text, cursor


def _same_text_with_and_without_speculation(trained, n):
    fast = ModelBackend(trained)
    plain = ModelBackend(trained, decoding=DecodingOptions(speculation=False, superposed=False))
    assert fast.decoding.speculation and not fast.decoding.adadec  # the defaults
    contexts = _contexts(n)
    for backend in (fast, plain):
        for uri, text, _, _ in contexts:
            backend.open(uri, text)
    accepted = multi_line = 0
    for i, (uri, text, cursor, expected) in enumerate(contexts):
        typed = expected[: i % 3]  # a few keystrokes first: PIE repair and index updates on the way
        for backend in (fast, plain):
            now, at = _type(backend, uri, text, cursor, typed)
        for view in ("l2r", "fim"):
            # (no time limit on several lines: it would cut the slower of the two sooner)
            kw = {"max_tokens": 32, "max_lines": None if i % 2 else 1, "view": view, "multiline_ms": 0}
            a = fast.complete(_request(uri, now, at, **kw))
            b = plain.complete(_request(uri, now, at, **kw))
            assert [(d.text, d.stop_reason) for d in a.drafts] == [(d.text, d.stop_reason) for d in b.drafts], \
                (uri, view)
            assert a.drafts[0].score == pytest.approx(b.drafts[0].score, abs=1e-3)
            assert a.stats["strategy"] == "speculative" and b.stats["strategy"] == "greedy"
            s = a.stats
            assert 0 <= s["spec_accepted"] <= s["spec_drafted"] and s["spec_forwards"] == s["spec_bonus"]
            assert s["spec_forwards"] <= b.stats["forwards"] and s["view"] == view
            accepted += s["spec_accepted"]
            multi_line += "\n" in a.drafts[0].text
        assert fast.index.docs[uri].tolist() == fast.cache.get(uri).ids  # the index followed the edits
    assert accepted > 0 and multi_line > 0
    return fast


def test_speculation_on_and_off_give_the_same_text(trained):
    fast = _same_text_with_and_without_speculation(trained, 4)
    recent = 0
    for uri, _, cursor, _ in _contexts(4):  # asked again: the suggestion just shown is a draft
        request = _request(uri, fast.text(uri), cursor, max_tokens=16, max_lines=None)
        first, again = fast.complete(request), fast.complete(request)
        assert again.drafts[0].text == first.drafts[0].text
        recent += again.stats["spec_accepted_by_source"].get("recent", 0)
    assert recent > 0


@pytest.mark.slow
def test_speculation_on_and_off_give_the_same_text_many_contexts(trained):
    _same_text_with_and_without_speculation(trained, 16)


def test_several_drafts_come_from_superposed_decoding(trained):
    backend = ModelBackend(trained)
    assert backend.corpus is not None  # the default model ships its corpus n-grams
    seen_three = 0
    for uri, text, cursor, _ in _contexts(4):
        backend.open(uri, text)
        result = backend.complete(_request(uri, text, cursor, max_tokens=24, num_drafts=3))
        texts = [d.text for d in result.drafts]
        assert 1 <= len(texts) <= 3 and len({t.rstrip() for t in texts}) == len(texts)
        assert all(t.strip() and "\n" not in t for t in texts)
        scores = [d.score for d in result.drafts]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(x) for x in scores)
        s = result.stats
        assert s["strategy"] == "superposed" and s["superposed_steps"] >= 1 and s["forwards"] >= s["superposed_steps"]
        assert s["superposed_device_steps"] == 0  # the CPU scores every step on the host (no static forward)
        seen_three += len(texts) == 3
        # shown suggestions become drafts for the next one-draft request
        shown = [trained.tokenizer.decode(r.ids.tolist()) for r in list(backend.speculator.recent)[-len(texts):]]
        assert all(t in d for t, d in zip(texts, shown, strict=True))
    assert seen_three >= 3
    # the baseline the switch falls back to: one greedy decode per top first token
    backend.configure(budget_bytes=None, options=backend.cache.options,
                      decoding=DecodingOptions(superposed=False))
    result = backend.complete(_request(uri, text, cursor, max_tokens=24, num_drafts=3))
    assert result.stats["strategy"] == "top_first" and len(result.drafts) >= 2


def test_several_drafts_by_beam_search_when_it_is_on(trained):
    """The beam search setting: the dropdown's drafts are beams (distinct, non-empty, best first),
    not superposed decoding's."""
    beam = ModelBackend(trained, decoding=DecodingOptions(beam=True))
    superposed = ModelBackend(trained)
    seen_several = differ = 0
    for uri, text, cursor, _ in _contexts(4):
        drafts = {}
        for name, backend in (("beam", beam), ("superposed", superposed)):
            backend.open(uri, text)
            result = backend.complete(_request(uri, text, cursor, max_tokens=24, num_drafts=3))
            assert result.stats["strategy"] == name
            drafts[name] = [d.text for d in result.drafts]
            scores = [d.score for d in result.drafts]
            assert scores == sorted(scores, reverse=True)
        texts = drafts["beam"]
        assert 1 <= len(texts) <= 3 and len(set(texts)) == len(texts) and all(t.strip() for t in texts)
        seen_several += len(texts) > 1
        differ += texts != drafts["superposed"]
    assert seen_several >= 2 and differ >= 1


def test_beam_search_by_default_only_where_graphs_replay(trained):
    """Unset, the beam search setting follows the forwards: superposed decoding on the CPU (no
    graphs; the static forward run eagerly does not count), the setting itself when given."""

    assert ModelBackend(trained).beam is False
    assert ModelBackend(trained, decoding=DecodingOptions(beam=True)).beam is True
    trained.runner.enable_graphs(mode="static")
    try:
        assert ModelBackend(trained).beam is False
    finally:
        trained.runner.disable_graphs()


def test_beam_search_runs_on_the_static_forward_with_the_same_drafts(trained):
    """With the graph path's static forward (as on a GPU), the beams are lanes of the view's
    scratch, one static forward per step: the same drafts as the eager batch cache."""

    eager = ModelBackend(trained, decoding=DecodingOptions(beam=True))
    answers = {}
    for uri, text, cursor, _ in _contexts(3):
        eager.open(uri, text)
        result = eager.complete(_request(uri, text, cursor, max_tokens=16, num_drafts=3))
        assert result.stats["beam_lanes"] is False
        answers[uri] = [(d.text, d.score) for d in result.drafts]
    static = trained.runner.enable_graphs(mode="static")
    try:
        backend = ModelBackend(trained, decoding=DecodingOptions(beam=True))
        for uri, text, cursor, _ in _contexts(3):
            backend.open(uri, text)
            before = static.handled
            result = backend.complete(_request(uri, text, cursor, max_tokens=16, num_drafts=3))
            assert result.stats["beam_lanes"] is True and static.handled - before >= result.stats["forwards"]
            got = [(d.text, d.score) for d in result.drafts]
            assert [t for t, _ in got] == [t for t, _ in answers[uri]]
            assert [s for _, s in got] == pytest.approx([s for _, s in answers[uri]], abs=1e-3)
    finally:
        trained.runner.disable_graphs()


def test_a_multiline_suggestion_ends_at_a_line_end_past_its_time_limit(trained):
    """`multiline_ms`: a multi-line request past its limit ends at the next line end with text
    before it (1 ms: always past by then); 0 is no limit; one-line requests never change."""
    backend = ModelBackend(trained)
    shorter = 0
    for uri, text, cursor, _ in _contexts(6):
        backend.open(uri, text)
        whole = backend.complete(_request(uri, text, cursor, max_tokens=40, max_lines=8, multiline_ms=0))
        quick = backend.complete(_request(uri, text, cursor, max_tokens=40, max_lines=8, multiline_ms=1))
        assert whole.drafts and quick.drafts
        full, cut = whole.drafts[0].text, quick.drafts[0].text
        assert full.startswith(cut) and "\n" not in cut.strip("\n")  # one line (of text) at most
        shorter += len(cut) < len(full)
        one = [backend.complete(_request(uri, text, cursor, max_tokens=40, max_lines=1, multiline_ms=ms)).drafts[0].text
               for ms in (0, 1)]
        assert one[0] == one[1]
    assert shorter >= 2


def test_adadec_option_composes_with_speculation(trained):
    uri, text, cursor, _ = _contexts(1)[0]
    backend = ModelBackend(trained, decoding=DecodingOptions(adadec=True))
    backend.open(uri, text)
    result = backend.complete(_request(uri, text, cursor, max_tokens=24, view="l2r"))
    s = result.stats
    assert s["strategy"] == "speculative+adadec" and {"adadec_gate_fires", "adadec_extra_forwards"} <= set(s)
    assert s["forwards"] == s["spec_forwards"] + s["adadec_extra_forwards"]
    # the same text as AdaDec alone on the same view
    from editkv.edit_cache.views import left_to_right

    view = left_to_right(backend.cache.prepare(uri)[0], cursor, max_new_tokens=24)
    from editkv.engine.generate import StopRules

    ref = adadec_decode(view.state(), AdaDecConfig.for_model(None), StopRules(max_tokens=24, max_lines=1))
    assert result.drafts[0].text == ref.text
    alone = ModelBackend(trained, decoding=DecodingOptions(speculation=False, adadec=True))
    alone.open(uri, text)
    out = alone.complete(_request(uri, text, cursor, max_tokens=24, view="l2r"))
    assert out.stats["strategy"] == "adadec" and out.drafts[0].text == ref.text


def test_adadec_without_a_calibration_is_reported_and_serving_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    backend = ModelBackend(tiny, decoding=DecodingOptions(adadec=True))
    assert backend.adadec is None and "editkv calibrate" in backend.adadec_problem
    backend.open("file:///a.py", "def add(a, b):\n    return a + b\n")
    result = backend.complete(CompletionRequest("file:///a.py", 1, 4, max_tokens=4))
    assert result.stats["strategy"] == "speculative" and result.stats["adadec"].startswith("unavailable")


def test_workspace_index_follows_documents_within_its_bound(tmp_path):
    from editkv.edit_cache.positions import Position, Range

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    backend = ModelBackend(tiny, ngram_tokens=60)
    a = "def add(a, b):\n    return a + b\n"
    backend.open("file:///a.py", a)
    backend.open("file:///b.py", "import os\nfor name in os.listdir('.'):\n    print(name)\n")
    backend.change("file:///a.py", [(Range(Position(1, 11), Position(1, 16)), "a * b"), (None, a + "x = 1\n")])
    assert backend.index.docs["file:///a.py"].tolist() == backend.cache.get("file:///a.py").ids
    backend.open("file:///c.py", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 2)
    assert backend.index.num_tokens <= 60 and "file:///a.py" not in backend.index.docs  # least recently used
    backend.complete(CompletionRequest("file:///a.py", 0, 4, max_tokens=2, num_drafts=2))
    assert "file:///a.py" in backend.index.docs  # re-indexed for the request
    backend.close("file:///a.py")
    assert "file:///a.py" not in backend.index.docs


def test_decoding_settings_reach_the_backend(trained):
    from editkv.lsp_server.worker import cache_options

    backend = ModelBackend(trained)
    settings = Settings(speculation=False, superposed=False, adadec=True)
    backend.configure(**cache_options(settings))
    assert backend.decoding == DecodingOptions(speculation=False, superposed=False, adadec=True)
    assert backend.adadec is not None and math.isfinite(backend.adadec.tau)  # the default model ships one


def test_cache_options_tuned_for_the_model_unless_the_user_sets_them(trained, tmp_path):
    from editkv.edit_cache.document import RECOMMENDED
    from editkv.lsp_server.worker import cache_options

    backend = ModelBackend(trained, **cache_options(Settings()))
    assert trained.cache["fim_fresh_suffix"] == 0  # engine/default_model/editkv.json
    assert backend.cache.options.fim_fresh_suffix == 0
    backend.open("file:///a.py", "def add(a, b):\n    return a + b\n")
    backend.configure(**cache_options(Settings(fim_fresh_suffix=16, refresh_near_cursor=32)))
    doc = backend.cache.get("file:///a.py")
    assert doc.options.fim_fresh_suffix == 16 and doc.options.refresh_near_cursor == 32
    backend.configure(**cache_options(Settings()))  # cleared: the model's again
    assert doc.options.fim_fresh_suffix == 0
    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))  # no editkv.json: a real model's values
    assert ModelBackend(tiny).cache.options.fim_fresh_suffix == RECOMMENDED["fim_fresh_suffix"]


def test_idle_refresh_makes_stale_tokens_exact_most_recent_document_first(tmp_path):
    from editkv.edit_cache.positions import Position, Range
    from editkv.edit_cache.views import left_to_right
    from editkv.engine.generate import prefill

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    # views that refresh near the cursor would hide the staleness this test measures
    backend = ModelBackend(tiny, tuned={"refresh_near_cursor": 0})
    text = "def add(a, b):\n    return a + b\n" * 3  # with a view's room, within the model's context
    for uri in ("file:///a.py", "file:///b.py"):
        backend.open(uri, text)
        backend.cache.prepare(uri)
        backend.change(uri, [(Range(Position(0, 4), Position(0, 7)), "plus")])
    a, b = backend.cache.get("file:///a.py"), backend.cache.get("file:///b.py")
    backend.cache.prepare("file:///a.py")  # repaired by PIE: the suffix after the edit is stale
    assert a.num_stale > 0 and b.pending_edits
    cursor = len(a.text) - 3

    def error():
        view = left_to_right(a, cursor, max_new_tokens=4)
        assert len(view.prompt_ids) + view.scratch.capacity < tiny.config.max_position_embeddings
        exact = prefill(tiny.runner, view.prompt_ids, tiny.runner.new_cache(len(view.prompt_ids)))
        return (view.first_logits - exact).abs().max().item()

    assert error() > 1e-3  # stale keys: close to a fresh prefill, not equal
    # a was used last (prepared after b's change): it goes first, a chunk at a time
    assert backend.refresh_idle(8) == 8 and a.num_stale > 0 and b.pending_edits
    while a.num_stale:
        assert backend.refresh_idle(8) > 0
    assert backend.refresh_idle(8) > 0 and not b.pending_edits  # then b: repaired, then refreshed
    while backend.refresh_idle(8):
        pass
    assert a.num_stale == b.num_stale == 0 and backend.refresh_idle(8) == 0
    assert error() < 1e-4  # refreshed: what a fresh prefill of the text gives


def test_recompute_mode_does_no_background_work(tmp_path):
    """The baseline drops a document's KV before every request, so idle work would only burn
    the time between keystrokes (and land in the baseline's token counts)."""
    from editkv.edit_cache.positions import Position, Range
    from editkv.lsp_server.worker import cache_options

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    text = "def add(a, b):\n    return a + b\n" * 3
    for mode, busy in (("pie", True), ("recompute", False)):
        backend = ModelBackend(tiny, **cache_options(Settings(cache_mode=mode)))
        backend.open("file:///a.py", text)
        backend.cache.prepare("file:///a.py")
        backend.change("file:///a.py", [(Range(Position(0, 4), Position(0, 7)), "plus")])
        backend.cache.prepare("file:///a.py")
        assert backend.cache.get("file:///a.py").num_stale > 0
        assert backend.urgent_work() is False or busy
        assert (backend.refresh_idle(8) > 0) is busy, mode


def _big_backend(tmp_path, **settings):
    from editkv.lsp_server.settings import Settings
    from editkv.lsp_server.worker import cache_options

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama", max_position_embeddings=512))
    # (no answer window: on the CPU it answers a big file's first requests; test_answer_window.py)
    backend = ModelBackend(tiny, **cache_options(Settings(window_tokens=0, **settings)))
    text = "".join(f"def f{i}(a, b):\n    return a * {i} + b\n\n" for i in range(120))  # ~2,500 tokens
    backend.open("file:///big.py", text)
    return backend, text


def test_keystrokes_near_the_top_of_a_big_file_encode_the_edit_only(tmp_path):
    """Default settings except a tiny stale budget: however many tokens are stale, a request
    re-encodes only what the keystroke changed; nothing moves but the stretch the gap crosses."""
    from editkv.edit_cache.positions import Position, Range

    backend, text = _big_backend(tmp_path, stale_budget=16)
    uri = "file:///big.py"
    end = backend.complete(_request(uri, text, len(text) - 2, max_tokens=4))
    doc = backend.cache.get(uri)
    assert end.stats["document_encoded_tokens"] >= len(doc.ids) - 20  # the first request reads the text before it
    backend.change(uri, [(Range(Position(1, 0), Position(1, 0)), "\n")])
    text = text.replace("\n", "\n\n", 1)
    cursor = text.index("\n") + 1
    first = backend.complete(_request(uri, text, cursor, max_tokens=4))
    assert first.stats["slots_moved"] > 1000  # the gap moves to the edit once
    moved = []
    for ch in "# a comment typed at the top":
        text, cursor = _type(backend, uri, text, cursor, ch)
        result = backend.complete(_request(uri, text, cursor, max_tokens=4))
        assert result.stats["document_encoded_tokens"] <= 4, result.stats  # the edit, never the stale suffix
        moved.append(result.stats["slots_moved"])
        assert result.stats["stale_tokens"] > 16  # over the budget, and still not re-encoded here
    assert max(moved) <= 2 and backend.urgent_work()
    while backend.refresh_idle(256, lambda: False):
        pass
    assert doc.num_stale == 0 and not backend.urgent_work()


def test_a_big_file_is_encoded_up_to_the_cursor_first_and_the_rest_in_the_background(tmp_path):
    backend, text = _big_backend(tmp_path)
    uri = "file:///big.py"
    doc = backend.cache.get(uri)
    cursor = text.index("def f10(")
    needed = doc.tokens.first_token_at_or_after(cursor)
    result = backend.complete(_request(uri, text, cursor, max_tokens=4))
    assert result.drafts and needed - 40 <= result.stats["document_encoded_tokens"] <= needed + 1
    assert result.stats["unencoded_tokens"] == len(doc.ids) - doc.frontier > 1000
    assert backend.urgent_work()
    # background chunks stop as soon as work comes (here: after the first poll)
    polls = []
    done = backend.refresh_idle(256, lambda: len(polls) > 0 or polls.append(1))
    assert 0 < done < 256
    while backend.refresh_idle(256, lambda: False):
        pass
    assert doc.num_unencoded == 0 and not backend.urgent_work()
    # the same request on a fully encoded cache: the same suggestion
    assert backend.complete(_request(uri, text, cursor, max_tokens=4)).drafts[0].text == result.drafts[0].text


def test_a_cancelled_request_stops_encoding_a_big_file_and_the_next_one_goes_on(tmp_path):
    backend, text = _big_backend(tmp_path, max_tokens=4)
    backend.cache.options.prefill_chunk = 64
    uri = "file:///big.py"
    doc = backend.cache.get(uri)
    polls = []
    result = backend.complete(_request(uri, text, len(text) - 2, max_tokens=4),
                              should_stop=lambda: len(polls) >= 3 or polls.append(1))
    assert result.drafts == [] and result.stats["cancelled"]
    assert 0 < doc.frontier < len(doc.ids) - 100  # stopped early; what it encoded stays
    kept = doc.frontier
    again = backend.complete(_request(uri, text, len(text) - 2, max_tokens=4))
    assert again.drafts and again.stats["document_encoded_tokens"] <= len(doc.ids) - kept + 1


def test_background_work_off_makes_every_request_encode_whole_files(tmp_path):
    backend, text = _big_backend(tmp_path, idle_refresh_ms=0)
    uri = "file:///big.py"
    result = backend.complete(_request(uri, text, text.index("def f10("), max_tokens=4))
    assert result.stats["unencoded_tokens"] == 0 and not backend.urgent_work()


def test_every_request_reports_the_tokens_it_encoded(tmp_path):
    from editkv.edit_cache.positions import Position, Range

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    # no near-cursor refresh: in a file this small it would re-encode every token after the edit
    backend = ModelBackend(tiny, tuned={"refresh_near_cursor": 0})
    uri, text = "file:///a.py", "def add(a, b):\n    return a + b\n"
    backend.open(uri, text)
    doc = backend.cache.get(uri)
    request = _request(uri, text, len(text) - 1, max_tokens=2)
    first = backend.complete(request).stats
    # the first request reads the file up to the cursor (its start token, then the tokens before
    # the cursor; the last token, after it, comes in the background) and encodes the view's own
    assert first["encoded_tokens"] == doc.h + doc.frontier + first["view_encoded_tokens"]
    assert doc.frontier == len(doc.ids) - 1 == doc.tokens.first_token_at_or_after(len(text) - 1)
    backend.change(uri, [(Range(Position(0, 4), Position(0, 7)), "plus")])
    second = backend.complete(request).stats
    assert 0 < second["encoded_tokens"] < len(doc.ids)  # the edit's tokens, not the file
    assert backend.encoded_tokens == first["encoded_tokens"] + second["encoded_tokens"]
    backend.recompute = True  # cacheMode "recompute": the whole file again
    assert backend.complete(request).stats["encoded_tokens"] >= doc.h + len(doc.ids)


def test_fim_requests_typed_on_one_line_reuse_the_suffix_window(trained):
    """Served FIM requests while typing on the cursor's line: with `fimSuffixCache` the suffix's
    re-encoded window is encoded once, then reused (the view encodes the line, <SUF>, <MID>)."""
    from editkv.lsp_server.worker import cache_options

    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n" * 3
    cursor = text.index("a + b") + len("a + b")  # the end of a line
    encoded = {}
    for on in (True, False):
        backend = ModelBackend(trained, **cache_options(Settings(fim_fresh_suffix=16, fim_suffix_cache=on)))
        uri = "file:///w.py"
        backend.open(uri, text)
        t, c = text, cursor
        stats = []
        for ch in ("", " ", "*", " ", "2"):
            t, c = _type(backend, uri, t, c, ch)
            result = backend.complete(_request(uri, t, c, max_tokens=2, view="fim"))
            assert result.stats["view"] == "fim"
            stats.append(result.stats)
        encoded[on] = [s["view_encoded_tokens"] for s in stats]
    # the first request encodes the window (and its own <SUF>), the keystrokes after it don't
    assert encoded[True][0] == encoded[False][0] + 1
    assert [off - on for on, off in zip(encoded[True][1:], encoded[False][1:], strict=True)] == [16] * 4


def test_device_stats_for_editkv_stats_off_cuda(tmp_path, monkeypatch):
    """`editkv/stats` reads device_stats: no CUDA memory or graphs on the CPU, the KV pool's
    buffer when there is one; the fake backend reports the same keys, all None."""
    from editkv.lsp_server.backend import DEVICE_STATS, FakeBackend

    tiny = load_model(make_checkpoint(tmp_path / "m", "llama"))
    monkeypatch.setenv("EDITKV_KV_POOL", "0")
    assert ModelBackend(tiny).device_stats() == dict.fromkeys(DEVICE_STATS)
    monkeypatch.setenv("EDITKV_KV_POOL", "1")
    backend = ModelBackend(tiny, budget_bytes=1 << 20)
    stats = backend.device_stats()
    assert stats["kv_pool_bytes"] == tiny.runner.kv_pool.buffer.nbytes() and 0 < stats["kv_pool_bytes"] <= 1 << 20
    assert stats["device_allocated_bytes"] is stats["device_max_allocated_bytes"] is stats["graph_captures"] is None
    assert FakeBackend().device_stats() == dict.fromkeys(DEVICE_STATS)



def test_a_document_that_fits_the_pool_after_an_eviction_stays_in_the_pool(trained, monkeypatch):
    """One KV pool of the budget's size: a document opened when it is full evicts the least
    recently used one first, instead of leaving the pool for a buffer of its own (whose graphs
    would be captured for it alone), and answers as a backend with room for every file does."""
    from editkv.lsp_server import warm_up

    texts = [warm_up.source_text(trained.tokenizer, 700).replace("step_", f"s{i}_") for i in range(4)]
    cursors = [t.index("    return total", len(t) // 2) + len("    return ") for t in texts]

    def session(backend, check=lambda: None):
        answers = []
        for i, (text, cursor) in enumerate(zip(texts, cursors, strict=True)):
            uri = f"file:///pool/{i}.py"
            backend.open(uri, text)
            answers.append(backend.complete(_request(uri, text, cursor, max_tokens=8)).drafts[0].text)
            check()
        backend.release()
        return answers

    monkeypatch.setenv("EDITKV_KV_POOL", "1")
    slot = trained.runner.new_cache(1).slot_bytes()
    backend = ModelBackend(trained, budget_bytes=2600 * slot)  # room for two such files, not three
    pool = trained.runner.kv_pool

    def in_the_pool():
        docs = [d for d in backend.cache.docs.values() if d.cache is not None]
        assert docs and all(d.cache.pool is pool for d in docs), "a document left the pool"

    pooled = session(backend, in_the_pool)
    assert pool.left == 0 and pool.reclaims >= 2 and backend.cache.evictions >= 2
    monkeypatch.setenv("EDITKV_KV_POOL", "0")
    assert session(ModelBackend(trained)) == pooled and any(pooled)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_kv_budget_left_unset_is_the_devices(trained, device):
    """The server's settings as a backend gets them: kvBudgetMb unset is the device's budget (and
    on a GPU the size of the KV pool every document's cache is a region of), 0 no limit."""
    from editkv.lsp_server.settings import KV_BUDGET_MB
    from editkv.lsp_server.worker import cache_options

    loaded = trained if device == "cpu" else load_model(None, device=device)
    backend = ModelBackend(loaded, **cache_options(Settings()))
    assert backend.cache.budget_bytes == KV_BUDGET_MB[device] << 20
    pool = loaded.runner.kv_pool
    if device == "cuda":  # the pool holds the budget, or half the free memory if that is less
        assert pool is not None and 0.4 * (KV_BUDGET_MB[device] << 20) < pool.slots * pool.slot_bytes() <= \
            KV_BUDGET_MB[device] << 20
    uri = "file:///budget.py"
    text = "def add(a, b):\n    return a + b\n\n"
    backend.open(uri, text)
    assert backend.complete(_request(uri, text, len(text), max_tokens=4)).stats is not None
    backend.configure(**cache_options(Settings(kv_budget_mb=0)))
    assert backend.cache.budget_bytes is None
    backend.configure(**cache_options(Settings(kv_budget_mb=256)))
    assert backend.cache.budget_bytes == 256 << 20
    backend.close(uri)
