"""The superposed step's selection kernels (kernels/superposed_select.py) against the torch
definition (engine/decoding/superposed_device.select_ref), on random states."""

import math
import random

import numpy as np
import pytest
import torch
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.decoding.superposed import SuperposedParams
from editkv.engine.decoding.superposed_device import (
    NEVER,
    ORDERS,
    RUNNING,
    SuperposedBuffers,
    TokenRules,
    candidates,
    device_corpus,
    next_input,
    select_ref,
)
from editkv.engine.ngram import NgramTable
from editkv.kernels.superposed_select import superposed_select_triton
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = torch.device(KERNEL_DEVICE)
VOCAB = 24  # small: contexts repeat in the stream and the corpus, so every order is exercised


def _rules(rng: random.Random) -> TokenRules:
    finish = [rng.choice([-1, -1, -1, 0, 1, 2]) for _ in range(VOCAB)]
    stop = [rng.random() < 0.1 for _ in range(VOCAB)]
    finish = [0 if s else f for f, s in zip(finish, stop, strict=True)]
    content = [rng.random() < 0.7 for _ in range(VOCAB)]
    before = [c and rng.random() < 0.8 for c in content]
    length = [rng.randrange(1, 4) for _ in range(VOCAB)]
    gain = [(b if f >= 0 else c) and not s for f, s, c, b in zip(finish, stop, content, before, strict=True)]
    return TokenRules(*(torch.tensor(v, device=DEVICE) for v in (finish, stop, content, before, length, gain)))


def _state(rng: random.Random, k: int, m: int, index: NgramIndex, heal: int) -> SuperposedBuffers:
    """A random state; drafts may still be spelling `heal` healed bytes (random healing tables)."""
    buf = SuperposedBuffers(k, m, 32, VOCAB, DEVICE)
    buf.stage_stream(index)
    buf.rows = 1 << heal.bit_length()
    masks, gain = buf.heal_table()
    masks.copy_(torch.rand(masks.shape, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.3)
    masks[heal:] = True  # past the healed text every token is allowed
    gain.copy_(torch.rand(gain.shape, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.5)
    length = rng.randrange(0, 20)
    max_tokens = rng.choice([length + 1, length + 2, 30])
    drafts = []
    for i in range(k):
        alive = i == 0 or rng.random() < 0.8
        drafts.append(([rng.randrange(VOCAB) for _ in range(length)], -rng.random() * 5 if alive else -math.inf,
                       rng.random() < 0.5, rng.randrange(0, heal + 1)))
    drafts.sort(key=lambda d: -d[1])
    pool = sorted((-rng.random() * 6 for _ in range(rng.randrange(0, k + 1))), reverse=True)
    left = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))]
    buf.stage(drafts, left, {"length": length, "committed": rng.randrange(0, length + 1),
                             "budget": rng.choice([max_tokens, max(length + 1, 2)]), "position": 7, "slot": 3,
                             "left": len(left), "max_tokens": max_tokens, "heal": heal, "pool": pool})
    buf.meta[4] = rng.randrange(0, 5)  # steps already run in this chain
    if rng.random() < 0.15:
        buf.meta[3] = rng.randrange(1, 5)  # a stopped chain: nothing may change but the log
    buf.logits.copy_(torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 3)
    return buf


