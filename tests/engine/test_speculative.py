"""Lossless speculation: greedy output equals plain decoding, sampling keeps the target distribution.

Greedy equality runs the trained default model on realedits contexts in both edit_cache views
(multi-line completions, token healing at the cursor). The sampling rules are checked exactly on
`verify` (synthetic target and draft distributions, chi-square against the target) and end to end
on a tiny random model (empirical distribution of the first two tokens against the model's own).
"""

import gzip
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import line_starts
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.decoding import ModelTable, PromptLookup, Reference, SpecCounters, SpeculationConfig, Speculator
from editkv.engine.decoding.drafters import TokenHistory
from editkv.engine.decoding.speculative import expected_accepted, verify
from editkv.engine.decoding.speculative.device import search_buffer
from editkv.engine.decoding.speculative.output import draft_cut, tokens_left
from editkv.engine.generate import DecodeState, LineStopper, Output, StopRules, decode
from editkv.engine.healing import healer_for
from editkv.engine.loading import load_model
from editkv.engine.model import Span
from editkv.engine.prompting import doc_start_ids
from editkv.engine.sampling import SamplingParams, sampling_probs

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "realedits" / "dev.jsonl.gz"


def _check_counters(out) -> SpecCounters:
    """Acceptance accounting: every chosen token is the first, an accepted draft, a bonus or a
    chained one."""
    c = SpecCounters.read(out.stats.extra)
    assert 0 <= c.accepted <= c.drafted
    assert c.bonus == c.forwards and out.stats.forwards == c.forwards + c.chained
    assert c.rows <= c.forwards * 16
    assert len(out.ids) + c.discarded == 1 + c.accepted + c.bonus + c.chained
    assert sum(d for d, _ in c.by_source.values()) == c.drafted
    assert sum(a for _, a in c.by_source.values()) == c.accepted
    return c


def _same(plain, spec):
    assert (spec.ids, spec.text, spec.stop_reason) == (plain.ids, plain.text, plain.stop_reason)
    assert spec.logprob == pytest.approx(plain.logprob, abs=1e-3 * max(1, len(plain.ids)))


# ---- verify: the acceptance rules on synthetic distributions ---------------------------------


def test_verify_greedy_accepts_longest_matching_prefix_plus_bonus():
    argmax = [[5, 6, 7, 8]]
    v = verify([[5, 6, 9]], argmax=argmax)
    assert (v.row, v.accepted, v.token) == (0, 2, 7)
    v = verify([[5, 6, 7]], argmax=argmax)
    assert (v.accepted, v.token) == (3, 8)  # all accepted: the last row position gives the bonus
    v = verify([[1, 6, 7]], argmax=argmax)
    assert (v.accepted, v.token) == (0, 5)
    v = verify([[]], argmax=[[4]])
    assert (v.accepted, v.token) == (0, 4)


def test_verify_tree_rows_follow_the_target_path():
    # rows share the context up to where they differ; each row has its own target argmax
    drafts = [[5, 1, 1], [5, 6, 2], [5, 6, 7]]
    argmax = [[5, 6, 0, 0], [5, 6, 7, 0], [5, 6, 7, 3]]
    v = verify(drafts, argmax=argmax)
    assert (v.row, v.accepted, v.token) == (2, 3, 3)
    v = verify(drafts, argmax=[[5, 9, 0, 0], [5, 9, 0, 0], [5, 9, 0, 0]])
    assert (v.row, v.accepted, v.token) == (0, 1, 9)


def _chi2_critical(dof: int, z: float = 3.29) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty), z = 3.29: about alpha = 5e-4."""
    k = max(dof, 1)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _chi2(counts: Counter, law: dict, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of `counts` against `law` (outcome -> probability).

    Outcomes expected fewer than `min_expected` times, and outcomes the law lacks, are pooled.
    """
    big = [k for k, p in law.items() if n * p >= min_expected]
    stat = sum((counts.get(k, 0) - n * law[k]) ** 2 / (n * law[k]) for k in big)
    rest_observed = n - sum(counts.get(k, 0) for k in big)
    rest_expected = n - sum(n * law[k] for k in big)
    cells = len(big)
    if rest_expected >= min_expected:
        stat += (rest_observed - rest_expected) ** 2 / rest_expected
        cells += 1
    elif rest_observed > rest_expected + 4 * math.sqrt(max(rest_expected, 1.0)) + 5:
        stat = float("inf")  # mass where the target has (almost) none
    return stat, cells - 1


