"""Superposed decoding: k drafts from one forward pass per step (arXiv 2405.18400).

Data flow of a step: k live drafts (an Output each, cumulative score) -> one input embedding
`sum_i gamma_i * E[last token of draft i]`, gamma = softmax(scores) -> one batch-1 forward
into the next slot of the state's scratch cache, shared by all drafts -> one distribution
p_LLM = softmax(logits / T) -> for each draft its top m tokens, scored
`(1 - alpha) log p_LLM(x) + alpha log p_ng(x | the draft's last tokens)` and renormalised
over the m -> each extension is its draft's engine.generate.Output plus one `emit`: of the
k x m, those the output rules end go to the pool of finished drafts (unless empty: an empty
line is no suggestion) and the best k unfinished, distinct by text, live on. Decoding ends
when no draft is live, or the pool holds k drafts no live one can beat (scores only fall as
drafts grow), or at the latency budget: once the best draft is finished (where greedy
decoding would have stopped, after s tokens) the others get until max(1.5 s, s + 8) tokens,
and unfinished ones are returned as they are, after the finished.

Superposition blurs the cache: after a few steps the shared slots hold mixtures. Every
`reset_every` superposed steps the best live draft is committed: its tokens since the last
commit are re-encoded for real (one multi-token forward over the superposed slots) and
superposition restarts from it alone. A single live draft is never mixed, so with k = 1 and
alpha = 0 this is plain greedy decoding (tests/engine/test_superposed.py checks it).

p_ng = sum_{n=2..6} lambda_n p_n(x | last n-1 tokens), unsmoothed: per order the workspace
index (engine.decoding.ngram_index) and, for orders it has, the corpus table shipped with the
default model (engine.ngram) are mixed. Where p_ng has no mass for any of a draft's candidates
(no context seen) the draft is scored by the model alone; where it has mass for some, the
others get `ngram_floor` instead of 0, a penalty rather than a veto, so a new identifier the
model is sure of still wins.

The contract is engine.generate.decode's, through its Output (one per draft): StopRules (stop
ids, line limit and multi-line time limit, max tokens, `should_stop` polled before every
forward), `stop_text`, and token healing (a draft's first tokens spell `state.heal`, which is
cut from its text). Embedding scaling: the mixture goes through `Transformer.embed`, the one
place a family that scales embeddings would do it; the sum is linear, so scaling each E_i or
the sum is the same. The families we load scale nothing.
Where the model's static forward serves the state (CUDA graphs: the server's views), the steps
run in chains on the device instead (engine.decoding.superposed_device, `device_steps` per host
read), with the same drafts: the chains apply the tables `token_rules` derives from the drafts'
Output (stop ids, line rule). The tables hold no text and no clock: `stop_text` keeps a request
on the host loop, and the multi-line time limit applies to the steps the host loop runs only
(chains go on to the token limit, as before the time limit existed). Knows nothing about
documents or LSP: a DecodeState in, drafts out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.decoding.superposed_device import (
    BUDGET,
    BUDGET_AT,
    COMMITTED,
    LENGTH,
    NO_LIVE,
    POOL_FULL,
    REASON,
    RESET,
    RUNNING,
    STEPS,
    device_corpus,
    token_rules,
)
from editkv.engine.generate import DecodeState, DecodeStats, Output, StopRules
from editkv.engine.model import Span
from editkv.engine.ngram import NgramTable
from editkv.kernels.context_hash import context_hash_int

if TYPE_CHECKING:  # annotations only
    from editkv.engine.runner import ModelRunner


@dataclass(frozen=True)
class SuperposedParams:
    """The paper's settings; `top_tokens` None means k extensions per draft."""

    temperature: float = 0.06
    alpha: float = 0.54
    lambdas: tuple[float, ...] = (0.01, 0.04, 0.15, 0.18, 0.12)  # n = 2..6
    top_tokens: int | None = None
    ngram_floor: float = 1e-3
    workspace_weight: float = 0.7  # p_n = w p_workspace + (1 - w) p_corpus when both saw the context
    reset_every: int = 10
    # steps per device chain where the model's static forward serves them (engine.decoding.
    # superposed_device: no host wait inside a chain); 0 runs every step from the host
    device_steps: int = 2  # H100 probe, 20 requests: 2 steps 6.60 ms, 3: 6.93, 4: 6.96, 6: 7.32 (greedy 5.21)
    device_in_flight: int = 2  # device chains queued at a time (1: each waits for the one before)
    weight_scale: float = 1.0  # gamma = softmax(weight_scale * scores); 1 is the paper's p_i / sum p_j
    keep_empty: bool = False  # an empty draft (after trimming) inserts nothing: not a suggestion
    # Latency budget: when the best draft so far is finished (where greedy decoding would
    # stop) after s tokens, the others get until max(ceil(finish_ratio * s), s + finish_slack)
    # tokens; None: until k drafts finish.
    finish_ratio: float | None = 1.5
    finish_slack: int = 8

    def __post_init__(self) -> None:
        if self.finish_ratio is not None and self.finish_ratio < 1:
            raise ValueError(f"finish_ratio must be >= 1 or None, got {self.finish_ratio}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.ngram_floor < 1:
            raise ValueError(f"ngram_floor must be in (0, 1), got {self.ngram_floor}")
        if self.reset_every < 1:
            raise ValueError(f"reset_every must be >= 1, got {self.reset_every}")
        if not 0 <= self.device_steps <= 16:
            raise ValueError(f"device_steps must be in [0, 16], got {self.device_steps}")
        if self.device_in_flight not in (1, 2):
            raise ValueError(f"device_in_flight must be 1 or 2, got {self.device_in_flight}")


@dataclass
class Draft:
    """One suggestion: its text (healed prefix cut), cumulative log score, ids, why it ended."""

    text: str
    score: float
    ids: list[int]
    # "stop_token" | "lines" | "max_tokens" | "stop_text" | "cancelled" | "budget" (cut by finish_ratio)
    stop_reason: str


@dataclass
class SuperposedStats:
    """What producing the drafts cost: forwards (superposed steps + resets) and n-gram time."""

    steps: int = 0  # superposed (or single-draft) one-token forwards
    forwards: int = 0
    resets: int = 0
    reset_tokens: int = 0  # tokens re-encoded by resets
    ngram_lookups: int = 0
    ngram_ms: float = 0.0
    forward_ms: float = 0.0
    total_ms: float = 0.0
    device_steps: int = 0  # steps run in device chains (those after a chain's stop included)
    merged: int = 0  # host steps: children merged with another draft's child of the same text


@dataclass
class SuperposedResult:
    """Up to k distinct drafts, best first."""

    drafts: list[Draft]
    stats: SuperposedStats = field(default_factory=SuperposedStats)


@dataclass
class _Draft:
    out: Output  # ids, healed bytes still to spell out, line counts, the rule that ended it
    score: float
    stop_reason: str = ""  # "" while live

    @property
    def ids(self) -> list[int]:
        return self.out.ids


class NgramMixture:
    """p_ng(x | context) = sum_n lambda_n p_n(x | last n-1 tokens) from workspace and corpus counts."""

    def __init__(self, index: NgramIndex | None, corpus: NgramTable | None, lambdas: tuple[float, ...],
                 workspace_weight: float) -> None:
        self.index = index
        self.corpus = corpus
        self.lambdas = lambdas
        self.workspace_weight = workspace_weight
        self._corpus_memo: dict[tuple[int, ...], dict[int, float]] = {}

    @property
    def max_context(self) -> int:
        return len(self.lambdas)

    def __call__(self, context: list[int], candidates: list[int]) -> list[float]:
        """Unsmoothed p_ng of each candidate (0 where no order saw the context and token)."""
        workspace = self.index.next_probs(context, candidates) if self.index is not None else []
        out = [0.0] * len(candidates)
        w = self.workspace_weight
        for c, lam in enumerate(self.lambdas, start=1):
            pw = workspace[c - 1] if c - 1 < len(workspace) else None
            pc = self._corpus(context, c, candidates)
            if pw is None and pc is None:
                continue
            for j in range(len(candidates)):
                if pw is None:
                    p = pc[j]
                elif pc is None:
                    p = pw[j]
                else:
                    p = w * pw[j] + (1 - w) * pc[j]
                out[j] += lam * p
        return out

    def _corpus(self, context: list[int], c: int, candidates: list[int]) -> list[float] | None:
        if self.corpus is None or c >= self.corpus.max_order or len(context) < c:
            return None
        key = tuple(context[-c:])
        dist = self._corpus_memo.get(key)
        if dist is None:
            dist = self._corpus_memo[key] = _corpus_distribution(self.corpus, key)
        return [dist.get(x, 0.0) for x in candidates] if dist else None


def _corpus_distribution(corpus: NgramTable, context: tuple[int, ...]) -> dict[int, float]:
    """NgramTable.distribution(context, len(context)) through the fast hash."""
    c = len(context)
    table = corpus.hashes[c]
    h = context_hash_int(context)  # ~2 us a call; numpy's form ~40
    i = int(table.searchsorted(np.uint64(h)))
    if i >= len(table) or int(table[i]) != h:
        return {}
    ids, counts = corpus.next_ids[c][i].tolist(), corpus.counts[c][i].tolist()
    total = float(sum(n for t, n in zip(ids, counts, strict=True) if t >= 0))
    return {t: n / total for t, n in zip(ids, counts, strict=True) if t >= 0} if total else {}


def left_context(state: DecodeState, max_len: int) -> list[int]:
    """The last `max_len` prompt tokens before the cursor: the start of every draft's n-gram context.

    A FIM prompt is `<PRE> prefix <SUF> suffix <MID>`: the prefix's tokens are what precede
    the cursor in the document (and in the workspace index); control tokens are dropped.
    """
    ids = state.prompt_ids
    fim = state.tokenizer.fim
    if fim is not None and fim.suffix in ids:
        ids = ids[: ids.index(fim.suffix)]
    tail = ids[-max_len:] if max_len else []
    for i in range(len(tail) - 1, -1, -1):
        if state.tokenizer.is_special(tail[i]):
            return tail[i + 1 :]
    return list(tail)


def superposed_embedding(model: ModelRunner, last_ids: list[int],
                         scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding [1, 1, hidden], weights gamma [k]): sum_i softmax(scores)_i * E[last_ids[i]]."""
    gamma = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)  # [k]
    emb = model.embed(torch.tensor([last_ids], device=model.device))  # [1, k, hidden]
    weights = gamma.to(device=emb.device, dtype=emb.dtype)[None, :, None]  # [1, k, 1]
    return (weights * emb).sum(1, keepdim=True), gamma


def superposed_drafts(
    state: DecodeState,
    k: int,
    rules: StopRules | None = None,
    *,
    ngram_index: NgramIndex | None = None,
    corpus: NgramTable | None = None,
    params: SuperposedParams | None = None,
    stats: DecodeStats | None = None,
    trace: list[dict] | None = None,
    stop_text: Callable[[str], int | None] | None = None,
) -> SuperposedResult:
    """Up to k distinct drafts continuing `state`, best first, from one forward per step.

    `ngram_index`: the workspace's n-grams; `corpus`: the model's shipped table (either may be
    None; with neither, or alpha 0, drafts are scored by the model alone). `stats` (as decode
    takes it) gets forwards, tokens and time added; `trace`, if given, gets one record per
    superposed forward (the drafts' last ids, scores and weights), for tests and debugging.
    `stop_text` as `decode` takes it, per draft.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    started = time.perf_counter()
    params = params or SuperposedParams()
    rules = rules or StopRules()
    model, tok = state.model, state.tokenizer
    dev = model.device
    run = SuperposedStats()
    m = params.top_tokens or k
    root = Output(tok, rules, state.heal, stop_text)  # every draft's Output is a fork of it
    # the pool's drafts as device chains finished them (no clock: `token_rules`)
    chained = root if rules.lines_until is None else Output(tok, replace(rules, lines_until=None), state.heal)
    mixture = None
    if params.alpha > 0 and (ngram_index is not None or corpus is not None):
        mixture = NgramMixture(ngram_index, corpus, params.lambdas, params.workspace_weight)
    left = left_context(state, mixture.max_context) if mixture else []
    scratch = state.scratch
    scratch.ensure_capacity(state.scratch_used + rules.max_tokens + 1, keep=state.scratch_used)
    base = state.scratch_used

    def forward(ids: list[int] | None, embeds: torch.Tensor | None, start: int) -> torch.Tensor:
        num = len(ids) if ids is not None else 1
        t0 = time.perf_counter()
        out = model(torch.tensor([ids], device=dev) if ids is not None else None,
                    torch.arange(state.next_position + start, state.next_position + start + num, device=dev),
                    write=scratch, write_at=base + start, context=[*state.context, Span(scratch, 0, base + start)],
                    logits="last", input_embeds=embeds)
        run.forwards += 1
        run.forward_ms += 1000 * (time.perf_counter() - t0)
        return out

    def candidates(row: torch.Tensor, logp: torch.Tensor) -> tuple[list[int], list[float]]:
        """The row's top m allowed ids with their log-probabilities, in one device->host copy."""
        top = row.topk(min(m, row.shape[0]))
        packed = torch.stack((top.values.double(), top.indices.double(), logp[top.indices].double())).tolist()
        kept = [j for j, v in enumerate(packed[0]) if v > float("-inf")]
        return [int(packed[1][j]) for j in kept], [packed[2][j] for j in kept]

    def extend(live: list[_Draft], logits: torch.Tensor) -> list[_Draft]:
        """The k x m children of the live drafts, best first, distinct by (text, finished)."""
        logp = torch.log_softmax(logits[0].float() / params.temperature, -1)  # [V]
        children: dict[tuple[str, bool], _Draft] = {}
        parent_of: dict[tuple[str, bool], _Draft] = {}
        unmasked = None  # every draft without a healing mask extends from the same row
        for d in live:
            row = logits[0]
            if d.out.remaining:
                keep = root.healer.allowed_ids(d.out.remaining, logits.device)
                row = torch.full_like(row, float("-inf")).index_copy_(0, keep, row[keep])
                ids, scores = candidates(row, logp)
            else:
                if unmasked is None:
                    unmasked = candidates(row, logp)
                ids, scores = list(unmasked[0]), list(unmasked[1])
            if not ids:
                continue
            if mixture is not None:
                t0 = time.perf_counter()
                p_ng = mixture((left + d.ids)[-mixture.max_context:], ids)
                run.ngram_lookups += 1
                run.ngram_ms += 1000 * (time.perf_counter() - t0)
                if any(p > 0 for p in p_ng):
                    a = params.alpha
                    scores = [(1 - a) * s + a * math.log(max(p, params.ngram_floor)) for s, p in zip(scores, p_ng,
                                                                                                     strict=True)]
            norm = _logsumexp(scores)
            for token, s in zip(ids, scores, strict=True):
                child = _child(d, token, d.score + s - norm)
                key = (child.out.cut(), bool(child.stop_reason))
                if key in children and (not child.stop_reason or parent_of[key] is not d):
                    run.merged += 1  # another draft's child spells the same text
                if key not in children or children[key].score < child.score:
                    children[key], parent_of[key] = child, d
        return sorted(children.values(), key=lambda c: -c.score)

    def _child(d: _Draft, token: int, score: float) -> _Draft:
        out = d.out.extended(token)
        return _Draft(out, score, out.reason or "")

    def commit(best: _Draft, committed: int) -> torch.Tensor:
        """A reset: re-encode the best draft's tokens since the last commit over the superposed
        slots; the logits after them."""
        logits = forward(best.ids[committed:], None, committed)
        run.resets += 1
        run.reset_tokens += len(best.ids) - committed
        return logits

    def on_device(live: list[_Draft], logits: torch.Tensor, committed: int,
                  budget: int) -> tuple[list[_Draft], str, torch.Tensor, int, int]:
        """The rest of the decode in chains of device steps (superposed_device); resets between
        chains. Returns the live drafts, why they stopped early (as the host loop's; "host": the
        static forward does not serve these shapes, go on on the host), and the host loop's state."""
        static, token_rules = model.static, device_rules
        buf = static.superposed_buffers(k, m, rules.max_tokens)
        dev_corpus = device_corpus(corpus, dev) if mixture is not None and corpus is not None else None
        if not buf.stage_heal(token_rules, state.heal):
            return live, "host", logits, committed, budget  # healed text too long for the tables
        buf.stage_stream(ngram_index if mixture is not None else None)
        heal = state.heal
        while True:
            length = len(live[0].ids)
            started = static.superposed_start(scratch, base + length,
                                              [*state.context, Span(scratch, 0, base + length)],
                                              rules.max_tokens - length)
            if started is None:
                return live, "host", logits, committed, budget
            buffer, bucket, at = started
            buf.stage([(d.ids, d.score, bool(d.out.text().strip()), len(heal) - len(d.out.remaining))
                       for d in live], left,
                      {"length": length, "committed": committed, "budget": budget, "position": state.next_position,
                       "slot": at - length, "left": len(left), "max_tokens": rules.max_tokens, "heal": len(heal),
                       "pool": [d.score for d in pool]})
            buf.logits.copy_(logits)

            def next_chain(buffer=buffer, bucket=bucket):
                if rules.should_stop is not None and rules.should_stop():
                    return None
                return static.superposed_chain(buf, buffer, bucket, params.device_steps, token_rules, dev_corpus,
                                               params, mixture is not None)

            ticket = next_chain()
            if ticket is None:
                return live, "cancelled", logits, committed, budget
            chain_length = length
            while True:
                # the next chain is queued before this one is read: the GPU goes on while the host
                # reads (if this one stopped, the next one's steps change nothing)
                ahead = next_chain() if params.device_in_flight > 1 else "later"
                out = buf.collect(ticket)
                meta = out["meta"]
                steps, reason = int(meta[STEPS]), int(meta[REASON])
                for s in range(steps):  # the pool as the host loop builds it: by text, best first
                    parents = out["log_ids"][s, :, : chain_length + s].tolist()
                    tokens = out["log_tokens"][s].tolist()  # [k][m]: each draft's candidates
                    scored = out["log_scores"][s]
                    found = [(float(scored[i, c]), i, c) for i in range(k) for c in range(m)
                             if scored[i, c] > float("-inf")]
                    for score, i, c in sorted(found, key=lambda f: -f[0]):
                        child = _child(_Draft(chained.resumed(parents[i], b""), 0.0), tokens[i][c], score)
                        if params.keep_empty or child.out.text().strip():
                            _pool_add(pool, child, k)
                forwards = steps - (reason != RUNNING)
                run.steps += forwards
                run.forwards += forwards
                run.device_steps += steps
                run.ngram_lookups += steps * k if mixture is not None else 0
                now = chain_length = int(meta[LENGTH])
                live = []
                for i in range(k):
                    if out["score"][i] > float("-inf"):
                        live.append(_Draft(root.resumed(out["ids"][i, :now].tolist(), heal[int(out["heal_at"][i]) :]),
                                           float(out["score"][i])))
                committed, budget = int(meta[COMMITTED]), int(meta[BUDGET_AT])
                if reason in (NO_LIVE, POOL_FULL):
                    return live, "", logits, committed, budget
                if reason == BUDGET:
                    return live, "budget", logits, committed, budget
                if reason == RESET:
                    break
                if ahead == "later":
                    ahead = next_chain()
                if ahead is None:
                    return live, "cancelled", logits, committed, budget
                ticket = ahead
            best = live[0]
            logits = commit(best, committed)
            committed = now
            live = [best]

    device_rules = None
    if (model.static is not None and model.static.mode != "off" and params.device_steps > 0 and trace is None
            and rules.max_tokens < 256 and k <= 8 and m <= 8):  # the select kernel's sizes
        device_rules = token_rules(root, model.config.vocab_size, dev) if stop_text is None else None
    live = [_Draft(root, 0.0)]
    pool: list[_Draft] = []
    logits = state.first_logits
    committed = 0  # leading tokens of every live draft whose K/V in the scratch are real
    budget = rules.max_tokens  # tokens a draft may reach; lowered when the first one finishes
    unfinished = ""  # why live drafts stopped early ("cancelled" | "budget")
    while True:
        if device_rules is not None:
            live, unfinished, logits, committed, budget = on_device(live, logits, committed, budget)
            if unfinished != "host":
                break
            device_rules, unfinished = None, ""  # shapes the static forward does not serve
        survivors = []
        for child in extend(live, logits):
            if child.stop_reason:
                if params.keep_empty or child.out.text().strip():
                    _pool_add(pool, child, k)
            elif len(survivors) < k:
                survivors.append(child)
        live = survivors
        if (params.finish_ratio is not None and budget == rules.max_tokens and pool and live
                and pool[0].score >= live[0].score):
            now = len(live[0].ids)
            budget = min(budget, max(math.ceil(params.finish_ratio * now), now + params.finish_slack))
        if not live or (len(pool) >= k and live[0].score <= pool[-1].score):
            break
        if rules.should_stop is not None and rules.should_stop():
            unfinished = "cancelled"
            break
        length = len(live[0].ids)
        if length >= budget:
            unfinished = "budget"
            break
        if length - 1 - committed >= params.reset_every:
            best = live[0]
            logits = commit(best, committed)
            committed = length
            live = [best]
            continue
        if len(live) == 1:
            logits = forward([live[0].ids[-1]], None, length - 1)
            if committed == length - 1:
                committed = length  # nothing superposed since the last commit: this slot is real
        else:
            embeds, gamma = superposed_embedding(model, [d.ids[-1] for d in live],
                                                 [params.weight_scale * d.score for d in live])
            if trace is not None:
                trace.append({"last_ids": [d.ids[-1] for d in live], "scores": [d.score for d in live],
                              "weights": gamma.tolist(), "slot": base + length - 1})
            logits = forward(None, embeds, length - 1)
        run.steps += 1
    if unfinished:  # fill up with the live drafts as they are, ranked after every finished one
        partial: list[_Draft] = []
        for d in live:
            if params.keep_empty or d.out.text().strip():
                _pool_add(partial, _Draft(d.out, d.score, unfinished), k)
        seen = {d.out.text().rstrip() for d in pool}
        pool += [d for d in partial if d.out.text().rstrip() not in seen][: k - len(pool)]
    drafts = [Draft(d.out.text(), d.score, d.ids, d.stop_reason) for d in pool]
    run.total_ms = 1000 * (time.perf_counter() - started)
    if stats is not None:
        stats.forwards += run.forwards
        stats.decode_tokens += run.steps + run.reset_tokens
        stats.decode_ms += run.total_ms
        stats.extra["superposed_resets"] = stats.extra.get("superposed_resets", 0) + run.resets
        stats.extra["ngram_ms"] = stats.extra.get("ngram_ms", 0.0) + run.ngram_ms
    return SuperposedResult(drafts, run)


def _pool_add(pool: list[_Draft], draft: _Draft, k: int) -> None:
    """Keep the best k finished drafts, distinct by shown text after trimming; `pool` stays sorted best first."""
    key = draft.out.text().rstrip()
    for i, other in enumerate(pool):
        if other.out.text().rstrip() == key:
            if other.score >= draft.score:
                return
            del pool[i]
            break
    if len(pool) >= k and pool[-1].score >= draft.score:
        return
    pool.append(draft)
    pool.sort(key=lambda d: -d.score)
    del pool[k:]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
