"""Greedy speculation drafted, verified and accepted on the device (StaticForward.lookup_chain),
and chained plain steps where drafting does not pay.

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from editkv.engine.decoding.drafters import (
    Reference,
    TokenHistory,
)
from editkv.engine.decoding.speculative.config import SpecCounters
from editkv.engine.decoding.speculative.output import tokens_left
from editkv.engine.generate import DecodeState, DecodeStats, Output, chain_length
from editkv.engine.model import Span
from editkv.engine.static_decode import MAX_CHAIN, SOURCE

if TYPE_CHECKING:  # (annotations only: the loop module imports this one)
    from editkv.engine.decoding.speculative.loop import Speculator



def speculate_on_device(state: DecodeState, speculator: Speculator, out: Output, history: TokenHistory,
                         references: Sequence[Reference], stats: DecodeStats, counters: SpecCounters) -> bool:
    """Decode the rest greedily by `StaticForward.lookup_chain`'s parts: drafting, verification
    and the next step's inputs stay on the device, and the host reads each chain's kept tokens
    once and runs them through the stop rules — while the next chain already runs (the device
    state needs nothing from the host; after a stop the chain in flight is wasted). False, with
    `out` consistent, when a chain is refused (the request's shapes or scratch room); the
    caller then drafts on the host.

    Where the drafts stop paying — a chain kept fewer tokens per verification than a chain of
    plain steps gives in the same time (`StepCost`: both measured as they run; a plain chain is
    tried once to measure it) — the next chain is one of plain steps, then lookup resumes."""
    static = state.model.static
    cfg = speculator.config
    cost = speculator.cost
    rules = out.rules
    width = cfg.device_width
    scratch, used = state.scratch, state.scratch_used
    room = rules.max_tokens + 2 * MAX_CHAIN * width
    buffer = search_buffer(history, references, SOURCE - room)
    if buffer is None:
        return False
    length = static.stage_source(buffer)
    run = None  # the device state of the chains in flight (None: restage from the host's)
    pending: deque = deque()  # (ticket, tokens it is expected to keep)
    plain_next = False
    last = time.perf_counter()
    while True:
        n = len(out.ids)
        slot = used + n - 1
        position = state.next_position + n - 1
        if plain_next and not pending:
            steps = chain_length(cfg.chain_steps, rules.max_tokens - n)
            chain = plain_chain(state, out, steps, stats, counters)
            if chain is None:
                return False
            kept, logprobs = chain
            now = time.perf_counter()
            cost.record_chain(1000 * (now - last) / steps)
            last = now
            length = static.extend_source(kept, length)
            plain_next = False
            run = None
        else:
            # keep two chains in flight: enough verifications for the tokens still allowed at
            # the rate seen so far (a stop token or line end inside a chain wastes what follows)
            while len(pending) < cfg.device_in_flight and not plain_next:
                left = tokens_left(out, speculator.line_tokens) - sum(e for _, e in pending)
                if left <= 0 and pending:
                    break
                if run is None:
                    fits = (scratch.capacity - 1 - slot) // width
                    run = static.lookup_start(out.ids[-1], position, scratch, slot,
                                              [*state.context, Span(scratch, 0, slot)], length, width,
                                              min(fits, 2 * MAX_CHAIN))
                    if run is None:
                        return False
                rate = speculator.device_rate
                steps = min(cfg.device_steps, MAX_CHAIN, run.room, math.ceil(max(left, 1) / rate))
                if steps < 1:
                    break
                pending.append((static.lookup_enqueue(run, steps), steps * rate))
            if not pending:
                if plain_next:
                    continue
                return False
            ticket, _ = pending.popleft()
            steps = ticket.steps
            kept, logprobs, accepts = static.lookup_collect(ticket)
            now = time.perf_counter()
            cost.record(1, width, 1000 * (now - last) / steps)  # wall time since the last chain landed
            last = now
            length += len(kept)
            rate = len(kept) / steps
            speculator.device_rate += 0.2 * (rate - speculator.device_rate)
            stats.forwards += steps
            counters.forwards += steps
            counters.rows += steps
            counters.bonus += steps
            counters.drafted += steps * (width - 1)
            counters.accepted += sum(accepts)
            source = counters.by_source.setdefault("device", [0, 0])
            source[0] += steps * (width - 1)
            source[1] += sum(accepts)
            if cfg.chain_steps and cost.measure:
                if cost.chain_ms is None:
                    plain_next = rate < 1.5  # unmeasured: try plain steps where drafts barely pay
                else:
                    plain_next = rate / cost.estimate(1, width) < 1.0 / cost.chain_ms
            if run is not None and run.room < 1 and not pending:
                run = None  # its room is spent: restage from where the host is
        appended = out.emit(kept, logprobs)
        counters.discarded += len(kept) - appended
        if out.reason is None and rules.should_stop is not None and rules.should_stop():
            out.reason = "cancelled"
        if out.reason is not None:
            return True
        history.extend(kept)


def plain_chain(state: DecodeState, out: Output, steps: int, stats: DecodeStats,
                 counters: SpecCounters) -> tuple[list[int], list[float]] | None:
    """`steps` plain greedy steps chained on the device after the output's last token
    (`StaticForward.chain`), counted as chained forwards: (ids, log-probs), or None when the
    chain is refused (or `steps` is 0)."""
    if not steps:
        return None
    n = len(out.ids)
    scratch = state.scratch
    slot = state.scratch_used + n - 1
    chain = state.model.static.chain(out.ids[-1], state.next_position + n - 1, scratch, slot,
                                     [*state.context, Span(scratch, 0, slot)], steps)
    if chain is None:
        return None
    chosen, logprobs = chain.tolist()
    stats.forwards += steps
    counters.chained += steps
    return [int(t) for t in chosen], logprobs


def search_buffer(history: TokenHistory, references: Sequence[Reference], limit: int) -> np.ndarray | None:
    """`lookup_chain`'s search buffer in `limit` tokens: each reference's head after a
    separator (-1), then a separator and the history's tail (it must come last)."""
    if limit < 2 or len(history) == 0:
        return None
    tail = history.array[-(limit - 1):]
    parts, left = [], limit - 1 - len(tail)
    for ref in references:
        take = min(len(ref.ids), left - 1)
        if take <= 0:
            break
        parts += [np.array([-1]), ref.ids[:take]]
        left -= take + 1
    return np.concatenate([*parts, np.array([-1]), tail]).astype(np.int64)
