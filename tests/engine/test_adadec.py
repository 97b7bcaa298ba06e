"""AdaDec: calibration fit and storage, the gate, batched rollouts vs a slow reference, real model views,
and AdaDec composed with n-gram speculation (the same output as adadec_decode, greedy's at tau = +inf)."""

import math

import numpy as np
import pytest
import torch
from editkv.edit_cache.document import Document
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.calibrate import (
    Calibration,
    calibration_path,
    choose_threshold,
    entropy,
    fit_logistic,
    load_calibration,
    teacher_force,
)
from editkv.engine.decoding import Reference, SpecCounters, SpeculationConfig, Speculator
from editkv.engine.decoding.adadec import AdaDecConfig, Gate, Lookahead, adadec_decode
from editkv.engine.errors import EngineError
from editkv.engine.generate import DecodeState, StopRules, decode, prefill
from editkv.engine.healing import healer_for
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.prompting import doc_start_ids, healed_left_to_right_ids, left_to_right_ids


def _state(loaded, prefix, *, heal=True, max_new_tokens=16):
    tok, cfg = loaded.tokenizer, loaded.config
    ids, healed = healed_left_to_right_ids(tok, cfg, prefix) if heal else (left_to_right_ids(tok, cfg, prefix), b"")
    return DecodeState.from_prompt(loaded.runner, tok, ids, heal=healed, max_new_tokens=max_new_tokens)


# --- calibration ------------------------------------------------------------------------

def test_entropy_of_uniform_and_masked_distributions():
    logits = torch.zeros(2, 8)
    logits[1, 4:] = float("-inf")
    assert torch.allclose(entropy(logits), torch.tensor([math.log(8), math.log(4)]))


@pytest.mark.parametrize("true_tau", [0.8, 2.0])
def test_logistic_fit_recovers_a_known_threshold(true_tau):
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 5, 40_000)
    y = h < true_tau
    flip = rng.random(len(h)) < 0.1  # symmetric label noise keeps the best cutoff at true_tau
    y = np.where(flip, ~y, y)
    fit = fit_logistic(h[:30_000], y[:30_000])
    assert fit.weight < 0
    threshold = choose_threshold(fit, h[30_000:], y[30_000:])
    assert abs(threshold.tau - true_tau) < 0.1, threshold
    assert threshold.heldout_accuracy > 0.85


def test_fit_refuses_one_class_and_a_useless_feature():
    with pytest.raises(EngineError, match="one class"):
        fit_logistic(np.arange(10.0), np.ones(10, dtype=bool))
    fit = fit_logistic(np.arange(100.0), np.arange(100) > 50)  # higher entropy = more often right
    with pytest.raises(EngineError, match="does not predict"):
        choose_threshold(fit, np.arange(100.0), np.arange(100) > 50)


def test_teacher_forcing_records_every_predicted_position(tiny):
    tok = tiny.tokenizer
    text = "def add(a, b):\n    return a + b\n"
    head = doc_start_ids(tok, tiny.config)
    obs = teacher_force(tiny.runner, tok, [text, text], head=head, chunk=5)
    n = len(tok.encode(text))
    assert len(obs.entropy) == 2 * (n + len(head) - max(len(head), 1)) and set(obs.group.tolist()) == {0, 1}
    ids = head + tok.encode(text)
    logits = prefill(tiny.runner, ids, tiny.runner.new_cache(len(ids)), logits="all")[0]
    first = max(len(head) - 1, 0)
    expect = entropy(logits[first:-1]).double().numpy()
    assert np.allclose(obs.entropy[:len(expect)], expect, atol=1e-4)
    assert (obs.top1[:len(expect)] == (logits[first:-1].argmax(-1) == torch.tensor(ids[first + 1:])).numpy()).all()


