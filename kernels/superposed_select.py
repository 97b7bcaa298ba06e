"""A superposed decoding step's selection in two programs (engine/decoding/superposed_device.py).

`select_ref` there is the definition, in torch ops: on an H100 it took ~150 small kernels and
~0.4 ms of GPU time per step, plus as much host time to launch them from a graph, against a
~0.3 ms forward. Here it is two kernels:

ngram_counts   grid (draft, block of the workspace stream). For every stream position p, how
               many of the tokens before p equal the draft's last 1..5 tokens (a run, shortest
               first) and whether the token at p is each candidate; counts of contexts seen
               (the token at p exists) and of (context, candidate) n-grams are added per order
               into `counts` [k, 5, 1 + M_PAD] (int32 atomics; the select kernel zeroes them).
select         one program. Each draft has its own m candidates (the top tokens of its healing
               row, engine/decoding/superposed_device.candidates). Per (draft, candidate): the
               candidate's log-probability, p_ng from the counts and the corpus table (its
               context hash in wrapping int64 arithmetic, a search over the sorted keys that
               reads 32 at a time), the mixed score renormalised over the draft's candidates,
               the child's score; which children finish (stop id, line end, token limit), which
               of one draft's finished children leave the same text (the best is kept), which
               add content past the healed text (a [rows, V] table). Then the pool's top k of
               itself and the pooled children, the k best unfinished children in (draft,
               candidate) order (stable, as torch.sort), their ids, contexts, content flags and
               healed bytes spelled, the latency budget, the reason a chain stops, the
               committed count, the chain's log, and the next input's ids and weights. Nothing
               changes once the state's reason is not "running" except the log's candidates
               and scores.

All state is in device tensors (engine/decoding/superposed_device.SuperposedBuffers); nothing
is read on the host, so both kernels sit in the step's CUDA graph. Scores are float64, as the
host loop's Python floats are.
"""

from __future__ import annotations

import math

import torch
from editkv.kernels.context_hash import MULT_I64

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only installs
    triton = None

ORDERS = 5
PROBES = 32  # keys a round of the corpus search reads at once
MULT = MULT_I64  # kernels/context_hash.py's multiplier as a wrapping int64 (the kernel hashes inline)

