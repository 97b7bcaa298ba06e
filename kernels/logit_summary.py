"""Everything a decode step reads from one position's logits, in one pass: the top-k logits and
their ids, the log-sum-exp and the entropy of the softmax.

A greedy step wants the argmax and the chosen token's log-probability; AdaDec's gate wants the
entropy, and where it fires its rerank wants the top-B candidates with their log-probabilities.
In torch each of those is its own chain of kernels over the whole vocabulary (argmax; max,
exp, sum, log and a gather for log_softmax; softmax, multiply and sum again for the entropy),
and each answer the host reads is a sync of its own. This module computes them together, so a
step reads one small tensor once. The numbers, for a row l of V logits:

    lse     = log sum_j exp(l_j)                 (logsumexp; log p_j = l_j - lse)
    entropy = -sum_j p_j log p_j = lse - sum_j p_j l_j     (nats; p_j = 0 where l_j = -inf)
    top-k   = the k largest l_j, descending; equal logits in increasing id order, so ids[:, 0]
              is `logits.argmax(-1)` (torch's argmax returns the first maximal index)

A row whose entries are all -inf (nothing allowed) has lse = -inf, entropy 0, values -inf and
ids 0..k-1. Logits of +inf or NaN are not supported.

Algorithm (Triton). Kernel 1, grid (row, block of BLOCK logits), loads its block once and
writes partials: the block's max m, S = sum exp(l - m), T = sum exp(l - m) * (l - m) (each
guarded so that -inf entries, and a block of nothing but -inf, contribute 0 and never NaN), and
the block's own top-k, found by k rounds of "largest remaining value, lowest id among equals".
Kernel 2, one program per row, rescales the partials to the row's max M with w = exp(m - M):
S_row = sum w S, T_row = sum w (T + (m - M) S), so lse = M + log S_row and entropy =
log S_row - T_row / S_row. T is kept relative to each max so the entropy is a sum of two
non-negative terms instead of a difference of two numbers near the logits' scale. The row's
top-k is the top-k of the blocks' candidates, in the same order (every row-wide winner is a
winner of its own block). Nothing on the host reads a device value and the grid depends on
shapes only, so the call can be captured in a CUDA graph.

Cost (one H100, R = 1, V = 15k and 152k). Replayed in a CUDA graph the two kernels take 5-6
us of GPU time, against 14-49 us for torch's argmax + log_softmax and 23-64 us for its entropy
+ argmax. An eager call costs ~75-100 us of host time (two Triton launches), which hides behind
the forward the logits come from: launched right after it and read once, a greedy step's
logits handling took ~35 us of wall time after a 1 ms forward, torch's two reads 74-102 us.
With nothing in flight on the GPU the eager call is slower than torch's ops.

`logit_summary_ref` is the torch definition (fp32, the same sums; its entropy is
engine/calibrate.py's `entropy` up to rounding); `logit_summary` takes the Triton kernels on
CUDA and the reference elsewhere (tests run `logit_summary_triton` on the CPU under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only installs
    triton = None

MAX_K = 16  # the kernels' top-k is k rounds over a block: meant for a handful of candidates
DEFAULT_BLOCK = 2048  # ~75 programs for a 152k vocabulary at batch 1: most of an H100's 132 SMs


class LogitSummary(NamedTuple):
    """One row per logits row: the top-k (values descending, ids), log-sum-exp and entropy."""

    values: torch.Tensor  # [R, k] fp32, descending
    ids: torch.Tensor  # [R, k] int64; equal values in increasing id order
    logsumexp: torch.Tensor  # [R] fp32; -inf for a row with nothing allowed
    entropy: torch.Tensor  # [R] fp32, nats; 0 for a row with nothing allowed


def _check(logits: torch.Tensor, k: int) -> None:
    assert logits.dim() == 2, f"logits must be [rows, vocab], got {tuple(logits.shape)}"
    assert 1 <= k <= logits.shape[-1], f"k={k} must be in [1, vocab={logits.shape[-1]}]"


def logit_summary_ref(logits: torch.Tensor, k: int) -> LogitSummary:
    """The definition, in fp32 torch ops (no host reads, so it also runs on CUDA).

    It is also what every CPU decode step runs, so it makes few passes over the vocabulary.
    """
    _check(logits, k)
    x = logits.float()
    vocab = x.shape[-1]
    if k == 1:
        ids = x.argmax(-1, keepdim=True)  # the first maximal index
    else:
        # torch.topk picks the right values but any of several equal ones: keep every entry above
        # the k-th value and the lowest-indexed entries equal to it, then order them
        kth = torch.topk(x, k, dim=-1).values[:, -1:]
        above = x > kth
        tied = x == kth
        chosen = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        index = torch.arange(vocab, device=x.device)
        ids = torch.topk(torch.where(chosen, index, index + vocab), k, dim=-1, largest=False).indices
        # ids ascend here, so a stable sort keeps equal values in id order
        ids = ids.gather(-1, torch.sort(x.gather(-1, ids), dim=-1, descending=True, stable=True).indices)
    values = x.gather(-1, ids)
    # the kernels' sums, relative to the row's max M: S = sum exp(l - M), T = sum exp(l - M) (l - M).
    # Below -104 exp rounds to 0 in fp32, so clamping there changes no term and turns -inf
    # entries (0 * -inf) into 0 * -200.
    top = values[:, :1]
    top = top.masked_fill(top == float("-inf"), 0.0)  # nothing allowed: S = 0
    gap = (x - top).clamp_(min=-200.0)
    weight = gap.exp()
    total = weight.sum(-1)
    log_total = total.log()
    lse = top[:, 0] + log_total  # -inf where S = 0
    entropy = (log_total - (weight * gap).sum(-1) / total).masked_fill(total == 0, 0.0)
    return LogitSummary(values, ids, lse, entropy)


if triton is not None:

    @triton.jit
    def _logit_partials_kernel(
        logits_ptr, part_ptr,
        stride_row, vocab, num_blocks,
        K: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        valid = cols < vocab
        x = tl.load(logits_ptr + row * stride_row + cols, mask=valid, other=float("-inf")).to(tl.float32)

        top = tl.max(x, axis=0)
        safe_top = tl.where(top == float("-inf"), 0.0, top)  # a block of -inf only: p = 0, not NaN
        p = tl.exp(x - safe_top)
        gap = tl.where(x > float("-inf"), x - safe_top, 0.0)  # -inf entries: p = 0, and 0 * -inf is NaN
        total = tl.sum(p, axis=0)
        spread = tl.sum(p * gap, axis=0)  # <= 0

        part = part_ptr + (row * num_blocks + block) * (3 + 2 * K)  # [max, sum, spread, K values, K ids]
        tl.store(part + 0, top)
        tl.store(part + 1, total)
        tl.store(part + 2, spread)

        # the block's top-k: k rounds of the largest remaining value, lowest column among equals.
        # A tail block with fewer than K columns fills with (-inf, NO_ID), which sort after every
        # real column, -inf ones included. Ids travel as fp32, exact below 2**24.
        free = valid
        for i in tl.static_range(K):
            best = tl.max(tl.where(free, x, float("-inf")), axis=0)
            col = tl.min(tl.where(free & (x == best), cols, 16777216), axis=0)
            tl.store(part + 3 + i, best)
            tl.store(part + 3 + K + i, col.to(tl.float32))
            free = free & (cols != col)

    @triton.jit
    def _logit_merge_kernel(
        part_ptr, record_ptr, ids_ptr,
        num_blocks,
        K: tl.constexpr, BLOCKS_PAD: tl.constexpr, CANDIDATES_PAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        first = part_ptr + row * num_blocks * (3 + 2 * K)
        b = tl.arange(0, BLOCKS_PAD)
        b_ok = b < num_blocks
        block_max = tl.load(first + b * (3 + 2 * K) + 0, mask=b_ok, other=float("-inf"))
        block_sum = tl.load(first + b * (3 + 2 * K) + 1, mask=b_ok, other=0.0)
        block_spread = tl.load(first + b * (3 + 2 * K) + 2, mask=b_ok, other=0.0)

        top = tl.max(block_max, axis=0)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        seen = block_max > float("-inf")  # blocks of -inf only hold nothing (and (m - M) * 0 is NaN)
        gap = tl.where(seen, block_max - safe_top, 0.0)
        weight = tl.where(seen, tl.exp(gap), 0.0)
        total = tl.sum(weight * block_sum, axis=0)
        spread = tl.sum(weight * (block_spread + gap * block_sum), axis=0)
        nothing = top == float("-inf")
        log_total = tl.log(tl.where(nothing, 1.0, total))
        record = record_ptr + row * (K + 2)  # [K values, logsumexp, entropy]
        tl.store(record + K, tl.where(nothing, float("-inf"), safe_top + log_total))
        tl.store(record + K + 1, tl.where(nothing, 0.0, log_total - spread / tl.where(nothing, 1.0, total)))

        c = tl.arange(0, CANDIDATES_PAD)
        c_ok = c < num_blocks * K
        at = first + (c // K) * (3 + 2 * K) + 3 + c % K
        vals = tl.load(at, mask=c_ok, other=float("-inf"))
        cols = tl.load(at + K, mask=c_ok, other=16777216.0)
        free = c_ok
        for i in tl.static_range(K):
            best = tl.max(tl.where(free, vals, float("-inf")), axis=0)
            col = tl.min(tl.where(free & (vals == best), cols, 16777216.0), axis=0)
            tl.store(record + i, best)
            tl.store(ids_ptr + row * K + i, col.to(tl.int64))
            free = free & (cols != col)


def logit_summary_triton(logits: torch.Tensor, k: int, block: int = DEFAULT_BLOCK) -> LogitSummary:
    """Same contract as `logit_summary_ref`: per-block partials, then one merge program per row.

    `block` (a power of two) is the logits each first-kernel program reads; tests make it
    small so that a small vocabulary still spans several blocks and a ragged tail.
    """
    _check(logits, k)
    assert k <= MAX_K, f"k={k} is more than the kernels' MAX_K={MAX_K}; use logit_summary_ref"
    assert logits.stride(-1) == 1, "the vocabulary dimension must be contiguous"
    assert block >= 16 and block & (block - 1) == 0, "block must be a power of two >= 16"
    rows, vocab = logits.shape
    assert vocab <= 2**24, "ids travel between the kernels as fp32"
    block = min(block, max(16, triton.next_power_of_2(vocab)))
    num_blocks = triton.cdiv(vocab, block)
    # Eager calls pay a few microseconds of host time per allocation, so the fp32 outputs
    # (values, logsumexp, entropy: one [R, k + 2] record) and the partials share one buffer.
    # Every (row, block) program writes all of its partials, so nothing is initialised.
    buffer = torch.empty(rows * (k + 2 + num_blocks * (3 + 2 * k)), dtype=torch.float32, device=logits.device)
    record = buffer[: rows * (k + 2)].view(rows, k + 2)
    ids = torch.empty((rows, k), dtype=torch.int64, device=logits.device)
    if rows:
        part = buffer[rows * (k + 2):]
        _logit_partials_kernel[(rows, num_blocks)](
            logits, part,
            logits.stride(0), vocab, num_blocks,
            K=k, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        )
        _logit_merge_kernel[(rows,)](
            part, record, ids,
            num_blocks,
            K=k, BLOCKS_PAD=triton.next_power_of_2(num_blocks),
            CANDIDATES_PAD=max(16, triton.next_power_of_2(num_blocks * k)),
            num_warps=4,
        )
    return LogitSummary(record[:, :k], ids, record[:, k], record[:, k + 1])


def logit_summary(logits: torch.Tensor, k: int) -> LogitSummary:
    """The kernels on CUDA (for k <= MAX_K), the torch reference elsewhere.

    (Tests run the kernels on the CPU through TRITON_INTERPRET=1 by calling
    `logit_summary_triton` directly.)
    """
    if triton is not None and logits.is_cuda and k <= MAX_K:
        return logit_summary_triton(logits, k)
    return logit_summary_ref(logits, k)
