"""The host-free parts of a device-side speculative iteration (engine/static_decode.py's
`lookup_chain`): prompt lookup with staging of the verification's inputs, and the verdict with
the state's advance.

State, int64 [6] on the device: [last token, its position, its slot, tokens kept so far, search
buffer length, iteration]. The search buffer `padded` is int64 [MAX_MATCH + n + 1]: MAX_MATCH
slots of -3 (they match nothing), then the buffer itself (`src`, negative ids separate sources),
whose last slot takes writes that go nowhere.

draft    For every slot p < length, `run[p]` = how many of the tokens before p equal the
         buffer's last tokens (up to MAX_MATCH, in order from p - 1 back). The start is the p with
         the longest run, then the latest (score = run * (n + 1) + p); if no p has a run and a
         token at p, slot 0. Row 0 of the verification is the last token, rows 1..W-1 are
         src[start + j] (0 past `length`; separators also read as 0), at position and slot
         `state + row`.
accept   `chosen` [W] are the argmaxes of the W rows' logits. Drafts are accepted up to the first
         that differs from the argmax before it; the accepted drafts and the next argmax (the
         bonus) are kept: written to `kept` (ids, then log-probabilities), appended to the buffer,
         and the state moves past them.

On an H100 with the default model, torch ops for these took ~45 kernels and ~0.3 ms of a
0.63 ms iteration (a scan over the buffer's match windows alone took 0.11 ms); the kernels
here are one program each. `*_ref` are the torch definitions (the CPU's static mode runs them);
`draft` and `accept` take the kernels on CUDA.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only installs
    triton = None

MAX_MATCH = 8  # the longest tail matched


def draft_ref(padded: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
              slots: torch.Tensor) -> None:
    """Stage [last token, W - 1 drafts] into `ids`, `positions`, `slots` (each [W])."""
    width = ids.shape[0]
    size = padded.shape[0] - MAX_MATCH  # n + 1
    src = padded[MAX_MATCH:]
    dev = padded.device
    length = state[4]
    back = torch.arange(MAX_MATCH, device=dev)
    tail = padded[(length + back).clamp_max(padded.shape[0] - 1)]  # src[length - MAX_MATCH : length]
    windows = padded.unfold(0, MAX_MATCH, 1)[:size]  # [p] = src[p - MAX_MATCH : p]
    same = (windows == tail) & (tail >= 0)
    # trailing matches before p: the first mismatch counted back from p - 1 (MAX_MATCH if none)
    stop = torch.cat((~same.flip(1), torch.ones_like(same[:, :1])), 1)
    run = stop.to(torch.uint8).argmax(1)
    slot = torch.arange(size, device=dev)
    ok = (slot < length) & (src >= 0) & (run > 0)
    score = torch.where(ok, run * size + slot, -1)
    start = score.argmax()
    rows = torch.arange(width, device=dev)
    at = (start + rows[:-1]).clamp_max(size - 1)
    ids[:1].copy_(state[:1])
    ids[1:].copy_(torch.where(at < length, src[at], 0).clamp_min(0))
    torch.add(rows, state[1], out=positions)
    torch.add(rows, state[2], out=slots)


def accept_ref(chosen: torch.Tensor, values: torch.Tensor, logsumexp: torch.Tensor, ids: torch.Tensor,
               padded: torch.Tensor, state: torch.Tensor, kept: torch.Tensor, accepts: torch.Tensor) -> None:
    """Judge the drafts `ids[1:]` against `chosen` (each [W]; `values` the chosen logits,
    `logsumexp` per row) and advance: `kept` [2, K] float64, `accepts` [C] int64 per iteration."""
    width = chosen.shape[0]
    src = padded[MAX_MATCH:]
    junk_src, junk_kept = src.shape[0] - 1, kept.shape[1] - 1
    rows = torch.arange(width, device=chosen.device)
    differs = torch.cat((ids[1:] != chosen[:-1], torch.ones_like(chosen[:1], dtype=torch.bool)))
    accepted = differs.to(torch.uint8).argmax()
    keep = rows <= accepted
    into = torch.where(keep & (state[3] + rows < junk_kept), state[3] + rows, junk_kept)
    kept[0].scatter_(0, into, chosen.double())
    kept[1].scatter_(0, into, (values - logsumexp).double())
    length = state[4]
    src.scatter_(0, torch.where(keep & (length + rows < junk_src), length + rows, junk_src), chosen)
    accepts.scatter_(0, state[5:6].clamp_max(accepts.shape[0] - 1), accepted[None])
    state[0:1].copy_(chosen.gather(0, accepted[None]))
    state[1:5] += accepted + 1
    state[5:6] += 1


if triton is not None:

    @triton.jit
    def _draft_kernel(padded_ptr, state_ptr, ids_ptr, positions_ptr, slots_ptr, size,
                      W: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr):
        length = tl.load(state_ptr + 4)
        src_ptr = padded_ptr + M
        best = tl.full((), -1, tl.int64)
        for lo in range(0, length, BLOCK):  # only the slots in use (the loop bound is read on the device)
            p = lo + tl.arange(0, BLOCK).to(tl.int64)
            alive = p < length
            run = tl.zeros((BLOCK,), tl.int64)
            for j in tl.static_range(M):
                # the tail's token, per lane (the padding reads -3: it matches nothing)
                want = tl.load(src_ptr + length - 1 - j + tl.zeros((BLOCK,), tl.int64))
                have = tl.load(src_ptr + p - 1 - j, mask=alive, other=-4)
                alive = alive & (have == want) & (want >= 0)
                run += alive.to(tl.int64)
            after = tl.load(src_ptr + p, mask=p < length, other=-1)
            score = tl.where((p < length) & (after >= 0) & (run > 0), run * size + p, -1)
            best = tl.maximum(best, tl.max(score, axis=0))
        start = tl.where(best >= 0, best % size, 0)
        rows = tl.arange(0, W).to(tl.int64)
        at = tl.minimum(start + rows - 1, size - 1)
        token = tl.load(src_ptr + at, mask=(rows >= 1) & (at < length), other=0)
        token = tl.maximum(token, 0)
        token = tl.where(rows == 0, tl.load(state_ptr), token)
        tl.store(ids_ptr + rows, token)
        tl.store(positions_ptr + rows, tl.load(state_ptr + 1) + rows)
        tl.store(slots_ptr + rows, tl.load(state_ptr + 2) + rows)

    @triton.jit
    def _accept_kernel(chosen_ptr, values_ptr, lse_ptr, ids_ptr, padded_ptr, state_ptr, kept_ptr, accepts_ptr,
                       stride_chosen, stride_values, stride_lse, size, kept_size, accepts_size,
                       W: tl.constexpr, M: tl.constexpr):
        rows = tl.arange(0, W).to(tl.int64)
        chosen = tl.load(chosen_ptr + rows * stride_chosen)
        drafts = tl.load(ids_ptr + 1 + rows, mask=rows < W - 1, other=-1)
        differs = (drafts != chosen) | (rows == W - 1)
        accepted = tl.min(tl.where(differs, rows, W), axis=0)
        keep = rows <= accepted
        count = tl.load(state_ptr + 3)
        length = tl.load(state_ptr + 4)
        logprob = tl.load(values_ptr + rows * stride_values) - tl.load(lse_ptr + rows * stride_lse)
        into = count + rows
        tl.store(kept_ptr + into, chosen.to(tl.float64), mask=keep & (into < kept_size - 1))
        tl.store(kept_ptr + kept_size + into, logprob.to(tl.float64), mask=keep & (into < kept_size - 1))
        tl.store(padded_ptr + M + length + rows, chosen, mask=keep & (length + rows < size - 1))
        iteration = tl.load(state_ptr + 5)
        tl.store(accepts_ptr + tl.minimum(iteration, accepts_size - 1), accepted)
        tl.store(state_ptr, tl.sum(tl.where(rows == accepted, chosen, 0), axis=0))
        for k in tl.static_range(1, 5):
            tl.store(state_ptr + k, tl.load(state_ptr + k) + accepted + 1)
        tl.store(state_ptr + 5, iteration + 1)


def draft_triton(padded: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block: int = 2048) -> None:
    """`draft_ref` in one program (a scan over the buffer in blocks of `block` slots)."""
    width = ids.shape[0]
    assert width >= 2 and width & (width - 1) == 0, "the verification width must be a power of two"
    assert ids.is_contiguous() and positions.is_contiguous() and slots.is_contiguous()
    _draft_kernel[(1,)](padded, state, ids, positions, slots, padded.shape[0] - MAX_MATCH,
                        W=width, M=MAX_MATCH, BLOCK=block, num_warps=8 if block >= 2048 else 4)


def accept_triton(chosen: torch.Tensor, values: torch.Tensor, logsumexp: torch.Tensor, ids: torch.Tensor,
                  padded: torch.Tensor, state: torch.Tensor, kept: torch.Tensor, accepts: torch.Tensor) -> None:
    """`accept_ref` in one program."""
    width = chosen.shape[0]
    assert width >= 2 and width & (width - 1) == 0, "the verification width must be a power of two"
    assert kept.is_contiguous() and ids.is_contiguous()
    _accept_kernel[(1,)](chosen, values, logsumexp, ids, padded, state, kept, accepts,
                         chosen.stride(0), values.stride(0), logsumexp.stride(0), padded.shape[0] - MAX_MATCH,
                         kept.shape[1],
                         accepts.shape[0], W=width, M=MAX_MATCH, num_warps=1)


def draft(padded: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
          slots: torch.Tensor) -> None:
    """The kernel on CUDA, the torch definition elsewhere."""
    if triton is not None and padded.is_cuda:
        return draft_triton(padded, state, ids, positions, slots)
    return draft_ref(padded, state, ids, positions, slots)


def accept(chosen: torch.Tensor, values: torch.Tensor, logsumexp: torch.Tensor, ids: torch.Tensor,
           padded: torch.Tensor, state: torch.Tensor, kept: torch.Tensor, accepts: torch.Tensor) -> None:
    """The kernel on CUDA, the torch definition elsewhere."""
    if triton is not None and chosen.is_cuda:
        return accept_triton(chosen, values, logsumexp, ids, padded, state, kept, accepts)
    return accept_ref(chosen, values, logsumexp, ids, padded, state, kept, accepts)