def test_calibration_json_round_trip(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = tiny.source
    with pytest.raises(EngineError, match="editkv calibrate"):
        AdaDecConfig.for_model(spec)
    cal = Calibration(tau=1.25, model=spec, fit={"cutoff": 0.5}, data={"files": 3})
    path = cal.save(calibration_path(spec))
    assert path.parent == tmp_path / "cache" / "editkv" / "adadec"
    assert load_calibration(spec) == cal
    assert AdaDecConfig.for_model(spec, lookahead=2) == AdaDecConfig(1.25, lookahead=2)
    path.write_text('{"tau": "high"}')
    with pytest.raises(EngineError, match="not an editkv AdaDec calibration"):
        load_calibration(spec)


def test_default_model_ships_calibrated():
    cal = load_calibration(None)
    assert calibration_path(None) == DEFAULT_MODEL_DIR / "adadec.json"
    assert 0.1 < cal.tau < 5 and cal.fit["heldout_positions"] > 1000


# --- decoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["def add(a, b):\n", "for name in os.li", "x = "])
def test_infinite_tau_is_greedy_exactly(tiny, prefix):
    rules = StopRules(max_tokens=12, max_lines=None)
    state = _state(tiny, prefix)
    greedy = decode(tiny.runner, tiny.tokenizer, state.first_logits, context=state.context,
                    next_position=state.next_position, rules=rules, heal=state.heal)
    ours = adadec_decode(_state(tiny, prefix), AdaDecConfig(math.inf), rules)
    assert (ours.ids, ours.text, ours.stop_reason, ours.logprob) == \
        (greedy.ids, greedy.text, greedy.stop_reason, greedy.logprob)
    assert ours.stats.extra["adadec_gate_fires"] == 0 and ours.stats.forwards == greedy.stats.forwards


def _reference_scores(loaded, prompt, remaining, num_candidates, lookahead, stop_ids):
    """Unbatched, no cache reuse: every rollout token is the argmax of a fresh prefill of the whole sequence."""
    model = loaded.runner
    healer = healer_for(loaded.tokenizer)

    def last_logits(ids, heal):
        logits = prefill(model, ids, model.new_cache(len(ids)))
        return healer.mask(logits, heal) if heal else logits

    logp = torch.log_softmax(last_logits(prompt, remaining)[0], -1)
    top = torch.topk(logp, num_candidates)
    scores = {}
    for c, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        total, n, seq = lp, 1, prompt + [c]
        heal = healer.advance(remaining, c) if remaining else b""
        for _ in range(lookahead if c not in stop_ids else 0):
            row = torch.log_softmax(last_logits(seq, heal)[0], -1)
            token = int(row.argmax())
            heal = healer.advance(heal, token) if heal else b""
            total, n, seq = total + float(row[token]), n + 1, seq + [token]
            if token in stop_ids:
                break
        scores[c] = total / n
    return scores


@pytest.mark.parametrize("prefix", ["class Point:\n    def __init__(self, x, y):\n", "for name in os.li"])
def test_gate_at_zero_commits_the_argmax_of_reference_scores(tiny, prefix):
    config = AdaDecConfig(0.0, num_candidates=3, lookahead=3)
    rules = StopRules(max_tokens=6, max_lines=None)
    state = _state(tiny, prefix)
    out = adadec_decode(state, config, rules)
    extra = out.stats.extra
    assert extra["adadec_gate_fires"] == extra["adadec_steps"] == len(out.ids) + (out.stop_reason == "stop_token")
    stop_ids = tiny.tokenizer.stop_ids
    healer = healer_for(tiny.tokenizer)
    remaining = state.heal
    chosen = out.ids + ([] if out.stop_reason != "stop_token" else [None])
    checked = 0
    for step, token in enumerate(chosen):
        scores = _reference_scores(tiny, state.prompt_ids + out.ids[:step], remaining, 3, 3, stop_ids)
        best = max(scores.values())
        winners = {c for c, s in scores.items() if s > best - 1e-5}  # float near-ties may go either way
        if token is None:
            assert winners & stop_ids
        else:
            assert token in winners, (step, token, scores)
            remaining = healer.advance(remaining, token) if remaining else b""
        checked += 1
    assert checked >= 1


def test_rerank_scores_match_the_reference(tiny):
    state = _state(tiny, "def add(a, b):\n", heal=False)
    stop_ids = tiny.tokenizer.stop_ids
    lookahead = Lookahead(tiny.runner, 3, 4, stop_ids)
    result = lookahead.rerank(state.first_logits, state.context, state.next_position)
    ref = _reference_scores(tiny, state.prompt_ids, b"", 3, 4, stop_ids)
    assert result.candidates == list(ref)
    assert np.allclose(result.scores, list(ref.values()), atol=1e-4)
    assert result.forwards == 4 or any(c in stop_ids for c in result.candidates)


def test_rollouts_are_batched_one_forward_per_step_without_reprefill(tiny):
    calls = []
    hook = tiny.runner.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(args[0].shape)), with_kwargs=True)
    try:
        state = _state(tiny, "def add(a, b):\n", heal=False)
        calls.clear()
        out = adadec_decode(state, AdaDecConfig(0.0, num_candidates=3, lookahead=4), StopRules(max_tokens=8,
                                                                                                max_lines=None))
    finally:
        hook.remove()
    extra = out.stats.extra
    assert all(t == 1 for _, t in calls), "no forward re-encodes more than one token (no re-prefill)"
    batched = [b for b, _ in calls if b == 3]
    assert len(batched) == extra["adadec_extra_forwards"] and len(calls) == out.stats.forwards
    assert extra["adadec_gate_fires"] <= len(batched) <= 4 * extra["adadec_gate_fires"]
    # every committed token's K/V came from its rollout row: no batch-1 forward at all
    assert len(calls) - len(batched) == 0 and extra["adadec_reused_steps"] == len(out.ids) - 1 + (
        out.stop_reason == "stop_token")