def _point_mass_law(draft, probs):
    """Law of the emitted (first, second) tokens: a target sample; the second only after the draft."""
    p0, p1 = probs[0, 0], probs[0, 1]
    law = {}
    for a in range(probs.shape[-1]):
        if a == draft[0]:
            for b in range(probs.shape[-1]):
                law[(a, b)] = float(p0[a] * p1[b])
        else:
            law[(a, None)] = float(p0[a])
    return law


def _paths(draft, probs, n, q=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = Counter()
    for _ in range(n):
        d = draft
        if q is not None:  # a stochastic drafter draws its tokens from q
            d = [int(torch.multinomial(qj, 1, generator=gen)) for qj in q]
        v = verify([d], probs=probs, q=q, generator=gen)
        path = [*d[: v.accepted], v.token]
        counts[(path[0], path[1] if len(path) > 1 else None)] += 1
    return counts


def _synthetic(v=5, t=3, seed=1, temperature=1.0, top_p=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, t, v, generator=gen) * 1.5
    return sampling_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_verify_point_mass_sampling_keeps_the_target_distribution(top_p):
    probs = _synthetic(top_p=top_p)
    draft = [int(probs[0, 0].argmax()), 2]
    n = 6000
    stat, dof = _chi2(_paths(draft, probs, n), _point_mass_law(draft, probs), n)
    assert stat < _chi2_critical(dof), (stat, dof)


def test_verify_sampled_tree_rows_keep_the_target_distribution():
    """Two rows with different first drafts: the path samples p0, then the matching row's p1."""
    gen = torch.Generator().manual_seed(4)
    shared = torch.softmax(torch.randn(5, generator=gen) * 1.5, -1)
    probs = torch.stack([torch.stack([shared, torch.softmax(torch.randn(5, generator=gen) * 1.5, -1)])
                         for _ in range(2)])  # [2 rows, 2 positions, 5]; position 0 is shared context
    drafts = [[0], [1]]
    n = 6000
    counts = Counter()
    for _ in range(n):
        v = verify(drafts, probs=probs, generator=gen)
        path = [*drafts[v.row][: v.accepted], v.token]
        counts[(path[0], path[1] if len(path) > 1 else None)] += 1
    law = {}
    for a in range(5):
        if a in (0, 1):
            for b in range(5):
                law[(a, b)] = float(shared[a] * probs[a, 1, b])
        else:
            law[(a, None)] = float(shared[a])
    stat, dof = _chi2(counts, law, n)
    assert stat < _chi2_critical(dof), (stat, dof)


def test_verify_stochastic_drafts_keep_the_target_distribution():
    """Drafts d ~ q accepted with min(1, p/q), residual resampling: (x1, x2) ~ p0(x1) p1(x2 | x1)."""
    probs = _synthetic(v=4, seed=5)
    q_gen = torch.Generator().manual_seed(2)
    q = [torch.softmax(torch.randn(4, generator=q_gen) * 2.0, -1) for _ in range(2)]
    n = 8000
    counts = _paths(None, probs, n, q=q)
    p0, p1, q0 = probs[0, 0], probs[0, 1], q[0]
    law = {}
    for a in range(4):
        # the first token is the accepted draft with prob q0(a) min(1, p0(a)/q0(a)); only then do
        # the rows after it exist and the second token follows p1; otherwise it was resampled
        accepted = float(torch.minimum(q0[a], p0[a]))
        for b in range(4):
            law[(a, b)] = accepted * float(p1[b])
        law[(a, None)] = float(p0[a]) - accepted
    stat, dof = _chi2(counts, law, n)
    assert stat < _chi2_critical(dof), (stat, dof)
    # the check has power: emitting the drafts unverified (x1 ~ q0) is rejected
    first = Counter()
    for (a, _), k in counts.items():
        first[a] += k
    wrong = Counter({a: round(n * float(q0[a])) for a in range(4)})
    assert _chi2(wrong, {a: float(p0[a]) for a in range(4)}, n)[0] > _chi2_critical(3)
    assert _chi2(first, {a: float(p0[a]) for a in range(4)}, n)[0] < _chi2_critical(3)


# ---- drafters ----------------------------------------------------------------------------------


def test_prompt_lookup_prefers_longest_match_then_history_then_latest():
    history = TokenHistory([1, 2, 3, 9, 9, 7, 2, 3, 8, 8, 1, 2, 3])
    ref = Reference.of("suffix", [0, 1, 2, 3, 4, 4])
    cands = PromptLookup(max_match=4).propose(history, [ref], max_len=3, max_candidates=3)
    # tail (8, 1, 2, 3): "1 2 3" is the longest match (3 tokens, history at 0 and the reference)
    assert cands[0].source == "history" and cands[0].tokens == [9, 9, 7]
    assert cands[1].source == "suffix" and cands[1].tokens == [4, 4]
    assert cands[2].tokens == [8, 8, 1]  # "2 3" later in the history
    assert [k[2] for k in cands[0].keys] == [3, 3, 3] and [k[3] for k in cands[0].keys] == [0, 1, 2]


def _lookup_by_scan(history, references, max_match, max_len, limit):
    """PromptLookup's rule, spelled out: (source, tokens, match length) per candidate."""
    tail = history[-max_match:]
    found = []
    for order, (kind, src) in enumerate([("history", history), *references]):
        ends = []
        for i in range(len(src) - 1):  # something follows a match; the history's tail is no match
            n = 0
            while n < len(tail) and n <= i and src[i - n] == tail[-1 - n]:
                n += 1
            if n:
                ends.append((n, i))
        ends.sort(reverse=True)  # longest, then latest
        found += [(n, -order, i, kind, src) for n, i in ends[:limit]]
    found.sort(key=lambda f: f[:3], reverse=True)
    out, seen = [], set()
    for n, _, i, kind, src in found:
        tokens = src[i + 1 : i + 1 + max_len]
        if tokens and tuple(tokens) not in seen:
            seen.add(tuple(tokens))
            out.append((kind, tokens, min(n, max_match)))
    return out[:limit]


def test_prompt_lookup_equals_a_scan_as_the_history_grows():
    """The lookup's buffer is made once per history and references, then extended: each step
    must propose what a scan of the whole history and references finds."""
    rng = random.Random(0)
    lookup = PromptLookup(max_match=4)
    checked = 0
    for _ in range(150):
        vocab = rng.choice([2, 3, 6])
        refs = [(rng.choice(["suffix", "workspace"]), [rng.randrange(vocab) for _ in range(rng.randrange(40))])
                for _ in range(rng.randrange(4))]
        references = [Reference.of(kind, ids) for kind, ids in refs]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
        history = TokenHistory(ids)
        for _ in range(rng.randrange(1, 8)):  # past the buffer's first capacity
            limit, max_len = rng.choice([1, 2, 4]), rng.choice([1, 3, 16])
            got = lookup.propose(history, references, max_len, max_candidates=limit)
            assert [(c.source, c.tokens, c.keys[0][2]) for c in got] == \
                _lookup_by_scan(ids, refs, 4, max_len, limit)
            for c in got:
                assert [k[3] for k in c.keys] == [min(j, 8) for j in range(len(c.tokens))]
            checked += len(got)
            new = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            history.extend(new)
            ids += new
    assert checked > 500


def test_model_table_row_updates_and_chains_match_single_updates():
    """`update_row` merges like one `update` per position; chains follow each entry's largest mean."""
    rng = random.Random(1)
    batched, single = ModelTable(orders=(3, 2, 1), top_k=3, keep=4), ModelTable(orders=(3, 2, 1), top_k=3, keep=4)
    for _ in range(300):
        tail = [rng.randrange(5) for _ in range(rng.randrange(4))]
        drafts = [rng.randrange(5) for _ in range(rng.randrange(4))]
        top_ids = [rng.sample(range(8), 3) for _ in range(len(drafts) + 1)]
        top_probs = [[rng.choice([0.5, 0.25, 0.125, rng.random()]) for _ in range(3)] for _ in top_ids]
        batched.update_row(tail, drafts, top_ids, top_probs)
        for i in range(len(drafts) + 1):
            single.update(tail + drafts[:i], top_ids[i], top_probs[i])
        start = [rng.randrange(5) for _ in range(3)]
        chains = [(c.tokens, c.keys, c.priors) for c in batched.propose(start, 8, branches=2)]
        assert chains == [(c.tokens, c.keys, c.priors) for c in single.propose(start, 8, branches=2)]
        for tokens, _, priors in chains:  # each next token: the first of the largest means
            ctx = list(start) + tokens[:1]
            for token, prior in zip(tokens[1:], priors[1:], strict=True):
                _, means = single.lookup(ctx)
                best = max(means.values())
                assert (token, prior) == (next(t for t, m in means.items() if m == best), best)
                ctx.append(token)
    assert [(k, e.count, e.sums) for k, e in batched.entries.items()] == \
        [(k, e.count, e.sums) for k, e in single.entries.items()]


def test_model_table_keeps_running_means_per_context():
    table = ModelTable(orders=(2, 1), top_k=2, keep=4)
    table.update([1, 2], [5, 6], [0.6, 0.3])
    table.update([9, 2], [5, 7], [0.2, 0.7])
    order, dist = table.lookup([1, 2])
    assert order == 2 and dist == pytest.approx({5: 0.6, 6: 0.3})
    order, dist = table.lookup([4, 2])  # unseen pair: falls back to the last token
    assert order == 1 and dist == pytest.approx({5: 0.4, 6: 0.15, 7: 0.35})
    assert table.lookup([3]) is None
    (cand,) = table.propose([1, 2], max_len=3)
    assert cand.tokens[0] == 5 and cand.priors[0] == pytest.approx(0.6)


def test_expected_accepted_of_chains_and_trees():
    assert expected_accepted([([1, 2], [0.5, 0.5])]) == pytest.approx(0.75)
    # a second branch at the root adds its own mass; shared prefixes count once
    assert expected_accepted([([1, 2], [0.5, 0.5]), ([3], [0.25])]) == pytest.approx(1.0)
    assert expected_accepted([([1, 2], [0.5, 0.5]), ([1, 4], [0.5, 0.25])]) == pytest.approx(0.875)
    assert expected_accepted([([1], [0.9]), ([2], [0.9])]) == pytest.approx(1.0)  # siblings exclude


# ---- a tiny random model: greedy trees, stop rules, sampled distributions -----------------------


@pytest.fixture(scope="module")
def tiny():
    return Document.create_simulated("")


def _state(doc, text):
    ids = doc.head + doc.tokenizer.encode(text)
    return DecodeState.from_prompt(doc.model, doc.tokenizer, ids, max_new_tokens=8)


def _plain(state, **kw):
    return decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                  next_position=state.next_position, scratch=state.scratch, scratch_used=state.scratch_used,
                  heal=state.heal, **kw)


