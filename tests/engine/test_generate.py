"""Decoding loop: stop rules, greedy determinism, sampling, through the real model path."""

import pytest
import torch
from editkv.engine.generate import StopRules, decode, prefill
from editkv.engine.loading import load_model
from editkv.engine.model import Span
from editkv.engine.prompting import fim_ids, left_to_right_ids
from editkv.engine.sampling import SamplingParams, next_token, sampling_probs
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("m"), "llama"))


def _run(loaded, prefix, **kw):
    ids = left_to_right_ids(loaded.tokenizer, loaded.config, prefix)
    cache = loaded.runner.new_cache(len(ids))
    logits = prefill(loaded.runner, ids, cache)
    return decode(loaded.runner, loaded.tokenizer, logits, context=[Span(cache, 0, len(ids))],
                  next_position=len(ids), **kw)


def test_greedy_equals_argmax_of_full_recompute(loaded):
    """Each greedy token is the argmax of a fresh full forward over prompt + generated so far."""
    out = _run(loaded, "def add(a, b):\n", rules=StopRules(max_tokens=6, max_lines=None,
                                                            stop_ids=frozenset({-1})))
    ids = left_to_right_ids(loaded.tokenizer, loaded.config, "def add(a, b):\n")
    model = loaded.runner
    stop = loaded.tokenizer.stop_ids
    for token in out.ids:
        cache = model.new_cache(len(ids))
        logits = prefill(model, ids, cache)
        expect = int(logits.argmax())
        assert expect not in stop
        assert token == expect
        ids = ids + [token]


def test_max_tokens_and_line_rules(loaded):
    out = _run(loaded, "x = ", rules=StopRules(max_tokens=5, max_lines=None))
    assert len(out.ids) <= 5
    if out.stop_reason == "max_tokens":
        assert len(out.ids) == 5
    lines = _run(loaded, "x = ", rules=StopRules(max_tokens=40, max_lines=1))
    assert "\n" not in lines.text


def test_stop_token_ends_decoding(loaded):
    first = _run(loaded, "x = ", rules=StopRules(max_tokens=4, max_lines=None))
    assert first.ids, "the model produced nothing to stop on"
    stopped = _run(loaded, "x = ", rules=StopRules(max_tokens=4, max_lines=None,
                                                   stop_ids=frozenset({first.ids[0]})))
    assert stopped.ids == [] and stopped.stop_reason == "stop_token"


def test_callback_cancels_at_next_step(loaded):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) >= 2

    out = _run(loaded, "x = ", rules=StopRules(max_tokens=30, max_lines=None, should_stop=cancel))
    assert out.stop_reason in ("cancelled", "stop_token")
    if out.stop_reason == "cancelled":
        assert len(out.ids) == 2 and out.stats.forwards == 1


def test_fim_prompt_layout(loaded):
    tok = loaded.tokenizer
    ids = fim_ids(tok, loaded.config, "a = 1\n", "\nb = 2\n")
    assert ids[0] == tok.fim.prefix and ids[-1] == tok.fim.middle and tok.fim.suffix in ids


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert probs[0, 2] == 0 and probs[0, 3] == 0
    assert torch.allclose(probs[0, :2], torch.tensor([0.625, 0.375]))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)


def test_bad_sampling_params_rejected():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