def test_draft_reuse_does_not_change_the_output(tiny, monkeypatch):
    """A high tau fires rarely; reusing the winner's rollout must give what fresh forwards give."""
    h = [float(entropy(_state(tiny, p).first_logits)[0]) for p in ("x = ", "def add(a, b):\n")]
    config = AdaDecConfig(min(h) - 1e-3, num_candidates=2, lookahead=3)
    rules = StopRules(max_tokens=10, max_lines=None)
    with_reuse = adadec_decode(_state(tiny, "x = "), config, rules)
    import editkv.engine.decoding.adadec as module

    real = module.Lookahead.rerank

    def no_draft(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.draft_logits = []
        return out

    monkeypatch.setattr(module.Lookahead, "rerank", no_draft)
    without = adadec_decode(_state(tiny, "x = "), config, rules)
    assert with_reuse.ids == without.ids and with_reuse.text == without.text


def test_gate_is_a_step_level_component(tiny):
    """What a speculative verifier would call: `fires` over many positions, `choose` at one."""
    state = _state(tiny, "def add(a, b):\n", heal=False)
    logits = torch.cat([state.first_logits, torch.zeros_like(state.first_logits)])  # second row: uniform
    h = entropy(logits)
    gate = Gate(tiny.runner, AdaDecConfig(float(h.max()) - 1e-3), tiny.tokenizer.stop_ids)
    assert gate.fires(logits).tolist() == [False, True] or bool(h[0] >= h[1])
    assert not Gate(tiny.runner, AdaDecConfig(math.inf), frozenset()).fires(logits).any()
    token, decision = Gate(tiny.runner, AdaDecConfig(0.0), tiny.tokenizer.stop_ids).choose(
        state.first_logits, state.context, state.next_position)
    assert decision is not None and token == decision.token in decision.candidates
    token, decision = gate.choose(state.first_logits, state.context, state.next_position)
    assert decision is None and token == int(state.first_logits.argmax()) and gate.counters.steps == 1


def test_stop_text_ends_the_completion_where_it_says(tiny):
    rules = StopRules(max_tokens=12, max_lines=None)
    full = adadec_decode(_state(tiny, "x = ", heal=False), AdaDecConfig(math.inf), rules)
    assert len(full.text) > 2
    cut = adadec_decode(_state(tiny, "x = ", heal=False), AdaDecConfig(math.inf), rules,
                        stop_text=lambda text: 2 if len(text) >= 2 else None)
    assert cut.stop_reason == "stop_text" and cut.text == full.text[:2]


# --- AdaDec composed with n-gram speculation ----------------------------------------------

def _same_output(a, b):
    assert (a.ids, a.text, a.stop_reason) == (b.ids, b.text, b.stop_reason)
    assert a.logprob == pytest.approx(b.logprob, abs=1e-3 * max(1, len(a.ids)))


def _speculate(state, rules, config, refs=(), **spec):
    speculator = Speculator(SpeculationConfig(measure_cost=False, **spec))
    out = speculator.decode(state, rules=rules, references=refs, adadec=config)
    c = SpecCounters.read(out.stats.extra)
    assert len(out.ids) + c.discarded == 1 + c.accepted + c.bonus  # every token: first, accepted or bonus
    assert out.stats.forwards == c.forwards + out.stats.extra.get("adadec_extra_forwards", 0)
    return out, c


@pytest.mark.parametrize("prefix", ["def add(a, b):\n", "for name in os.li", "x = "])
def test_speculation_with_infinite_tau_is_greedy(tiny, prefix):
    rules = StopRules(max_tokens=14, max_lines=None)
    greedy = decode(tiny.runner, tiny.tokenizer, _state(tiny, prefix).first_logits,
                    context=_state(tiny, prefix).context, next_position=_state(tiny, prefix).next_position,
                    rules=rules, heal=_state(tiny, prefix).heal)
    refs = [Reference.of("recent", greedy.ids * 2)]  # drafts that are right
    out, c = _speculate(_state(tiny, prefix), rules, AdaDecConfig(math.inf), refs)
    _same_output(out, greedy)
    assert c.accepted > 0 and "adadec_gate_fires" not in out.stats.extra


def _median_tau(loaded, prefix, n=12):
    """A tau at the median entropy of a greedy run: the gate fires at about half the positions."""
    state = _state(loaded, prefix)
    out = decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                 next_position=state.next_position, rules=StopRules(max_tokens=n, max_lines=None), heal=state.heal)
    ids = state.prompt_ids + out.ids
    logits = prefill(loaded.runner, ids, loaded.runner.new_cache(len(ids)), logits="all")[0, len(state.prompt_ids) - 1:]
    return float(entropy(logits).median())