PROMPT = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\n" * 2 + "def g(y):\n    return"


def test_greedy_tree_rows_equal_plain_decoding(tiny):
    state = _state(tiny, PROMPT)
    rules = StopRules(max_tokens=24, max_lines=None)
    plain = _plain(state, rules=rules)
    # references holding the true continuation and decoys make several candidate rows
    refs = [Reference.of("recent", plain.ids[i:] + [7, 7]) for i in range(0, 6, 2)]
    refs += [Reference.of("workspace", [plain.ids[0], 3, 4, 5]), Reference.of("suffix", plain.ids[:3] + [9, 9])]
    spec = Speculator(SpeculationConfig(max_rows=4, measure_cost=False, row_cost=0.01, threshold=0.99))
    for _ in range(3):
        out = spec.decode(state, rules=rules, references=refs)
        _same(plain, out)
        c = _check_counters(out)
    assert c.rows > c.forwards, "no step verified several rows"
    assert c.accepted > 0 and out.stats.forwards < plain.stats.forwards


@pytest.mark.parametrize("rules", [
    StopRules(max_tokens=12, max_lines=1),
    StopRules(max_tokens=1, max_lines=None),
    StopRules(max_tokens=9, max_lines=None),
])
def test_greedy_stop_rules_match(tiny, rules):
    state = _state(tiny, PROMPT)
    plain = _plain(state, rules=rules)
    spec = Speculator(SpeculationConfig(measure_cost=False))
    refs = [Reference.of("recent", plain.ids * 2)]
    for _ in range(2):
        out = spec.decode(state, rules=rules, references=refs)
        _same(plain, out)
        _check_counters(out)


