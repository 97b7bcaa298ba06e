"""Beam search (engine.decoding.beam): batched beams score what a fresh forward scores, ranking, stop rules."""

import math
import time
from dataclasses import replace

import pytest
import torch
from editkv.engine.decoding.beam import beam_search
from editkv.engine.generate import DecodeState, StopRules, decode, prefill
from editkv.engine.model import Span
from editkv.engine.prompting import healed_left_to_right_ids, left_to_right_ids
from editkv.engine.static_decode import StaticForward

PREFIXES = ["def add(a, b):\n", "for name in os.li", "class Point:\n    def __init__(self, x, y):\n        self."]


def _state(loaded, prefix, *, heal=False, max_new_tokens=16):
    tok, cfg = loaded.tokenizer, loaded.config
    ids, healed = healed_left_to_right_ids(tok, cfg, prefix) if heal else (left_to_right_ids(tok, cfg, prefix), b"")
    return DecodeState.from_prompt(loaded.runner, tok, ids, heal=healed, max_new_tokens=max_new_tokens)


def _teacher_forced_logprobs(loaded, prompt, ids, stop_ids=()):
    """Sum of log p(ids[i] | prompt + ids[:i]) from one fresh prefill; with `stop_ids`, one sum per
    stop token that may end them."""
    seq = prompt + ids
    logits = prefill(loaded.runner, seq, loaded.runner.new_cache(len(seq)), logits="all")[0]  # [T, V]
    logp = torch.log_softmax(logits.float(), -1)
    total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))
    return [total + float(logp[-1, s]) for s in stop_ids] if stop_ids else [total]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("num_beams", [2, 3])
def test_beams_score_what_a_fresh_forward_scores(tiny, prefix, num_beams):
    """Re-ordering the batch-B cache by parent keeps each beam's own K/V: its log-prob is exact."""
    rules = StopRules(max_tokens=6, max_lines=None)
    state = _state(tiny, prefix)
    result = beam_search(state, num_beams, rules)
    assert 1 <= len(result.beams) <= num_beams
    for beam in result.beams:
        stops = tiny.tokenizer.stop_ids if beam.stop_reason == "stop_token" else ()
        expect = _teacher_forced_logprobs(tiny, state.prompt_ids, beam.ids, stops)
        assert any(beam.logprob == pytest.approx(e, abs=1e-3) for e in expect), (beam, expect)
        assert beam.score == beam.logprob and beam.text == tiny.tokenizer.decode(beam.ids)
        assert beam.stop_reason == "stop_token" or len(beam.ids) == rules.max_tokens
    scores = [b.score for b in result.beams]
    assert scores == sorted(scores, reverse=True)
    assert len({b.text.rstrip() for b in result.beams}) == len(result.beams)
    assert result.stats.forwards <= rules.max_tokens


def test_summed_search_finds_at_least_the_greedy_score_when_greedy_survives(tiny):
    """With as many beams as the search ever keeps, the greedy path is never pruned."""
    rules = StopRules(max_tokens=3, max_lines=None)
    state = _state(tiny, PREFIXES[0])
    greedy = decode(tiny.runner, tiny.tokenizer, state.first_logits, context=state.context,
                    next_position=state.next_position, rules=rules)
    best = beam_search(_state(tiny, PREFIXES[0]), 8, rules).beams[0]
    assert best.logprob >= greedy.logprob - 1e-4


@pytest.mark.parametrize("prefix", PREFIXES)
def test_width_one_is_greedy(tiny, prefix):
    rules = StopRules(max_tokens=10, max_lines=1)
    state = _state(tiny, prefix, heal=True)
    greedy = decode(tiny.runner, tiny.tokenizer, state.first_logits, context=state.context,
                    next_position=state.next_position, rules=rules, heal=state.heal)
    for kw in ({}, {"length_normalize": True, "early_stopping": True, "keep_empty": True}):
        best = beam_search(_state(tiny, prefix, heal=True), 1, rules, **kw).best()
        assert (best.ids, best.text) == (greedy.ids, greedy.text), kw


def test_line_rule_healing_and_mean_scores(tiny):
    prefix = "for name in os.li"
    state = _state(tiny, prefix, heal=True)
    assert state.heal
    rules = StopRules(max_tokens=12, max_lines=1)
    result = beam_search(state, 3, rules, length_normalize=True)
    healed = state.heal.decode()
    for beam in result.beams:
        assert "\n" not in beam.text
        assert tiny.tokenizer.decode(beam.ids).startswith(healed) and beam.text.strip()
        assert beam.score == pytest.approx(beam.logprob / (len(beam.ids) + (beam.stop_reason == "stop_token")))
    assert [b.score for b in result.beams] == sorted((b.score for b in result.beams), reverse=True)