@needs_triton
@pytest.mark.parametrize("k,m", [(1, 1), (3, 3), (4, 2), (2, 4)])
@pytest.mark.parametrize("mixed,with_corpus", [(True, True), (True, False), (False, False)])
def test_select_kernel_matches_definition(k, m, mixed, with_corpus):
    rng = random.Random(100 * k + 10 * m + mixed + with_corpus)
    index = NgramIndex()
    for d in range(3):
        index.add(f"doc{d}", [rng.randrange(VOCAB) for _ in range(rng.randrange(40, 300))])
    table = NgramTable.build(np.array([rng.randrange(VOCAB) for _ in range(4000)], dtype=np.int64), max_order=4)
    corpus = device_corpus(table, DEVICE) if with_corpus else None
    params = SuperposedParams(reset_every=rng.choice([3, 10]))
    eye = torch.eye(VOCAB, dtype=torch.float64, device=DEVICE)

    def one_hot(ids):  # an embedding whose mixture shows the ids and weights
        return eye[ids]

    changed = 0
    for trial in range(12):
        rules = _rules(rng)
        heal = rng.choice([0, 0, 1, 3, 6])
        ref = _state(rng, k, m, index, heal)
        ker = _state(random.Random(0), k, m, index, heal)
        ker.rows = ref.rows
        for a, b in zip(ker.heal_table(), ref.heal_table(), strict=True):
            a.copy_(b)
        for a, b in zip(ker.state_tensors(), ref.state_tensors(), strict=True):
            a.copy_(b)
        before = [t.clone() for t in ref.state_tensors()]
        cand, values, lse = candidates(ref, params.temperature)
        select_ref(ref, rules, corpus, params, mixed, cand, values, lse)
        positions, slots = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long,
                                                                                     device=DEVICE)
        superposed_select_triton(values, cand, lse, ker.counts, ker.stream, ker.stream_length, corpus, rules,
                                 ker.heal_table()[1], ker.tensors(), params, mixed, positions, slots)
        # the next input as next_input computes it from the state (a running step only)
        embeds, want_pos, want_slot = torch.zeros(1, 1, VOCAB, dtype=torch.float64, device=DEVICE), positions * 0, \
            slots * 0
        next_input(ref, one_hot, params.weight_scale, embeds, want_pos, want_slot)
        assert positions == want_pos and slots == want_slot
        if int(before[5][3]) == RUNNING:
            mixed_in = torch.zeros(VOCAB, dtype=torch.float64, device=DEVICE).index_add_(0, ker.mix_ids, ker.mix_w)
            torch.testing.assert_close(mixed_in, embeds[0, 0], rtol=1e-12, atol=1e-12)
        for name in ("ids", "nonempty", "ctx", "meta", "heal_at", "log_ids", "log_tokens", "counts"):
            assert torch.equal(getattr(ker, name), getattr(ref, name)), (trial, name)
        for name in ("score", "pool", "log_scores"):
            torch.testing.assert_close(getattr(ker, name), getattr(ref, name), rtol=1e-12, atol=1e-12,
                                       msg=f"{trial} {name}")
        changed += not all(torch.equal(a, b) for a, b in zip(ref.state_tensors(), before, strict=True))
        if int(before[5][3]) != RUNNING:  # a stopped chain only logs
            assert torch.equal(ref.ids, before[0]) and torch.equal(ref.meta, before[5])
    assert changed >= 8


@needs_triton
def test_ngram_counts_kernel_counts_every_order():
    """The stream counts the select kernel reads: per order, contexts seen and n-grams, by definition."""
    from editkv.kernels.superposed_select import _ngram_counts_kernel, _pad

    rng = random.Random(5)
    tokens = [rng.randrange(6) for _ in range(500)]
    index = NgramIndex()
    index.add("doc", tokens)
    k, m = 3, 3
    buf = SuperposedBuffers(k, m, 16, 6, DEVICE)
    buf.stage_stream(index)
    ctx = [[NEVER] * (ORDERS - 2) + [1, 2], [rng.randrange(6) for _ in range(ORDERS)], [NEVER] * ORDERS]
    buf.ctx.copy_(torch.tensor(ctx))
    cand = torch.tensor([[0, 3, 5], [1, 2, 4], [0, 3, 5]], device=DEVICE)  # each draft its own
    _ngram_counts_kernel[(k, -(-buf.stream_length // 256))](buf.stream, buf.ctx, cand, buf.counts, buf.stream_length,
                                                             ORD=ORDERS, M=m, M_PAD=_pad(m), BLOCK=256)
    for i, row in enumerate(ctx):
        for c in range(1, ORDERS + 1):
            want = [p for p in range(c, len(tokens)) if tokens[p - c : p] == row[ORDERS - c :]]
            assert buf.counts[i, c - 1, 0] == len(want)
            for j, x in enumerate(cand[i].tolist()):
                assert buf.counts[i, c - 1, 1 + j] == sum(tokens[p] == x for p in want)
    assert buf.counts[0, 1, 0] > 0  # the short context was seen