@pytest.mark.parametrize("model", ["tiny", "trained"])
def test_output_counts_line_ends_as_the_decoded_text_does(model, request):
    """Output counts line ends from token bytes, once per token: the same count and the same
    stop as LineStopper's decoding of all ids, with multi-byte characters split across tokens."""
    tok = request.getfixturevalue(model).tokenizer
    token_bytes = healer_for(tok).token_bytes
    for t in range(tok.vocab_size):
        assert tok.decode([t]).count("\n") == token_bytes.get(t, b"").count(b"\n"), t
    newline = [t for t, b in token_bytes.items() if b"\n" in b]
    broken = [t for t, b in token_bytes.items() if b[-1] >= 0x80]  # may end inside a UTF-8 character
    any_token = [t for t in range(tok.vocab_size) if t not in tok.stop_ids]
    assert newline and broken
    rng = random.Random(2)
    for max_lines in (1, 2, 5):
        for _ in range(40):
            out = Output(tok, StopRules(max_tokens=60, max_lines=max_lines), b"")
            stopper = LineStopper(tok, max_lines)
            while out.reason is None:
                pool = rng.choice([newline, broken, any_token])
                out.emit([rng.choice(pool)], [0.0])
                assert draft_cut(out).lines_left == max_lines - tok.decode(out.ids).count("\n")
                assert (out.reason == "lines") == stopper.cut(out.ids)[1]