@pytest.mark.parametrize("prefix", ["def add(a, b):\n", "for name in os.li"])
@pytest.mark.parametrize("max_rows", [1, 3])
def test_speculation_with_gating_equals_adadec_decode(tiny, prefix, max_rows):
    config = AdaDecConfig(_median_tau(tiny, prefix), num_candidates=3, lookahead=3)
    rules = StopRules(max_tokens=14, max_lines=None)
    ref = adadec_decode(_state(tiny, prefix), config, rules)
    assert 0 < ref.stats.extra["adadec_gate_fires"] < ref.stats.extra["adadec_steps"]
    state = _state(tiny, prefix)
    plain = decode(tiny.runner, tiny.tokenizer, state.first_logits, context=state.context,
                   next_position=state.next_position, rules=rules, heal=state.heal)
    assert plain.ids != ref.ids, "the gate should change this output, or the test shows nothing"
    # drafts of the gated output (right) and of plain greedy (accepted by the argmax where the
    # gate must cut them off), both long enough to span gated positions
    refs = [Reference.of("recent", ref.ids * 2), Reference.of("workspace", plain.ids * 2)]
    out, c = _speculate(_state(tiny, prefix), rules, config, refs, max_rows=max_rows, row_cost=0.01,
                        threshold=0.99)
    _same_output(out, ref)
    extra = out.stats.extra
    assert c.accepted > 0 and extra["adadec_gate_fires"] >= 1
    for name in ("gate_fires", "changed", "steps"):  # the gate saw the same positions
        assert extra[f"adadec_{name}"] == ref.stats.extra[f"adadec_{name}"], name
    # without references too (drafts from the history, the table and the winners' rollouts)
    _same_output(_speculate(_state(tiny, prefix), rules, config)[0], ref)