def test_cancellation_returns_live_beams_and_stops_forwards(tiny):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    result = beam_search(_state(tiny, PREFIXES[1]), 3, StopRules(max_tokens=30, max_lines=None, should_stop=stop))
    assert result.stats.forwards == 2
    assert result.beams and all(b.stop_reason in ("cancelled", "stop_token") for b in result.beams)
    assert math.isfinite(result.best().logprob)


def _one_buffer_state(loaded, prefix, room):
    """A state whose scratch is a window after the prompt's slots in one buffer (as a document's
    views are), so that the static forward can take beam search's steps."""
    tok, model = loaded.tokenizer, loaded.runner
    ids = left_to_right_ids(tok, loaded.config, prefix)
    cache = model.new_cache(len(ids) + room + 1)
    logits = prefill(model, ids, cache)
    return DecodeState(model, tok, logits, [Span(cache, 0, len(ids))], cache.window(len(ids), room), 0, len(ids),
                       b"", list(ids))


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("num_beams", [2, 3])
def test_lanes_in_the_scratch_score_what_the_batch_cache_scores(tiny, prefix, num_beams):
    """With a static forward, the beams interleave in the scratch (lanes, one width-`num_beams`
    forward per step, slots re-ordered by parent): the same beams, each log-prob exact."""
    rules = StopRules(max_tokens=6, max_lines=None)
    batch = beam_search(_state(tiny, prefix), num_beams, rules)
    model = tiny.runner
    static = StaticForward(model.model, bucket=32, max_width=8, mode="static")
    model.use_graphs(static)
    try:
        state = _one_buffer_state(tiny, prefix, num_beams * rules.max_tokens + 1)
        before = static.handled
        lanes = beam_search(state, num_beams, rules)
    finally:
        model.disable_graphs()
    assert lanes.stats.extra.get("beam_lanes") == 1 and static.handled - before == lanes.stats.forwards > 1
    assert [b.text for b in lanes.beams] == [b.text for b in batch.beams]
    for got, want in zip(lanes.beams, batch.beams, strict=True):
        assert got.ids == want.ids and got.logprob == pytest.approx(want.logprob, abs=1e-3)
        stops = tiny.tokenizer.stop_ids if got.stop_reason == "stop_token" else ()
        expect = _teacher_forced_logprobs(tiny, state.prompt_ids, got.ids, stops)
        assert any(got.logprob == pytest.approx(e, abs=1e-3) for e in expect), (got, expect)


def test_lanes_need_room_in_the_scratch(tiny):
    """A scratch too small for every step's lanes: the batch cache (eager), same beams."""
    rules = StopRules(max_tokens=6, max_lines=None)
    model = tiny.runner
    model.enable_graphs(bucket=32, max_width=8, mode="static")
    try:
        result = beam_search(_one_buffer_state(tiny, PREFIXES[0], 10), 3, rules)
    finally:
        model.disable_graphs()
    assert "beam_lanes" not in result.stats.extra
    assert [b.text for b in result.beams] == [b.text for b in beam_search(_state(tiny, PREFIXES[0]), 3, rules).beams]



def test_beams_stop_where_stop_text_says(tiny):
    """Each beam emits through engine.generate.Output: `stop_text` ends a beam where it says."""
    rules = StopRules(max_tokens=12, max_lines=None)
    cut = beam_search(_state(tiny, PREFIXES[0]), 3, rules, stop_text=lambda text: 2 if len(text) >= 2 else None)
    assert cut.beams and all(b.stop_reason in ("stop_text", "stop_token") and len(b.text) <= 2 for b in cut.beams)
    assert any(b.stop_reason == "stop_text" for b in cut.beams)


def test_a_passed_lines_deadline_ends_beams_at_their_first_line_with_text(default):
    """The multi-line time limit (`StopRules.lines_until`) applies per beam, as in `decode`; a
    deadline still ahead changes nothing."""
    prefix = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    rules = StopRules(max_tokens=24, max_lines=None)
    free = beam_search(_state(default, prefix), 3, rules)
    ahead = beam_search(_state(default, prefix), 3, replace(rules, lines_until=time.perf_counter() + 1e6))
    assert [(b.ids, b.text, b.stop_reason) for b in ahead.beams] == [(b.ids, b.text, b.stop_reason)
                                                                     for b in free.beams]
    assert all("\n" in b.text for b in free.beams)
    passed = beam_search(_state(default, prefix), 3, replace(rules, lines_until=0.0))
    assert len(passed.beams) == 3
    for b in passed.beams:
        assert b.stop_reason == "lines" and b.text.strip() and "\n" not in b.text
        assert default.tokenizer.decode(b.ids) == b.text + "\n"