def test_stop_token_and_cancellation(tiny):
    state = _state(tiny, PROMPT)
    first = _plain(state, rules=StopRules(max_tokens=4, max_lines=None))
    spec = Speculator(SpeculationConfig(measure_cost=False))
    stop = StopRules(max_tokens=4, max_lines=None, stop_ids=frozenset({first.ids[0]}))
    out = spec.decode(state, rules=stop)
    assert out.ids == [] and out.stop_reason == "stop_token"
    assert SpecCounters.read(out.stats.extra).discarded == 1
    # a stop token inside accepted drafts cuts the output there, like plain decoding
    stop_later = StopRules(max_tokens=20, max_lines=None, stop_ids=frozenset({first.ids[2]}))
    _same(_plain(state, rules=stop_later), spec.decode(state, rules=stop_later,
                                                       references=[Reference.of("recent", first.ids)]))
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) >= 2

    out = spec.decode(state, rules=StopRules(max_tokens=30, max_lines=None, should_stop=cancel))
    assert out.stop_reason in ("cancelled", "stop_token")
    if out.stop_reason == "cancelled":
        assert out.stats.forwards == 1
    _check_counters(out)


def _target_law(state, params):
    """Exact law of the first two output tokens (a stop token ends the output), and p(x2 | x1)."""
    model = state.model
    stop = state.tokenizer.stop_ids
    p0 = sampling_probs(state.first_logits, params)[0]
    law, after = {}, {}
    for a in torch.nonzero(p0 > 1e-4).flatten().tolist():
        if a in stop:
            law[()] = law.get((), 0.0) + float(p0[a])
            continue
        cache = model.new_cache(1)
        logits = model(torch.tensor([[a]]), torch.tensor([state.next_position]), write=cache, write_at=0,
                       context=state.context, logits="last")
        after[a] = p1 = sampling_probs(logits, params)[0]
        for b in torch.nonzero(p1 > 1e-4).flatten().tolist():
            key = (a,) if b in stop else (a, b)
            law[key] = law.get(key, 0.0) + float(p0[a] * p1[b])
    return law, after


@pytest.mark.parametrize("drafters", [("lookup",), ("table",)])
def test_sampling_keeps_the_distribution_end_to_end(tiny, drafters):
    """Drafts that are often wrong, through the real forward path, leave the output law unchanged.

    lookup: point-mass drafts of the second most likely token (sample-and-compare rule).
    table: a frozen table whose q favours unlikely tokens (min(1, p/q) + residual resampling).
    """
    params = SamplingParams(temperature=0.15, top_p=0.95)
    state = _state(tiny, PROMPT)
    law, after = _target_law(state, params)
    rules = StopRules(max_tokens=3, max_lines=None)
    spec = Speculator(SpeculationConfig(drafters=drafters, measure_cost=False, threshold=0.99))
    refs = []
    for a, p1 in after.items():
        top = p1.topk(5)
        if "lookup" in drafters:
            refs.append(Reference.of("recent", [*state.prompt_ids[-6:], a, int(top.indices[1])]))
        else:
            q = torch.linspace(0.1, 0.3, 5)  # the least likely of the five gets the most mass
            spec.table.update([*state.prompt_ids, a], top.indices.tolist(), q.tolist())
    spec.learn = lambda *args: None  # keep q wrong
    n = 700
    counts = Counter()
    totals = SpecCounters()
    for seed in range(n):
        out = spec.decode(state, params=SamplingParams(0.15, 0.95, seed=seed), rules=rules, references=refs)
        c = _check_counters(out)
        totals.drafted += c.drafted
        totals.accepted += c.accepted
        counts[tuple(out.ids[:2])] += 1
    stat, dof = _chi2(counts, law, n)
    assert stat < _chi2_critical(dof), (stat, dof, counts.most_common(5))
    assert totals.drafted > n // 2 and 0 < totals.accepted < totals.drafted / 2, totals


# ---- the trained default model on realedits contexts, both views -----------------------------


@pytest.fixture(scope="module")
def trained():
    return load_model(None)