def test_speculation_with_gating_follows_healing(tiny):
    prefix = "for name in os.li"
    state = _state(tiny, prefix)
    assert state.heal
    config = AdaDecConfig(0.0, num_candidates=2, lookahead=2)
    rules = StopRules(max_tokens=8, max_lines=1)
    _same_output(_speculate(_state(tiny, prefix), rules, config)[0], adadec_decode(state, config, rules))


def test_speculation_refuses_gating_with_sampling(tiny):
    from editkv.engine.sampling import SamplingParams

    with pytest.raises(ValueError, match="greedy"):
        Speculator().decode(_state(tiny, "x = "), params=SamplingParams(temperature=0.5), adadec=AdaDecConfig(0.0))


# --- the real default model through both views ------------------------------------------

SOURCE = '''import os


def list_python_files(root):
    """Every .py file under root."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.join(dirpath, name))
    return out


def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)
'''


@pytest.fixture(scope="module")
def default_model():
    return load_model(None)


def test_calibrate_command_on_the_default_model(tmp_path, capsys):
    from editkv.lsp_server.cli import main

    code = tmp_path / "code"
    code.mkdir()
    for i, name in enumerate(("root", "top", "base", "folder", "where")):  # held out: every 5th file
        (code / f"m{i}.py").write_text(SOURCE.replace("root", name) * 3)
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--data", str(code), "--out", str(out), "--max-tokens", "2000",
                 "--max-file-tokens", "300"]) == 0
    assert "tau = " in capsys.readouterr().out
    cal = Calibration.load(out)
    assert cal.model == "default" and math.isfinite(cal.tau) and cal.data["files"] == 5
    assert main(["calibrate", "--data", str(tmp_path / "missing")]) == 2


def test_default_model_views(default_model):
    tok = default_model.tokenizer
    doc = Document(default_model.runner, tok, SOURCE, head=doc_start_ids(tok, default_model.config))
    config = AdaDecConfig.for_model(None)
    rules = StopRules(max_tokens=24, max_lines=1)
    cursor = SOURCE.index("return sum") + len("return ")
    fired = 0
    for build in (left_to_right, fill_in_middle):
        view = build(doc, cursor)
        greedy = view.decode(rules=rules)
        same = adadec_decode(build(doc, cursor).state(), AdaDecConfig(math.inf), rules)
        assert same.ids == greedy.ids and same.text == greedy.text
        ours = adadec_decode(build(doc, cursor).state(), config, rules)
        assert ours.stop_reason in ("lines", "stop_token", "max_tokens") and "\n" not in ours.text
        fired += ours.stats.extra["adadec_gate_fires"]
        always = adadec_decode(build(doc, cursor).state(), AdaDecConfig(0.0, lookahead=3), rules)
        assert always.stats.extra["adadec_gate_fires"] >= 1 and "\n" not in always.text
        for gated, ref in ((config, ours), (AdaDecConfig(0.0, lookahead=3), always)):
            spec = Speculator().decode(build(doc, cursor).state(), rules=rules, adadec=gated)
            _same_output(spec, ref)
    # the healed cursor token (indentation / partial word) is spelled out, then cut from the text
    cursor = SOURCE.index("out.append") + len("out.app")
    view = left_to_right(doc, cursor)
    assert view.heal
    healed = adadec_decode(view.state(), AdaDecConfig(0.0, lookahead=2), rules)
    assert tok.decode(healed.ids).startswith(view.heal.decode()) and not healed.text.startswith("app")
