"""The host loop (`speculative_decode`) and the `Speculator` that outlives requests (drafters'
tables, acceptance estimates, costs, recent completions).

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from editkv.engine.decoding.adadec import AdaDecConfig, Gate, Rerank
from editkv.engine.decoding.drafters import (
    AcceptanceEstimator,
    Candidate,
    ModelTable,
    PromptLookup,
    Reference,
    TokenHistory,
)
from editkv.engine.decoding.speculative.config import SpecCounters, SpeculationConfig
from editkv.engine.decoding.speculative.device import plain_chain, speculate_on_device
from editkv.engine.decoding.speculative.output import DraftCut, draft_cut
from editkv.engine.decoding.speculative.planning import Plan, StepCost, expected_accepted
from editkv.engine.decoding.speculative.verify import first_fire, judge, rollout_candidate
from editkv.engine.generate import Completion, DecodeState, DecodeStats, Output, StopRules, chain_length
from editkv.engine.model import KVCache, Span
from editkv.engine.sampling import SamplingParams


class Speculator:
    """What outlives a request: the model table, acceptance estimates and recent completions.

    One per model (the table holds that model's distributions); not thread-safe.
    """

    def __init__(self, config: SpeculationConfig | None = None) -> None:
        self.config = config or SpeculationConfig()
        cfg = self.config
        self.lookup = PromptLookup(cfg.max_match)
        self.table = ModelTable(cfg.table_orders, cfg.table_top_k, max_contexts=cfg.table_contexts)
        self.estimator = AcceptanceEstimator()
        self.cost = StepCost(cfg.measure_cost, cfg.row_cost)
        self.recent: deque[Reference] = deque(maxlen=cfg.recent)
        self.device_rate = 2.0  # tokens kept per device-side verification (running mean)
        self.line_tokens: float | None = None  # tokens a completed line took (running mean)

    def decode(self, state: DecodeState, *, params: SamplingParams | None = None, rules: StopRules | None = None,
               references: Sequence[Reference] = (), stats: DecodeStats | None = None,
               adadec: AdaDecConfig | None = None) -> Completion:
        """`speculative_decode` with this speculator."""
        return speculative_decode(state, self, params=params, rules=rules, references=references, stats=stats,
                                  adadec=adadec)

    def plan(self, history: TokenHistory, references: Sequence[Reference], budget: int, *, greedy: bool,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             cut: DraftCut | None = None, extra: Sequence[Candidate] = (), chain: bool = False) -> Plan:
        """Candidate chains from every drafter (and `extra` ones the decoder has, e.g. AdaDec's
        winning rollout), cut by SpecDec++'s rule; the best by expected tokens per unit of
        forward cost, plus tree rows while they raise it.

        `chain`: the decoder can run plain steps as a device-side chain instead; once its cost per
        token is measured, a draft must beat that rate, not a one-token verification's."""
        cfg = self.config
        if budget <= 0:
            return Plan()
        no_draft = self.goodput(0.0, 1, 1)
        if chain and self.cost.measure and self.cost.chain_ms:
            no_draft = max(no_draft, 1.0 / self.cost.chain_ms)
        candidates: list[Candidate] = [c.truncate(budget) for c in extra if c.tokens]
        if "lookup" in cfg.drafters:
            candidates += self.lookup.propose(history, references, budget, max_candidates=cfg.max_rows + 1)
        if "table" in cfg.drafters:
            stochastic = not greedy and cfg.stochastic_table
            candidates += self.table.propose(history.tail(self.table.max_order), budget,
                                             branches=1 if stochastic else cfg.max_rows,
                                             temperature=temperature if stochastic else 0.0, generator=generator)
        scored = []  # (value, candidate cut to its best length, acceptance estimates)
        for cand in candidates:
            if cut is not None:
                cand = cand.truncate(cut.length(cand.tokens))
            accept, kept = [], 1.0
            for key, prior in zip(cand.keys, cand.priors, strict=True):
                p = self.estimator.estimate((greedy, *key), prior)
                if 1.0 - kept * p > cfg.threshold:
                    break
                kept *= p
                accept.append(p)
            # the prefix with the most expected tokens per cost (no draft at all if none beats it)
            best_len, best_value, reach, expected = 0, no_draft, 1.0, 0.0
            for j, p in enumerate(accept):
                reach *= p
                expected += reach
                value = self.goodput(expected, 1, j + 2)
                if value > best_value:
                    best_len, best_value = j + 1, value
            if best_len:
                scored.append((best_value, cand.truncate(best_len), accept[:best_len]))
        if not scored:
            return Plan()
        scored.sort(key=lambda s: s[0], reverse=True)
        value, first, first_accept = scored[0]
        chosen = [(first, first_accept)]
        if cfg.max_rows > 1 and first.q is None:
            pool = [(c, a) for _, c, a in scored[1:] if c.q is None]
            while pool and len(chosen) < cfg.max_rows:
                values = []
                for extra in pool:
                    rows = [*chosen, extra]
                    width = 1 + max(len(c.tokens) for c, _ in rows)
                    values.append(self.goodput(expected_accepted([(c.tokens, a) for c, a in rows]), len(rows), width))
                best = int(np.argmax(values))
                if values[best] <= value:
                    break
                chosen.append(pool.pop(best))
                value = values[best]
        return Plan([c for c, _ in chosen], [a for _, a in chosen])

    def goodput(self, expected: float, rows: int, width: int) -> float:
        """Expected tokens per forward (accepted + bonus) over the forward's estimated cost."""
        return (1.0 + expected) / self.cost.estimate(rows, width)

    def observe(self, plan: Plan, path: Sequence[int], greedy: bool) -> None:
        """Update acceptance estimates: each row's drafts agree with the emitted `path` up to a point."""
        for cand in plan.rows:
            agree = 0
            while agree < len(cand.tokens) and agree < len(path) and cand.tokens[agree] == path[agree]:
                agree += 1
            for j in range(agree):
                self.estimator.update((greedy, *cand.keys[j]), True)
            if agree < len(cand.tokens):
                self.estimator.update((greedy, *cand.keys[agree]), False)

    def learn(self, tail: Sequence[int], drafts: Sequence[int], top_ids: Sequence[Sequence[int]],
              top_probs: Sequence[Sequence[float]]) -> None:
        """Merge the model's top-k after `tail + drafts[:i]` (row position i) into the table."""
        if "table" not in self.config.drafters:
            return
        self.table.update_row(tail, drafts, top_ids, top_probs)

    def remember(self, ids: Sequence[int]) -> None:
        """Keep a completion as a reference for the next requests (a re-request after typing)."""
        if self.config.recent and ids:
            self.recent.append(Reference.of("recent", ids))


def speculative_decode(
    state: DecodeState,
    speculator: Speculator,
    *,
    params: SamplingParams | None = None,
    rules: StopRules | None = None,
    references: Sequence[Reference] = (),
    stats: DecodeStats | None = None,
    adadec: AdaDecConfig | None = None,
) -> Completion:
    """Decode from `state` like engine.generate.decode, verifying drafts in each forward.

    `references`: token sequences to copy from besides the prompt (the suffix in a
    left-to-right view, other open documents, shown suggestions). Greedy decoding on graphed
    forwards (the runner's `static`) runs the steps it has nothing to draft for as device-side chains
    of `config.chain_steps` plain steps (counted as `chained`, not as verifications). Counters go to
    `stats.extra` (`SpecCounters.read`). Cancellation (`should_stop`) is polled before each
    forward, so a cancelled request may hold more tokens than plain decoding's.

    `adadec` (greedy only) gates each position the verification scored: drafts are accepted
    up to the first position whose entropy reaches tau, and there the lookahead rerank picks
    the token (and its winning rollout becomes the next step's draft). The output is then
    adadec_decode's; gate counters go to `stats.extra` as `adadec_*`, rollout forwards count
    in `stats.forwards` (not in `spec.forwards`).
    """
    params = params or SamplingParams()
    rules = rules or StopRules()
    stats = stats or DecodeStats()
    cfg = speculator.config
    model = state.model
    device = model.device
    greedy = params.greedy
    first_logits = state.first_logits  # [1, V]
    assert first_logits.dim() == 2 and first_logits.shape[0] == 1, "first_logits must be [1, V]"
    scratch, used = state.scratch, state.scratch_used
    scratch.ensure_capacity(used + rules.max_tokens + 1, keep=used)  # drafts never pass max_tokens
    out = Output(state.tokenizer, rules, state.heal)
    counters = SpecCounters()
    history = TokenHistory(state.prompt_ids)
    refs = [*references, *speculator.recent]
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    rows_cache = None
    order = speculator.table.max_order
    gate = None
    chainable = (greedy and adadec is None and cfg.chain_steps > 0 and model.static is not None
                 and rules.max_tokens > 0)
    on_device = chainable and cfg.device_lookup and "lookup" in cfg.drafters
    if adadec is not None and adadec.tau < math.inf:
        if not greedy:
            raise ValueError("AdaDec reranks greedy decoding; it does not combine with sampling")
        gate = Gate(model, adadec, out.stop_ids, out.healer if state.heal else None)
    started = time.perf_counter()

    # The first token comes from the state's logits: no forward, no drafts.
    logits = first_logits[None]  # [1, 1, V]
    plan = Plan()
    forward_started = None
    while True:
        drafts = plan.drafts
        tail = history.tail(order)
        top_k = speculator.table.top_k if "table" in cfg.drafters else 0
        verdict, logprobs, top_ids, top_probs = judge(logits, plan, out, params, generator, top_k)
        if forward_started is not None:  # judge waited for the forward's results
            speculator.cost.record(len(drafts), 1 + max(len(d) for d in drafts),
                                   1000 * (time.perf_counter() - forward_started))
        r, accepted, token = verdict.row, verdict.accepted, verdict.token
        rerank: Rerank | None = None
        fired = None  # AdaDec: the first uncertain position on the kept path decides there
        if gate is not None:
            fired = first_fire(gate, logits[r], drafts[r][:accepted], out)
            if fired is not None:
                accepted = fired
        if len(drafts) > 1:  # keep the chosen row's K/V: the emitted token and accepted drafts
            slot = used + len(out.ids) - 1
            for name in ("k", "v"):
                getattr(scratch, name)[:, 0, :, slot : slot + accepted + 1] = \
                    getattr(rows_cache, name)[:, r, :, : accepted + 1]
        if fired is not None:
            at = logits[r, fired : fired + 1]  # [1, V]
            choose_from = out.healer.mask(at, out.remaining) if out.remaining else at
            n = len(out.ids) + fired  # the output index this position chooses
            token, rerank = gate.rerank(choose_from, [*state.context, Span(scratch, 0, used + n)],
                                        state.next_position + n, out.remaining)
            logprobs = [*logprobs[:fired], float(torch.log_softmax(at[0].float(), -1)[token])]
        path = [*drafts[r][:accepted], token]
        if top_k:
            speculator.learn(tail, drafts[r], top_ids, top_probs)
        if plan.rows:
            speculator.observe(plan, path, greedy)
            counters.drafted += sum(len(d) for d in drafts)
            counters.accepted += accepted
            counters.rows += len(drafts)
            for cand in plan.rows:
                counters.by_source.setdefault(cand.source, [0, 0])[0] += len(cand.tokens)
            counters.by_source[plan.rows[r].source][1] += accepted
        appended = out.emit(path, logprobs)
        counters.discarded += len(path) - appended
        if gate is not None:
            gate.counters.steps += appended + (out.reason == "stop_token")
        if out.reason is not None:
            break
        history.extend(path)
        if rules.should_stop is not None and rules.should_stop():
            out.reason = "cancelled"
            break

        if on_device and not out.remaining:
            if speculate_on_device(state, speculator, out, history, refs, stats, counters):
                break
            on_device = False  # shapes the device chain does not serve: draft on the host

        # Draft, then verify the last emitted token + drafts in one forward.
        n = len(out.ids)
        budget = 0 if out.remaining else min(cfg.max_draft, rules.max_tokens - n - 1)
        extra = [rollout_candidate(rerank)] if rerank is not None else []
        # a step's cost runs from its drafting to its verdict: what a chain's tokens compete with
        forward_started = time.perf_counter()
        plan = speculator.plan(history, refs, budget, greedy=greedy, temperature=params.temperature,
                               generator=generator, cut=draft_cut(out), extra=extra, chain=chainable)
        # Nothing to draft: plain greedy steps chained on the device cost a fraction of a
        # verification step each (no drafting, no verdict, no wait between them); drafting
        # resumes after the chain.
        while chainable and not any(plan.drafts) and not out.remaining:
            steps = chain_length(cfg.chain_steps, rules.max_tokens - n)
            chain_started = time.perf_counter()
            chain = plain_chain(state, out, steps, stats, counters)
            if chain is None:
                break
            path, chain_logprobs = chain
            speculator.cost.record_chain(1000 * (time.perf_counter() - chain_started) / steps)
            appended = out.emit(path, chain_logprobs)
            counters.discarded += steps - appended
            if out.reason is None and rules.should_stop is not None and rules.should_stop():
                out.reason = "cancelled"
            if out.reason is not None:
                break
            history.extend(path)
            n = len(out.ids)
            budget = min(cfg.max_draft, rules.max_tokens - n - 1)
            forward_started = time.perf_counter()
            plan = speculator.plan(history, refs, budget, greedy=greedy, temperature=params.temperature,
                                   generator=generator, cut=draft_cut(out), chain=True)
        if out.reason is not None:
            break
        rows = [[out.ids[-1], *d] for d in plan.drafts]
        width = max(len(row) for row in rows)
        rows = [row + [row[-1]] * (width - len(row)) for row in rows]  # padding is never accepted
        slot = used + n - 1
        context = [*state.context, Span(scratch, 0, slot)]
        write, write_at = scratch, slot
        if len(rows) > 1:
            if rows_cache is None:
                rows_cache = model.new_cache(cfg.max_draft + 1, batch=cfg.max_rows, dtype=scratch.dtype)
            write = KVCache(rows_cache.k[:, : len(rows)], rows_cache.v[:, : len(rows)])
            write_at = 0
        positions = torch.arange(state.next_position + n - 1, state.next_position + n - 1 + width, device=device)
        logits = model(torch.tensor(rows, device=device), positions, write=write, write_at=write_at,
                       context=context, logits="all")  # [B, T, V]
        stats.forwards += 1
        counters.forwards += 1
        counters.bonus += 1

    stats.decode_tokens += len(out.ids)
    stats.decode_ms += 1000 * (time.perf_counter() - started)
    counters.write(stats.extra)
    if gate is not None:
        stats.forwards += gate.counters.extra_forwards
        gate.counters.write(stats.extra)
    speculator.remember(out.ids)
    if out.reason == "lines" and out.lines:  # how long lines run, for sizing device chains
        tokens = len(out.ids) / out.lines
        old = speculator.line_tokens
        speculator.line_tokens = tokens if old is None else old + 0.2 * (tokens - old)
    return Completion(out.ids, out.text(state.heal), out.reason, stats, out.logprob)