def _realedits_contexts(n, max_file_chars):
    if not DEFAULT_DATA.exists():
        pytest.skip(f"realedits data not found at {DEFAULT_DATA}")
    out = []
    with gzip.open(DEFAULT_DATA, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if len(rec["after"]) > max_file_chars:
                continue
            for target in rec["targets"]:
                text = rec["after"]
                start = line_starts(text)[target["line"]]
                cursor = start + len(target["prefix"])
                deleted = text[:cursor] + text[cursor + len(target["expected"]):]
                out.append((deleted, cursor))
                break  # one target per record: more files
            if len(out) >= n:
                return out
    return out


def _repo_contexts(n):
    """Contexts from this repository's own code (present in any clone): a line's text after
    its indentation deleted, the cursor there, as the realedits targets are made."""
    root = Path(__file__).resolve().parents[2]
    out = []
    for name in ("engine/sampling.py", "engine/healing.py", "edit_cache/tokens.py"):
        text = (root / name).read_text()
        starts = line_starts(text)
        for i in range(12, len(starts) - 1, 9):
            line = text[starts[i] : starts[i + 1]]
            body = line.strip()
            if len(body) < 12:
                continue
            cursor = starts[i] + len(line) - len(line.lstrip())
            out.append((text[:cursor] + text[cursor + len(body):], cursor))
            if len(out) >= n:
                return out
    return out


def _greedy_identical(trained, n, max_file_chars, rules_for, chained=False, contexts=None, device=False):
    tok = trained.tokenizer
    head = doc_start_ids(tok, trained.config)
    chain = Speculator(SpeculationConfig(device_lookup=device))
    tree = Speculator(SpeculationConfig(max_rows=3, measure_cost=False, row_cost=0.3, device_lookup=device,
                                        device_width=4, device_in_flight=1))
    healed = multi_line = accepted = chained_tokens = device_forwards = 0
    if chained or device:  # the static forward the GPU replays, run eagerly
        trained.runner.enable_graphs(bucket=256, max_width=16, mode="static")
    try:
        for i, (text, cursor) in enumerate(contexts or _realedits_contexts(n, max_file_chars)):
            doc = Document(trained.runner, tok, text, head=head)
            rules = rules_for(i)
            suffix = [Reference.of("suffix", tok.encode(text[cursor : cursor + 4000]))]
            # each view built right before its decodes: the two share the document's scratch slots
            for kind, spec, refs in (("l2r", chain, suffix), ("fim", tree, [])):
                if kind == "l2r":
                    view = left_to_right(doc, cursor, max_new_tokens=rules.max_tokens)
                else:
                    view = fill_in_middle(doc, cursor, suffix="next_line", max_new_tokens=rules.max_tokens)
                plain = view.decode(rules=rules)
                out = spec.decode(view.state(), rules=rules, references=refs)
                _same(plain, out)
                counters = _check_counters(out)
                accepted += counters.accepted
                chained_tokens += counters.chained
                device_forwards += counters.by_source.get("device", [0, 0])[0]
                healed += bool(view.heal)
                multi_line += "\n" in out.text
    finally:
        trained.runner.disable_graphs()
    assert healed > 0 and multi_line > 0 and accepted > 0
    if not device:  # the device path may also run plain chains where its drafts do not pay
        assert (chained_tokens > 0) == chained
    assert (device_forwards > 0) == device
    return accepted


def test_greedy_identical_on_realedits_both_views(trained):
    _greedy_identical(trained, 10, 3000,
                      lambda i: StopRules(max_tokens=24, max_lines=None if i % 2 else 2))


def test_greedy_identical_with_chained_steps_where_nothing_is_drafted(trained):
    """On graphed forwards (here their static form on the CPU) a step with nothing to draft runs
    plain steps as one device-side chain; the output stays plain greedy decoding's."""
    _greedy_identical(trained, 6, 0, lambda i: StopRules(max_tokens=24, max_lines=None if i % 2 else 2),
                      chained=True, contexts=_repo_contexts(6))


def test_greedy_identical_with_drafting_and_verification_on_the_device(trained):
    """StaticForward.lookup_chain (prompt lookup, verification and the next inputs on the device,
    here in its static form on the CPU) keeps plain greedy decoding's output, in both views."""
    _greedy_identical(trained, 6, 0, lambda i: StopRules(max_tokens=24, max_lines=None if i % 2 else 2),
                      device=True, contexts=_repo_contexts(6))


@pytest.mark.parametrize("plain_costs", [0.001, 1000.0])
def test_device_speculation_switches_to_plain_chains_where_drafts_do_not_pay(trained, plain_costs):
    """With plain chained steps measured far cheaper than a device-side verification, each
    lookup chain is followed by a plain chain; far dearer, none runs. The output is greedy's."""
    tok = trained.tokenizer
    head = doc_start_ids(tok, trained.config)
    spec = Speculator(SpeculationConfig(drafters=("lookup",), device_width=4, device_steps=2, chain_steps=4))
    spec.cost.record_chain(plain_costs)
    spec.cost.record(1, 4, 1.0)
    rules = StopRules(max_tokens=40, max_lines=None)
    trained.runner.enable_graphs(bucket=256, max_width=16, mode="static")
    try:
        chained = device = 0
        for text, cursor in _repo_contexts(3):
            view = left_to_right(Document(trained.runner, tok, text, head=head), cursor, max_new_tokens=40)
            spec.cost.chain_ms = plain_costs  # as measured: the runs' own timings would move it
            out = spec.decode(view.state(), rules=rules)
            _same(view.decode(rules=rules), out)
            counters = _check_counters(out)
            chained += counters.chained
            device += counters.forwards
    finally:
        trained.runner.disable_graphs()
    assert device > 0
    assert (chained > 0) == (plain_costs < 1)


def test_device_chains_are_sized_to_the_lines_left(trained):
    """Under a line rule, device chains ask for about the tokens lines have been taking, so a
    one-line completion verifies fewer times than with chains sized to the token budget."""
    tok = trained.tokenizer
    head = doc_start_ids(tok, trained.config)
    rules = StopRules(max_tokens=48, max_lines=1)
    trained.runner.enable_graphs(bucket=256, max_width=16, mode="static")
    try:
        fewer = 0
        for text, cursor in _repo_contexts(4):
            view = left_to_right(Document(trained.runner, tok, text, head=head), cursor, max_new_tokens=48)
            forwards = []
            for line_tokens in (None, 1.0):
                spec = Speculator(SpeculationConfig(drafters=("lookup",), measure_cost=False))
                spec.line_tokens = line_tokens
                out = spec.decode(view.state(), rules=rules)
                _same(view.decode(rules=rules), out)
                forwards.append(SpecCounters.read(out.stats.extra).forwards)
            assert forwards[1] <= forwards[0]
            fewer += forwards[1] < forwards[0]
    finally:
        trained.runner.disable_graphs()
    assert fewer > 0


def test_search_buffer_keeps_the_history_tail_and_reference_heads():
    history = TokenHistory(list(range(100)))
    refs = [Reference.of("suffix", [7] * 30), Reference.of("workspace", [8] * 30)]
    buf = search_buffer(history, refs, 1000).tolist()
    assert buf == [-1, *[7] * 30, -1, *[8] * 30, -1, *range(100)]  # the history last: chains append there
    buf = search_buffer(history, refs, 120).tolist()
    assert len(buf) == 120 and buf[-100:] == list(range(100)) and buf[:2] == [-1, 7]  # the suffix's head
    buf = search_buffer(TokenHistory(list(range(5000))), refs, 1000).tolist()
    assert buf == [-1, *range(4001, 5000)]  # a long history: its tail, no room for references
    assert search_buffer(TokenHistory([]), refs, 1000) is None


def test_tokens_left_under_a_line_rule(trained):
    out = Output(trained.tokenizer, StopRules(max_tokens=40, max_lines=2), b"")
    assert tokens_left(out, None) == 40
    out.ids, out.lines, out.in_line = [1] * 13, 1, 3
    assert tokens_left(out, 10.0) == 7  # one line left, 3 of its ~10 tokens emitted
    assert tokens_left(out, 100.0) == 27  # never past the token budget
    out.in_line = 30
    assert tokens_left(out, 10.0) == 15  # a line running long: half as long again
    out.in_line = 1
    assert tokens_left(out, 1.0) == 1  # at least one token


def test_device_speculation_stops_and_cancels_between_chains(trained):
    """A stop token inside a device chain cuts the output there (the chain in flight is
    dropped), and cancellation is polled after each chain: the output is then a prefix of
    greedy's, and the next request decodes normally."""
    tok = trained.tokenizer
    text, cursor = _repo_contexts(1)[0]
    rules = StopRules(max_tokens=40, max_lines=None)
    trained.runner.enable_graphs(bucket=256, max_width=16, mode="static")
    try:
        view = left_to_right(Document(trained.runner, tok, text, head=doc_start_ids(tok, trained.config)), cursor,
                             max_new_tokens=40)
        plain = view.decode(rules=rules)
        spec = Speculator(SpeculationConfig(drafters=("lookup",), measure_cost=False, device_steps=2))
        stop = StopRules(max_tokens=40, max_lines=None, stop_ids=frozenset({plain.ids[5]}))
        _same(view.decode(rules=stop), spec.decode(view.state(), rules=stop))
        calls = []
        cancelled = spec.decode(view.state(), rules=StopRules(max_tokens=40, max_lines=None,
                                                              should_stop=lambda: calls.append(1) or len(calls) >= 2))
        assert cancelled.stop_reason == "cancelled" and len(calls) == 2
        assert 0 < len(cancelled.ids) < len(plain.ids) and cancelled.ids == plain.ids[: len(cancelled.ids)]
        _check_counters(cancelled)
        _same(plain, spec.decode(view.state(), rules=rules))
    finally:
        trained.runner.disable_graphs()


@pytest.mark.slow
def test_greedy_identical_on_realedits_many_contexts(trained):
    _greedy_identical(trained, 40, 8000,
                      lambda i: StopRules(max_tokens=64, max_lines=None if i % 3 else 1))


def test_verification_rows_reuse_the_views_spans(trained):
    """The first verification attends to the view's spans + its scratch, like plain decoding's steps."""
    tok = trained.tokenizer
    text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
    doc = Document(trained.runner, tok, text, head=doc_start_ids(tok, trained.config))
    cursor = text.index("return a - b") + len("return a ")
    view = fill_in_middle(doc, cursor)
    state = view.state()
    assert all(isinstance(s, Span) for s in state.context)
    rules = StopRules(max_tokens=8, max_lines=1)
    _same(view.decode(rules=rules), Speculator().decode(state, rules=rules))


def test_plan_drafts_only_where_it_beats_a_chain_of_plain_steps():
    """With a measured chain cost per token, a draft must promise more tokens per verification
    than chaining would give in the same time; without chains the same draft is planned."""
    spec = Speculator()
    history = TokenHistory([5, 6, 7, 8] * 6 + [5, 6])  # prompt lookup: "7 8 5 6 ..." follows
    spec.cost.record(1, 1, 1.0)
    for width in range(2, 18):
        spec.cost.record(1, width, 1.1)
    assert any(spec.plan(history, [], 8, greedy=True).drafts)
    spec.cost.record_chain(0.9)  # a chained token costs about a verification: drafting still pays
    assert any(spec.plan(history, [], 8, greedy=True, chain=True).drafts)
    fast = Speculator()
    fast.cost.record(1, 1, 1.0)
    for width in range(2, 18):
        fast.cost.record(1, width, 1.1)
    fast.cost.record_chain(0.05)  # 22 chained tokens per verification's time: no draft is worth it
    assert not any(fast.plan(history, [], 8, greedy=True, chain=True).drafts)
    assert any(fast.plan(history, [], 8, greedy=True, chain=False).drafts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_speculation_replays_graphs_and_keeps_greedy_output():
    """On CUDA the device-side chain replays one captured graph per iteration (drafting,
    verification, the next inputs); in fp32 its output is plain greedy decoding's."""
    loaded = load_model(None, device="cuda", dtype="float32")
    tok = loaded.tokenizer
    head = doc_start_ids(tok, loaded.config)
    spec = Speculator(SpeculationConfig(drafters=("lookup",)))
    rules = StopRules(max_tokens=48, max_lines=None)
    for text, cursor in _repo_contexts(6):
        doc = Document(loaded.runner, tok, text, head=head)
        for build in (left_to_right, fill_in_middle):
            view = build(doc, cursor, max_new_tokens=rules.max_tokens)
            plain = view.decode(rules=rules)
            out = spec.decode(view.state(), rules=rules, references=[Reference.of("suffix", tok.encode(text[cursor:]))])
            _same(plain, out)
            _check_counters(out)
    chains = loaded.runner.static.lookup_chains
    assert chains > 0 and loaded.runner.static.captures < loaded.runner.static.replays


def test_a_passed_lines_deadline_ends_at_the_first_line_end_with_text(trained):
    """`lines_until` (a multi-line suggestion's time limit) in the past: plain decoding and
    speculation, on the host and on the device, end at the first line end with text before it,
    as the line rule would there; one in the future changes nothing."""
    import time
    from dataclasses import replace

    tok = trained.tokenizer
    head = doc_start_ids(tok, trained.config)
    free = StopRules(max_tokens=40, max_lines=None)
    late = replace(free, lines_until=0.0)
    cut_short = 0
    trained.runner.enable_graphs(bucket=256, max_width=16, mode="static")
    try:
        speculators = (Speculator(SpeculationConfig()), Speculator(SpeculationConfig(device_lookup=True)))
        for text, cursor in _repo_contexts(8):
            doc = Document(trained.runner, tok, text, head=head)
            view = left_to_right(doc, cursor, max_new_tokens=40)
            whole = view.decode(rules=free)
            parts = tok.decode(whole.ids).split("\n")
            k = next((i for i in range(1, len(parts)) if "\n".join(parts[:i]).strip()), None)
            cut = view.decode(rules=late)
            if k is None:
                assert cut.text == whole.text
            else:
                assert (cut.text, cut.stop_reason) == (view.decode(rules=replace(free, max_lines=k)).text, "lines")
                cut_short += len(cut.text) < len(whole.text)
            for spec in speculators:
                _same(cut, spec.decode(view.state(), rules=late))
            assert view.decode(rules=replace(free, lines_until=time.perf_counter() + 3600)).text == whole.text
    finally:
        trained.runner.disable_graphs()
    assert cut_short >= 2