if triton is not None:

    @triton.jit
    def _ngram_counts_kernel(stream_ptr, ctx_ptr, cand_ptr, counts_ptr, size,
                             ORD: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < size
        nxt = tl.load(stream_ptr + ORD + offs, mask=inside, other=-1)
        slots = tl.arange(0, M_PAD)
        cands = tl.load(cand_ptr + i * M + slots, mask=slots < M, other=-2)
        hits = nxt[:, None] == cands[None, :]  # [BLOCK, M_PAD]
        run = nxt >= 0
        for c in tl.static_range(1, ORD + 1):
            prev = tl.load(stream_ptr + ORD + offs - c, mask=inside, other=-1)
            t = tl.load(ctx_ptr + i * ORD + ORD - c)
            run = run & (prev == t)
            at = counts_ptr + (i * ORD + c - 1) * (M_PAD + 1)
            tl.atomic_add(at, tl.sum(run.to(tl.int32), axis=0))
            grams = tl.sum((run[:, None] & hits).to(tl.int32), axis=0)  # [M_PAD]
            tl.atomic_add(at + 1 + slots, grams, mask=slots < M)

    @triton.jit
    def _shr(h, bits: tl.constexpr):
        return (h.to(tl.uint64, bitcast=True) >> bits).to(tl.int64, bitcast=True)

    @triton.jit
    def _select_kernel(values_ptr, cand_ptr, lse_ptr, counts_ptr,
                       keys_ptr, next_ptr, ccounts_ptr, n_keys,
                       finish_ptr, gain_ptr, length_ptr, vocab,
                       ids_ptr, score_ptr, nonempty_ptr, ctx_ptr, pool_ptr, meta_ptr, heal_at_ptr,
                       log_ids_ptr, log_tokens_ptr, log_scores_ptr, mix_ids_ptr, mix_w_ptr, pos_ptr, slot_ptr,
                       mult, fparams_ptr, slack, reset_every,
                       K: tl.constexpr, M: tl.constexpr, K_PAD: tl.constexpr, M_PAD: tl.constexpr,
                       MAX_T: tl.constexpr, ORD: tl.constexpr, ORD_PAD: tl.constexpr, MAX_CHAIN: tl.constexpr,
                       ROWS: tl.constexpr,
                       MIXED: tl.constexpr, CORPUS_ORDERS: tl.constexpr, TOP: tl.constexpr,
                       SEARCH: tl.constexpr, PROBES: tl.constexpr, HAS_RATIO: tl.constexpr,
                       ZERO_PAD: tl.constexpr):
        NEG = float("-inf")
        # float64 parameters (a float argument would arrive as float32)
        alpha = tl.load(fparams_ptr + 0)
        floor = tl.load(fparams_ptr + 1)
        weight = tl.load(fparams_ptr + 2)
        ratio = tl.load(fparams_ptr + 3)
        weight_scale = tl.load(fparams_ptr + 9)
        kk = tl.arange(0, K_PAD)
        p = kk[:, None]  # [K_PAD, 1] drafts
        x = tl.arange(0, M_PAD)[None, :]  # [1, M_PAD] candidates
        pm = p < K
        xm = x < M
        both = pm & xm
        length = tl.load(meta_ptr + 0)
        committed = tl.load(meta_ptr + 1)
        budget = tl.load(meta_ptr + 2)
        running = tl.load(meta_ptr + 3) == 0
        steps = tl.load(meta_ptr + 4)
        left = tl.load(meta_ptr + 7)
        max_tokens = tl.load(meta_ptr + 8)
        heal_len = tl.load(meta_ptr + 9)
        spelled = tl.load(heal_at_ptr + p, mask=pm, other=0)  # [K_PAD, 1] healed bytes spelled
        row = tl.where(spelled < heal_len, spelled, ROWS - 1)  # the draft's healing row
        cand = tl.load(cand_ptr + p * M + x, mask=both, other=0)  # [K_PAD, M_PAD] each draft's top m
        lse = tl.load(lse_ptr)
        s = (tl.load(values_ptr + p * M + x, mask=both, other=0.0) - lse).to(tl.float64)
        if MIXED:
            out = tl.zeros([K_PAD, M_PAD], tl.float64)
            ctx_len = tl.minimum(left + length, ORD)
            for c in tl.static_range(1, ORD + 1):
                at = counts_ptr + (p * ORD + c - 1) * (M_PAD + 1)
                total = tl.load(at, mask=pm, other=0).to(tl.float64)  # [K_PAD, 1]
                grams = tl.load(at + 1 + x, mask=both, other=0).to(tl.float64)
                has_w = total > 0
                pw = grams / tl.maximum(total, 1.0)
                pick = tl.where(has_w, pw, 0.0)
                if c <= CORPUS_ORDERS:
                    h = tl.full([K_PAD, 1], c, tl.int64)
                    for j in tl.static_range(c):
                        t = tl.load(ctx_ptr + p * ORD + ORD - c + j, mask=pm, other=-7)
                        h = (h ^ (t + 1)) * mult
                        h = h ^ _shr(h, 29)
                    key = _shr(h * mult, 14) + (c << 50)
                    # the first key >= `key`: each round probes PROBES keys of [lo, hi) at once
                    lo = tl.zeros([K_PAD, 1], tl.int64)
                    hi = tl.zeros([K_PAD, 1], tl.int64) + n_keys
                    j = tl.arange(1, PROBES + 1)[None, :].to(tl.int64)
                    for _ in tl.static_range(SEARCH):
                        probe = lo + ((hi - lo) * j) // (PROBES + 1)  # [K_PAD, PROBES], inside [lo, hi)
                        inside = (probe < hi) & pm
                        below = (tl.load(keys_ptr + probe, mask=inside, other=0) < key) & inside
                        lo = tl.maximum(lo, tl.max(tl.where(below, probe + 1, 0), axis=1)[:, None])
                        hi = tl.minimum(hi, tl.min(tl.where(inside & ~below, probe, n_keys), axis=1)[:, None])
                    found = ((lo < n_keys) & pm & (ctx_len >= c)) != 0  # (the interpreter widens a & of bools)
                    found = found & (tl.load(keys_ptr + lo, mask=found, other=-1) == key)
                    ctotal = tl.zeros([K_PAD, 1], tl.float64)
                    match = tl.zeros([K_PAD, M_PAD], tl.float64)
                    for j in tl.static_range(TOP):
                        nid = tl.load(next_ptr + lo * TOP + j, mask=found, other=-1)
                        cnt = tl.load(ccounts_ptr + lo * TOP + j, mask=found, other=0.0)
                        ctotal += tl.where(nid >= 0, cnt, 0.0)
                        match += tl.where((nid == cand) & (nid >= 0), cnt, 0.0)
                    has_c = found & (ctotal > 0)
                    pc = match / tl.maximum(ctotal, 1.0)
                    pick = tl.where(has_w & has_c, weight * pw + (1 - weight) * pc,
                                    tl.where(has_w, pw, tl.where(has_c, pc, 0.0)))
                out = out + tl.load(fparams_ptr + 3 + c) * pick
            out = tl.where(s > NEG, out, 0.0)  # a candidate its healing row does not allow has none
            seen = tl.max(tl.where(both & (out > 0), 1, 0), axis=1)[:, None] > 0  # [K_PAD, 1]
            mixed = (1 - alpha) * s + alpha * tl.log(tl.maximum(out, floor))
            s = tl.where(seen, mixed, s)
            # zero the counts for the next step's ngram_counts
            zc = tl.arange(0, ZERO_PAD)[None, :]
            tl.store(counts_ptr + p * ORD * (M_PAD + 1) + zc, tl.zeros([K_PAD, ZERO_PAD], tl.int32),
                     mask=pm & (zc < ORD * (M_PAD + 1)))
        sm = tl.where(xm, s, NEG)
        top = tl.max(sm, axis=1)[:, None]
        norm = top + tl.log(tl.sum(tl.where(xm, tl.exp(s - top), 0.0), axis=1))[:, None]
        score = tl.load(score_ptr + p, mask=pm, other=NEG)  # [K_PAD, 1]
        child = tl.where(both, score + s - norm, NEG)
        alive = child > NEG
        cls = tl.load(finish_ptr + cand, mask=both, other=-1)  # [K_PAD, M_PAD]
        finished = (cls >= 0) | (length + 1 >= max_tokens)
        # children of one draft that leave the same text: the best (the first on a tie) is kept
        c3 = child[:, :, None]
        o3 = child[:, None, :]
        xc = tl.arange(0, M_PAD)[None, :, None]
        xo = tl.arange(0, M_PAD)[None, None, :]
        cls_c = cls[:, :, None]
        cls_o = cls[:, None, :]
        beaten = (o3 > c3) | ((o3 == c3) & (xo < xc))
        dup = tl.max(tl.where((cls_c == cls_o) & (cls_c >= 0) & beaten & (xo != xc) & (xo < M), 1, 0), axis=2) > 0
        gained = tl.load(gain_ptr + row * vocab + cand, mask=both, other=0) != 0  # past the healed text
        had = tl.load(nonempty_ptr + p, mask=pm, other=0) != 0  # [K_PAD, 1]
        pooled = finished & alive & ~dup & (had | gained)
        pooled_scores = tl.where(pooled, child, NEG)  # [K_PAD, M_PAD]
        # the pool: the best k of itself and the pooled children
        old_pool = tl.load(pool_ptr + kk, mask=kk < K, other=NEG)
        flat_pooled = tl.reshape(pooled_scores, [K_PAD * M_PAD])
        fk = tl.arange(0, K_PAD * M_PAD)
        taken_a = kk < 0
        taken_b = fk < 0
        pool = tl.full([K_PAD], NEG, tl.float64)
        for r in tl.static_range(K):
            va = tl.where(taken_a, NEG, old_pool)
            vb = tl.where(taken_b, NEG, flat_pooled)
            ma = tl.max(va, axis=0)
            mb = tl.max(vb, axis=0)
            from_a = ma >= mb
            ia = tl.min(tl.where(~taken_a & (va == ma), kk, K_PAD), axis=0)
            ib = tl.min(tl.where(~taken_b & (vb == mb), fk, K_PAD * M_PAD), axis=0)
            taken_a = taken_a | tl.where(from_a, kk == ia, kk < 0)
            taken_b = taken_b | tl.where(from_a, fk < 0, fk == ib)
            pool = tl.where(kk == r, tl.maximum(ma, mb), pool)
        # survivors: the best k unfinished children, ties in (draft, candidate) order
        cont = tl.reshape(tl.where(finished | ~alive, NEG, child), [K_PAD * M_PAD])
        fp = fk // M_PAD
        fx = fk % M_PAD
        order = tl.where((fp < K) & (fx < M), fp * M + fx, K * M + fk)
        taken = fk < 0
        new_score = tl.full([K_PAD], NEG, tl.float64)
        parent = tl.zeros([K_PAD], tl.int64)
        slot = tl.zeros([K_PAD], tl.int64)
        for r in tl.static_range(K):
            v = tl.where(taken, NEG, cont)
            best = tl.max(v, axis=0)
            first = tl.min(tl.where(~taken & (v == best), order, 2 * K_PAD * M_PAD), axis=0)
            taken = taken | (order == first)
            new_score = tl.where(kk == r, best, new_score)
            parent = tl.where(kk == r, first // M, parent)
            slot = tl.where(kk == r, first % M, slot)
        token = tl.load(cand_ptr + parent * M + slot)  # [K_PAD]
        parent_spelled = tl.load(heal_at_ptr + parent)
        parent_row = tl.where(parent_spelled < heal_len, parent_spelled, ROWS - 1)
        tgained = tl.load(gain_ptr + parent_row * vocab + token) != 0
        new_nonempty = (tl.load(nonempty_ptr + parent, mask=kk < K, other=0) != 0) | tgained
        new_spelled = tl.where(parent_spelled < heal_len,
                               tl.minimum(parent_spelled + tl.load(length_ptr + token), heal_len), parent_spelled)
        cols = tl.arange(0, MAX_T)[None, :]
        old_ids = tl.load(ids_ptr + p * MAX_T + cols, mask=pm, other=0)  # [K_PAD, MAX_T]
        new_ids = tl.load(ids_ptr + parent[:, None] * MAX_T + cols, mask=pm, other=0)
        new_ids = tl.where(cols == length, token[:, None], new_ids)
        oc = tl.arange(0, ORD_PAD)[None, :]
        new_ctx = tl.load(ctx_ptr + parent[:, None] * ORD + oc + 1, mask=pm & (oc < ORD - 1), other=0)
        new_ctx = tl.where(oc == ORD - 1, token[:, None], new_ctx)
        # the budget and why the chain stops
        live = (new_score > NEG) & (kk < K)
        n_live = tl.sum(live.to(tl.int32), axis=0)
        best = tl.max(tl.where(kk == 0, new_score, NEG), axis=0)
        pool0 = tl.max(pool, axis=0)
        pool_last = tl.max(tl.where(kk == K - 1, pool, NEG), axis=0)
        now = length + 1
        if HAS_RATIO:
            lower = (budget == max_tokens) & (n_live > 0) & (pool0 > NEG) & (pool0 >= best)
            lowered = tl.minimum(budget, tl.maximum(tl.ceil(ratio * now.to(tl.float64)).to(tl.int64), now + slack))
            budget = tl.where(lower, lowered, budget)
        reason = tl.where(n_live == 0, 1, tl.where((pool_last > NEG) & (best <= pool_last), 2, tl.where(
            now >= budget, 3, tl.where(now - 1 - committed >= reset_every, 4, 0))))
        committed = tl.where((reason == 0) & (n_live == 1) & (committed == now - 1), now, committed)
        # the next input: the live drafts' last tokens, weighted by softmax(weight_scale * score)
        # (a stopped chain's steps change nothing: token 0 at weight 1, at the last slot)
        scaled = tl.where(live, weight_scale * new_score, -1e300)
        gamma = tl.exp(scaled - tl.max(scaled, axis=0))
        gamma = gamma / tl.sum(tl.where(kk < K, gamma, 0.0), axis=0)
        mix_ids = tl.where(live & running, token, 0)
        mix_w = tl.where(running, gamma, tl.where(kk == 0, 1.0, 0.0))
        last = tl.where(running, now, length)
        position = tl.load(meta_ptr + 5) + last - 1
        slot_at = tl.load(meta_ptr + 6) + last - 1
        step = tl.minimum(steps, MAX_CHAIN - 1)
        tl.debug_barrier()  # every old value is read before any is overwritten
        tl.store(log_tokens_ptr + step * K * M + p * M + x, cand, mask=both)
        tl.store(log_scores_ptr + step * K * M + p * M + x, tl.where(running, pooled_scores, NEG), mask=both)
        tl.store(log_ids_ptr + step * K * MAX_T + p * MAX_T + cols, old_ids, mask=(pm & running) != 0)
        tl.store(ids_ptr + p * MAX_T + cols, new_ids, mask=(pm & running) != 0)
        tl.store(ctx_ptr + p * ORD + oc, new_ctx, mask=(pm & (oc < ORD) & running) != 0)
        tl.store(score_ptr + kk, new_score, mask=((kk < K) & running) != 0)
        tl.store(nonempty_ptr + kk, new_nonempty.to(tl.int8), mask=((kk < K) & running) != 0)
        tl.store(heal_at_ptr + kk, new_spelled, mask=((kk < K) & running) != 0)
        tl.store(pool_ptr + kk, pool, mask=((kk < K) & running) != 0)
        tl.store(meta_ptr + 0, now, mask=running)
        tl.store(meta_ptr + 1, committed, mask=running)
        tl.store(meta_ptr + 2, budget, mask=running)
        tl.store(meta_ptr + 3, reason, mask=running)
        tl.store(meta_ptr + 4, steps + 1, mask=running)
        tl.store(mix_ids_ptr + kk, mix_ids, mask=kk < K)
        tl.store(mix_w_ptr + kk, mix_w, mask=kk < K)
        tl.store(pos_ptr, position)
        tl.store(slot_ptr, slot_at)


def _pad(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_FLOAT_PARAMS: dict[tuple, torch.Tensor] = {}


def _float_params(params, device: torch.device) -> torch.Tensor:
    """[alpha, floor, workspace weight, finish ratio, lambda_1..5, weight scale] float64 on `device` (made once:
    a copy inside a graph capture is not allowed)."""
    key = (params.alpha, params.ngram_floor, params.workspace_weight, params.finish_ratio, params.lambdas,
           params.weight_scale, str(device))
    found = _FLOAT_PARAMS.get(key)
    if found is None:
        lam = list(params.lambdas[:ORDERS]) + [0.0] * (ORDERS - len(params.lambdas))
        values = [params.alpha, params.ngram_floor, params.workspace_weight, params.finish_ratio or 1.0, *lam,
                  params.weight_scale]
        found = _FLOAT_PARAMS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return found


def counts_buffer(k: int, m: int, device: torch.device) -> torch.Tensor:
    """The zeroed int32 [k, 5, 1 + M_PAD] buffer the two kernels share."""
    return torch.zeros((k, ORDERS, 1 + _pad(m)), dtype=torch.int32, device=device)


def superposed_select_triton(values: torch.Tensor, cand: torch.Tensor, lse: torch.Tensor, counts: torch.Tensor,
                             stream: torch.Tensor, stream_length: int, corpus, rules, gain: torch.Tensor, state: dict,
                             params, mixed: bool, positions: torch.Tensor, slots: torch.Tensor,
                             block: int = 1024) -> None:
    """One step's selection (see the module docstring): `cand` [k, m] each draft's top m tokens
    under its healing row, `values` their logits / T, `lse` [1] the log-sum-exp of logits / T,
    `gain` [rows, V] whether a token adds content to a draft at each healing row (the last row:
    past the healed text); `state` the SuperposedBuffers tensors (ids, score, nonempty, ctx, pool,
    meta, heal_at, log_ids, log_tokens, log_scores, and the next input's mix_ids and mix_w); the
    next forward's position and slot go to `positions[0]`, `slots[0]`."""
    k, max_t = state["ids"].shape
    m = cand.shape[1]
    if k > 8 or m > 8 or max_t & (max_t - 1):
        raise ValueError("the select kernel serves k, m <= 8 and a power-of-two token capacity")
    if mixed:
        grid = (k, triton.cdiv(stream_length, block))
        _ngram_counts_kernel[grid](stream, state["ctx"], cand, counts, stream_length,
                                   ORD=ORDERS, M=m, M_PAD=_pad(m), BLOCK=block)
    if corpus is not None and len(corpus.keys):
        keys, nxt, ccounts, n_keys = corpus.keys, corpus.next_ids, corpus.counts, len(corpus.keys)
        corpus_orders, top = min(corpus.max_order - 1, ORDERS), corpus.next_ids.shape[1]
    else:
        keys, nxt, ccounts, n_keys, corpus_orders, top = counts, counts, counts, 0, 0, 1
    fparams = _float_params(params, values.device)
    _select_kernel[(1,)](
        values, cand, lse, counts, keys, nxt, ccounts, n_keys,
        rules.finish_class, gain.view(torch.int8), rules.length, gain.shape[1],
        state["ids"], state["score"], state["nonempty"].view(torch.int8), state["ctx"], state["pool"], state["meta"],
        state["heal_at"],
        state["log_ids"], state["log_tokens"], state["log_scores"], state["mix_ids"], state["mix_w"], positions, slots,
        MULT, fparams, int(params.finish_slack), int(params.reset_every),
        K=k, M=m, K_PAD=_pad(k), M_PAD=_pad(m), MAX_T=max_t, ORD=ORDERS, ORD_PAD=8,
        MAX_CHAIN=state["log_ids"].shape[0], ROWS=gain.shape[0], MIXED=mixed, CORPUS_ORDERS=corpus_orders, TOP=top,
        SEARCH=max(1, math.ceil(math.log(n_keys + 1) / math.log(PROBES + 1)) + 2), PROBES=PROBES,
        HAS_RATIO=params.finish_ratio is not None,
        ZERO_PAD=_pad(ORDERS * (1 + _pad(m))),
    )
