"""Beam search from a DecodeState, all beams batched in one forward per step.

The baseline the benchmarks hold AdaDec (bench/adadec.py: the best beam) and superposed
decoding (bench/multidraft.py: k distinct drafts) against.

Data flow of a step: live beams (an engine.generate.Output each: ids, healing bytes left, line
counts; and the summed log-prob) -> each beam's top `2 * num_beams` next tokens by log-probability
(under token healing, among the tokens that spell the cut text; not renormalised, so a beam's
score is the model's probability of its tokens whichever way they split the healed text, as
greedy's `logprob`) -> each extension is its beam's Output plus one `emit`: those the output
rules end (stop token, line rule or the multi-line time limit, stop text, max tokens) go to a
pool of finished beams, distinct by text and non-empty unless `keep_empty`; the best
`num_beams` others, distinct by text, live on -> one batch-`num_beams` forward of their last
tokens.

KV: beams share the state's batch-1 spans (document, view tokens). Where the model has a static
forward (engine/static_decode.py: CUDA graphs on a GPU) and the state's scratch has room, the
beams' own tokens interleave in the scratch after the view's tokens, one slot per beam and step
(lanes: each token sees the shared spans and its own lane), so a step is one width-`num_beams`
forward of the graphs every other decode step replays; at each step the lanes' slots are
re-ordered by parent. Elsewhere their tokens live in a batch-`num_beams` cache whose rows are
re-ordered by parent, and the shared spans broadcast (eager).

Ranking: summed log-prob, or with `length_normalize` the mean per chosen token (a stop token
counts). Search ends when no beam is live, or the pool holds `num_beams` beams and either
`early_stopping` is set (HF's `early_stopping=True`) or no live beam's score beats the
pool's worst (exact for summed scores, which only fall; HF's heuristic for means). `should_stop`
is polled before every forward; live beams then fill the pool as "cancelled".

Knows nothing about documents or LSP: a DecodeState in, beams out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from editkv.engine.generate import Completion, DecodeState, DecodeStats, Output, StopRules
from editkv.engine.model import KVCache, Span


@dataclass
class Beam:
    """One hypothesis: its text (healed prefix cut), ids, summed log-prob, ranking score, why it ended."""

    text: str
    ids: list[int]
    logprob: float
    score: float
    stop_reason: str  # "stop_token" | "lines" | "max_tokens" | "stop_text" | "cancelled" | "" (live when search ended)


@dataclass
class BeamResult:
    """Up to `num_beams` beams, best first, and what the search cost."""

    beams: list[Beam]
    stats: DecodeStats = field(default_factory=DecodeStats)

    def best(self) -> Completion:
        """The best beam as a Completion (empty when there is none)."""
        if not self.beams:
            return Completion([], "", "max_tokens", self.stats, 0.0)
        b = self.beams[0]
        return Completion(b.ids, b.text, b.stop_reason or "max_tokens", self.stats, b.logprob)


@dataclass
class _Hyp:
    out: Output  # ids, healing bytes left, line counts, why the rules ended it
    logprob: float  # summed over the chosen tokens, a final stop token included (`out.logprob` is not)
    parent: int = 0
    chosen: int = 0  # tokens chosen, a final stop token included


def beam_search(
    state: DecodeState,
    num_beams: int,
    rules: StopRules | None = None,
    *,
    length_normalize: bool = False,
    early_stopping: bool = False,
    keep_empty: bool = False,
    stats: DecodeStats | None = None,
    stop_text: Callable[[str], int | None] | None = None,
) -> BeamResult:
    """Beam search continuing `state` under `rules` (stop ids, line limit and multi-line time
    limit, max tokens, should_stop); `stop_text` as `decode` takes it, per beam."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    started = time.perf_counter()
    rules = rules or StopRules()
    stats = stats or DecodeStats()
    model, tok = state.model, state.tokenizer
    dev = model.device
    root = Output(tok, rules, state.heal, stop_text)
    # lanes in the scratch (one graphed forward per step) when there is a static forward and room
    # for every step's slots; else a batch cache of their own (eager forwards)
    static = model.static if model.static is not None and model.static.mode != "off" else None
    lane_start = state.scratch_used
    lanes = static is not None and lane_start + num_beams * rules.max_tokens < state.scratch.capacity
    cache = None
    context = [*state.context, Span(state.scratch, 0, state.scratch_used)]

    def score(h: _Hyp) -> float:
        return h.logprob / max(h.chosen, 1) if length_normalize else h.logprob

    pool: list[tuple[_Hyp, str]] = []  # (finished beam, why), best first

    def finish(h: _Hyp, reason: str) -> None:
        key = h.out.text().rstrip()
        if not keep_empty and not key.strip():
            return
        for i, (other, _) in enumerate(pool):
            if other.out.text().rstrip() == key:
                if score(other) >= score(h):
                    return
                del pool[i]
                break
        pool.append((h, reason))
        pool.sort(key=lambda p: -score(p[0]))
        del pool[num_beams:]

    live = [_Hyp(root, 0.0)]
    logits = state.first_logits  # [live, V]
    step = 0
    unfinished = ""
    while True:
        logp = torch.log_softmax(logits.float(), -1)  # [live, V]
        if any(beam.out.remaining for beam in live):  # healing: only tokens that spell the cut text
            logp = torch.cat([root.healer.mask(logp[b : b + 1], beam.out.remaining) if beam.out.remaining
                              else logp[b : b + 1] for b, beam in enumerate(live)])
        top = logp.topk(2 * num_beams, dim=-1)
        values, indices = torch.stack((top.values.double(), top.indices.double())).tolist()  # one host read
        candidates = [(beam.logprob + s, b, int(t)) for b, beam in enumerate(live)
                      for s, t in zip(values[b], indices[b], strict=True) if s > float("-inf")]
        candidates.sort(key=lambda c: -c[0])
        children: list[_Hyp] = []
        seen: set[str] = set()
        for logprob, b, token in candidates:
            parent = live[b]
            child = _Hyp(parent.out.extended(token), logprob, b, parent.chosen + 1)
            if child.out.reason is not None:
                finish(child, child.out.reason)
            elif (text := child.out.cut()) not in seen:
                seen.add(text)
                children.append(child)
                if len(children) == num_beams:
                    break
        live = children
        if not live or (len(pool) >= num_beams
                        and (early_stopping or max(score(h) for h in live) <= score(pool[-1][0]))):
            break
        if rules.should_stop is not None and rules.should_stop():
            unfinished = "cancelled"
            break
        pad = num_beams - len(live)
        parents = [h.parent for h in live] + [live[0].parent] * pad
        tokens = [h.out.ids[-1] for h in live] + [live[0].out.ids[-1]] * pad  # pad rows are ignored
        logits = None
        if lanes:
            if step and parents != list(range(num_beams)):
                _reorder_lanes(state.scratch, lane_start, step, torch.tensor(parents, device=dev))
            write_at = lane_start + step * num_beams
            handled, out = static.forward(torch.tensor(tokens, device=dev)[None],
                                          torch.full((num_beams,), state.next_position + step, device=dev),
                                          state.scratch, write_at, [*state.context, Span(state.scratch, 0, write_at)],
                                          "all", lanes=(lane_start, num_beams))
            if handled:
                logits = out[0, : len(live)]  # [live, V]
                stats.extra["beam_lanes"] = 1
            elif step:
                raise RuntimeError("the static forward took beam search's first step but not a later one")
            else:  # not the static forward's shape: a batch cache, eagerly
                lanes = False
        if logits is None:
            if cache is None:
                cache = model.new_cache(rules.max_tokens + 1, batch=num_beams)
            if step:
                index = torch.tensor(parents, device=dev)
                cache.k[:, :, :, :step] = cache.k[:, :, :, :step].index_select(1, index)
                cache.v[:, :, :, :step] = cache.v[:, :, :, :step].index_select(1, index)
            position = torch.tensor([state.next_position + step], device=dev)
            logits = model(torch.tensor(tokens, device=dev)[:, None], position, write=cache, write_at=step,
                           context=[*context, Span(cache, 0, step)], logits="last")[: len(live)]  # [live, V]
        stats.forwards += 1
        step += 1
    for h in sorted(live, key=lambda h: -score(h)):  # only when the search was cut short
        if len(pool) >= num_beams:
            break
        finish(h, unfinished)
    beams = [Beam(h.out.text(), h.out.ids, h.logprob, score(h), reason) for h, reason in pool]
    stats.decode_tokens += len(beams[0].ids) if beams else 0
    stats.decode_ms += 1000 * (time.perf_counter() - started)
    return BeamResult(beams, stats)


def _reorder_lanes(scratch: KVCache, lane_start: int, steps: int, parents: torch.Tensor) -> None:
    """Lane b's first `steps` slots (interleaved from `lane_start`) become lane `parents[b]`'s."""
    base = scratch.base or scratch
    lo = scratch.offset + lane_start
    hi = lo + steps * parents.shape[0]
    for buf in (base.k, base.v):  # [layers, 1, kv_heads, slots, head_dim]
        lanes = buf[:, :, :, lo:hi].unflatten(3, (steps, parents.shape[0]))
        lanes.copy_(lanes.index_select(4, parents))
