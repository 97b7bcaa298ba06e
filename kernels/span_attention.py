"""Attention of a few new tokens over one KV buffer, with the visibility rule read on the device.

This is the attention of `engine/static_decode.py`'s forwards (decode steps, short speculative
verifications, PIE repairs) at batch 1. The new tokens' keys and values are already written
into the buffer; each token sees up to four runs of its slots:

    [0, sink_end)                   keys acting `sink_shift` positions later, queried by q[:, :, 2]
                                    (an attention window's sink: the document start, moved in
                                    front of the window; only with a third rotation)
    [prefix_start, prefix_end)      keys at their positions, queried by q[:, :, 0]
    [suffix_start, suffix_end)      keys acting `shift` positions later, queried by q[:, :, 1]
                                    (the query rotated to position - shift, so keys stay put)
    [scratch_start, slots[t]]       causally, queried by q[:, :, 0]; from `lane_start` on, only
                                    the slots of the token's own lane (below)

and nothing at or past `bucket`. The numbers live in `meta` (int64: prefix_end, suffix_start,
suffix_end, shift, scratch_start, then optionally prefix_start, sink_end, sink_shift, then
optionally `origin`, then optionally `lane_start`, `lanes`; the shifts themselves are already in
q's rotations; a 5-number meta means prefix_start = 0 and no sink) and the slots in
`slots` (int64 [T]), both on the device. Slots and spans count from `origin` (0 unless given):
the keys a call reads are `origin + [0, bucket)`, so a document that is a region of a shared
buffer (engine/kv_pool.py) replays the same graph as any other, its origin a device input;
`slots` are the buffer's own (where the new keys were written). Lanes are several sequences
decoded side by side after one shared prompt (beam search's beams): their tokens interleave from
`lane_start` on, one slot per lane and step, so a scratch slot j >= lane_start is visible to a
token at slot s only when (j - lane_start) and (s - lane_start) are equal modulo `lanes` (1 or
less: no lanes, the plain causal rule). Nothing on the host reads them,
and the grid depends
only on (kv heads, groups, tokens, bucket), so one launch can be captured in a CUDA graph and
replayed as the numbers change underneath it.

Layout: q is [KVH, G, R, T, D], R = 2, or 3 with a sink (kv head, query head within the group,
which rotation, token, feature); keys/values are [KVH, S, D] views into a bigger cache (last dim contiguous, any other
strides); the output is [KVH, G, T, D] in q's dtype.

Algorithm (split-K, as in flash-decoding). A decode step has one query row per query head but
thousands of keys, so the work is cut along the keys. The rows of a kv head, (group, token)
pairs, are padded to a block of at least 16 for `tl.dot`; program (split, row block, kv head)
walks its split's keys BLOCK_N at a time with an online softmax (fp32, base 2) and writes its
partial row max, sum of weights and unnormalised output to a workspace. Blocks that no row can
see are skipped, and the shifted query's dot is only taken for blocks that touch the suffix.
A second kernel, one program per (row, kv head), rescales the splits' partials to their common
max and divides. A row that sees no key has weight sum 0 everywhere and comes out as zeros.

`span_attention_ref` is the pure-torch definition (fp32); `span_attention` picks the Triton
kernels on CUDA and the reference elsewhere. Tests run `span_attention_triton` on the CPU under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton is optional on CPU-only installs
    triton = None

# Split sizes, tuned on an H100 (session 5 sweep over block_n 32-128, split 64-512 keys, 2-4
# warps, 1-3 stages, at the 1.5B and 7B shapes, 2k-17k keys, 1 and 16 tokens; keys not in L2).
# One row block (a decode step: a kv head's G query rows padded to 16): many small splits,
# about four programs per SM; each program's work is one or two key blocks, and the GPU needs
# the parallelism to keep enough loads in flight. Several row blocks (a verification of 16
# tokens): every split writes a partial per row, so fewer, longer splits pay.
TARGET_PROGRAMS = 512
TARGET_PROGRAMS_MULTI = 256
MIN_SPLIT_KEYS = 64
MIN_SPLIT_KEYS_MULTI = 256
MAX_SPLIT_KEYS = 1024
NUM_WARPS = 4  # 4 beat 2 and 8 at every swept shape
MAX_BLOCK_M = 64


def span_attention_ref(
    q: torch.Tensor,  # [KVH, G, R, T, D], R = 2, or 3 with a sink
    keys: torch.Tensor,  # [KVH, S, D]
    values: torch.Tensor,  # [KVH, S, D]
    meta: torch.Tensor,  # int64 [5], [8], [9] or [11] (see the module docstring)
    slots: torch.Tensor,  # int64 [T]
    scale: float,
    bucket: int,
) -> torch.Tensor:  # [KVH, G, T, D], q's dtype
    """The definition, in fp32: softmax over each token's visible keys among the first `bucket`."""
    _check_meta(q, meta)
    prefix_end, suffix_start, suffix_end, _, scratch_start = meta[:5].unbind()
    prefix_start, sink_end = (meta[5], meta[6]) if meta.shape[0] >= 8 else (0, 0)
    origin = int(meta[8]) if meta.shape[0] >= 9 else 0  # a region of the buffer: counted from its origin
    lane_start, lanes = (int(meta[9]), int(meta[10])) if meta.shape[0] == 11 else (0, 1)
    keys, values, slots = keys[:, origin : origin + bucket], values[:, origin : origin + bucket], slots - origin
    present = keys.shape[1]  # the bucket may run past the buffer's end: nothing is there
    if present < bucket:
        keys = torch.cat((keys, keys.new_zeros(keys.shape[0], bucket - present, keys.shape[2])), dim=1)
        values = torch.cat((values, values.new_zeros(values.shape[0], bucket - present, values.shape[2])), dim=1)
    j = torch.arange(bucket, device=keys.device)
    in_suffix = (j >= suffix_start) & (j < suffix_end)  # [bucket]
    in_sink = j < sink_end
    in_prefix = (j >= prefix_start) & (j < prefix_end)
    scratch = (j[None] >= scratch_start) & (j[None] <= slots[:, None])
    if lanes > 1:  # interleaved lanes: a token sees its own lane's slots only
        scratch &= (j[None] < lane_start) | ((j[None] - lane_start) % lanes == (slots[:, None] - lane_start) % lanes)
    visible = (in_prefix | in_suffix | in_sink)[None] | scratch
    visible = visible & (j < present)[None]
    k = keys.float()
    v = values.float()
    scores = torch.einsum("hgwtd,hsd->hgwts", q.float(), k) * scale  # [KVH, G, R, T, bucket]
    picked = torch.where(in_suffix, scores[:, :, 1], scores[:, :, 0])  # [KVH, G, T, bucket]
    if q.shape[2] == 3:
        picked = torch.where(in_sink, scores[:, :, 2], picked)
    scores = picked
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)  # a row that sees nothing: all weights 0
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, v[:, None]) / torch.where(total > 0, total, 1.0)
    return out.to(q.dtype)


def _check_meta(q: torch.Tensor, meta: torch.Tensor) -> None:
    assert q.dim() == 5 and q.shape[2] in (2, 3), "q must be [kv_heads, groups, 2 or 3 rotations, tokens, head_dim]"
    assert meta.dtype == torch.int64 and meta.dim() == 1 and meta.shape[0] in (5, 8, 9, 11) and meta.is_contiguous(), (
        "meta must be int64 [5], [8], [9] or [11]")
    assert q.shape[2] == 2 or meta.shape[0] >= 8, "a sink (third rotation) needs the 8- or 9-number meta"


@dataclass(frozen=True)
class SplitPlan:
    """How the keys and rows of one call are cut into programs; a function of shapes only."""

    block_m: int  # rows (group, token) per program, padded for tl.dot
    num_row_blocks: int
    split_keys: int  # keys per split, a multiple of BLOCK_N
    num_splits: int

    def grid(self, num_kv_heads: int) -> tuple[int, int, int]:
        """Grid of the split kernel: (split, row block, kv head)."""
        return (self.num_splits, self.num_row_blocks, num_kv_heads)


def plan_splits(num_kv_heads: int, num_groups: int, num_tokens: int, bucket: int,
                block_n: int = 64, split_keys: int | None = None) -> SplitPlan:
    """Split sizes for these shapes: enough programs to fill the GPU, each with a few key blocks.

    `split_keys` overrides the choice (tests use small splits so that a small bucket still
    has several).
    """
    num_rows = num_groups * num_tokens
    block_m = min(MAX_BLOCK_M, max(16, _next_power_of_2(num_rows)))
    num_row_blocks = -(-num_rows // block_m)
    if split_keys is None:
        multi = block_m > 16
        target, least = (TARGET_PROGRAMS_MULTI, MIN_SPLIT_KEYS_MULTI) if multi else (TARGET_PROGRAMS, MIN_SPLIT_KEYS)
        wanted = -(-bucket * num_kv_heads * num_row_blocks // target)
        split_keys = min(MAX_SPLIT_KEYS, max(least, _next_power_of_2(wanted)))
        split_keys = max(split_keys, block_n)
    if split_keys % block_n:
        raise ValueError(f"split_keys={split_keys} must be a multiple of block_n={block_n}")
    return SplitPlan(block_m, num_row_blocks, split_keys, -(-bucket // split_keys))


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), without needing Triton installed."""
    return 1 << max(n - 1, 0).bit_length()


if triton is not None:

    @triton.jit
    def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns (triton#11584); fp32 holds them exactly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=INPUT_PRECISION)

    @triton.jit
    def _span_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, meta_ptr, slots_ptr,
        part_max_ptr, part_sum_ptr, part_out_ptr,
        stride_qh, stride_qg, stride_qw, stride_qt,
        stride_kh, stride_ks, stride_vh, stride_vs, stride_slot,
        num_tokens, num_rows, num_splits, bucket, num_keys, qk_scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        SPLIT_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        LONG_META: tl.constexpr, HAS_SINK: tl.constexpr, HAS_ORIGIN: tl.constexpr, HAS_LANES: tl.constexpr,
    ):
        split = tl.program_id(0)
        row_block = tl.program_id(1)
        head = tl.program_id(2).to(tl.int64)

        prefix_end = tl.load(meta_ptr + 0)
        suffix_start = tl.load(meta_ptr + 1)
        suffix_end = tl.load(meta_ptr + 2)
        scratch_start = tl.load(meta_ptr + 4)
        prefix_start = 0
        sink_end = 0
        if LONG_META:
            prefix_start = tl.load(meta_ptr + 5)
            sink_end = tl.load(meta_ptr + 6)
        origin = tl.zeros([], tl.int64)
        if HAS_ORIGIN:
            origin = tl.load(meta_ptr + 8)
        lane_start = tl.zeros([], tl.int64)
        lanes = tl.full([], 1, tl.int64)
        if HAS_LANES:
            lane_start = tl.load(meta_ptr + 9)
            lanes = tl.maximum(tl.load(meta_ptr + 10), 1)

        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        group = (rows // num_tokens).to(tl.int64)
        token = (rows % num_tokens).to(tl.int64)
        # padding rows get slot -1: they see no scratch key and don't widen `last_slot`
        slot = tl.load(slots_ptr + token * stride_slot, mask=row_ok, other=-1)
        slot = tl.where(row_ok, slot - origin, -1)
        last_slot = tl.max(slot, axis=0)

        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        q_at = q_ptr + head * stride_qh + group[:, None] * stride_qg + token[:, None] * stride_qt + d[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_here = tl.load(q_at, mask=q_mask, other=0.0)
        q_shifted = tl.load(q_at + stride_qw, mask=q_mask, other=0.0)
        if HAS_SINK:
            q_sink = tl.load(q_at + 2 * stride_qw, mask=q_mask, other=0.0)

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

        lo = split * SPLIT_KEYS
        hi = tl.minimum(tl.minimum(lo + SPLIT_KEYS, bucket), num_keys - origin)
        k_head = k_ptr + head * stride_kh + origin * stride_ks
        v_head = v_ptr + head * stride_vh + origin * stride_vs
        for start in range(lo, hi, BLOCK_N):
            touches_suffix = (start < suffix_end) & (start + BLOCK_N > suffix_start)
            touches_scratch = (start <= last_slot) & (start + BLOCK_N > scratch_start)
            touches_prefix = (start < prefix_end) & (start + BLOCK_N > prefix_start)
            touches_sink = start < sink_end
            if touches_prefix | touches_suffix | touches_scratch | touches_sink:
                j = start + tl.arange(0, BLOCK_N)
                key_ok = j < hi
                kv_mask = key_ok[:, None] & d_ok[None, :]
                kv_at = j[:, None]  # int32: the launcher checks that a head's slots fit
                k = tl.load(k_head + kv_at * stride_ks + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_head + kv_at * stride_vs + d[None, :], mask=kv_mask, other=0.0)
                scores = _dot(q_here, tl.trans(k), INPUT_PRECISION, UPCAST_DOT)
                in_suffix = (j >= suffix_start) & (j < suffix_end)
                if touches_suffix:
                    shifted = _dot(q_shifted, tl.trans(k), INPUT_PRECISION, UPCAST_DOT)
                    scores = tl.where(in_suffix[None, :], shifted, scores)
                in_sink = j < sink_end
                if HAS_SINK:
                    if touches_sink:
                        sunk = _dot(q_sink, tl.trans(k), INPUT_PRECISION, UPCAST_DOT)
                        scores = tl.where(in_sink[None, :], sunk, scores)
                in_prefix = (j >= prefix_start) & (j < prefix_end)
                scratch = (j[None, :] >= scratch_start) & (j[None, :] <= slot[:, None])
                if HAS_LANES:
                    if lanes > 1:  # interleaved lanes (beams): only the token's own lane
                        own = (j[None, :] < lane_start) | (
                            (j[None, :] - lane_start) % lanes == (slot[:, None] - lane_start) % lanes)
                        scratch = scratch & own
                visible = (in_prefix | in_suffix | in_sink)[None, :] | scratch
                visible = visible & key_ok[None, :]
                scores = tl.where(visible, scores * qk_scale, float("-inf"))

                new_max = tl.maximum(row_max, tl.max(scores, axis=1))
                # a row with nothing visible yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescale = tl.exp2(row_max - safe_max)
                p = tl.exp2(scores - safe_max[:, None])
                row_sum = row_sum * rescale + tl.sum(p, axis=1)
                acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
                row_max = new_max

        part = (head * num_splits + split) * num_rows + rows  # [BLOCK_M] index into [KVH, splits, rows]
        tl.store(part_max_ptr + part, row_max, mask=row_ok)
        tl.store(part_sum_ptr + part, row_sum, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _span_attention_combine_kernel(
        part_max_ptr, part_sum_ptr, part_out_ptr, out_ptr,
        stride_oh, stride_og, stride_ot,
        num_tokens, num_rows, num_splits,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        first = head * num_splits * num_rows + row  # this row's partial in split 0
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM_PAD)

        # lane i folds splits i, i + BLOCK_S, ... with its own running max; then the lanes fold.
        # (BLOCK_S covers every split up to 64 of them, so this is one round of loads.)
        top = tl.full([BLOCK_S], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_S, HEAD_DIM_PAD], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s_ok = s0 + s < num_splits
            at = first + (s0 + s).to(tl.int64) * num_rows
            split_max = tl.load(part_max_ptr + at, mask=s_ok, other=float("-inf"))
            split_sum = tl.load(part_sum_ptr + at, mask=s_ok, other=0.0)
            split_out = tl.load(part_out_ptr + at[:, None] * HEAD_DIM_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
            new_top = tl.maximum(top, split_max)
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
            rescale = tl.exp2(top - safe_top)
            weight = tl.exp2(split_max - safe_top)
            total = total * rescale + weight * split_sum
            acc = acc * rescale[:, None] + weight[:, None] * split_out
            top = new_top
        top_all = tl.max(top, axis=0)
        weight = tl.exp2(top - tl.where(top_all == float("-inf"), 0.0, top_all))
        total_all = tl.sum(weight * total, axis=0)
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total_all > 0, total_all, 1.0)  # nothing seen: 0

        group = row // num_tokens
        token = row % num_tokens
        out_at = out_ptr + head * stride_oh + group * stride_og + token * stride_ot + d
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    _INTERPRETED = isinstance(_span_attention_split_kernel, InterpretedFunction)


def span_attention_triton(
    q: torch.Tensor,  # [KVH, G, R, T, D]
    keys: torch.Tensor,  # [KVH, S, D]
    values: torch.Tensor,  # [KVH, S, D]
    meta: torch.Tensor,  # int64 [5], [8], [9] or [11], on q's device
    slots: torch.Tensor,  # int64 [T], on q's device
    scale: float,
    bucket: int,
    block_n: int = 64,
    split_keys: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:  # [KVH, G, T, D], q's dtype
    """Same contract as `span_attention_ref`: split-K programs write partials, a second kernel combines.

    Reads no device value on the host, so the call can be captured in a CUDA graph.
    """
    _check_meta(q, meta)
    num_kv_heads, num_groups, rotations, num_tokens, head_dim = q.shape
    assert keys.dim() == 3 and keys.shape == values.shape, "keys, values must be [kv_heads, slots, head_dim]"
    assert keys.shape[0] == num_kv_heads and keys.shape[2] == head_dim, (
        f"keys {tuple(keys.shape)} do not match q {tuple(q.shape)}")
    assert q.dtype == keys.dtype == values.dtype, "cast q to the cache's dtype first"
    assert q.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1, "last dim must be contiguous"
    assert slots.dtype == torch.int64 and slots.shape == (num_tokens,), "slots must be int64 [tokens]"
    assert meta.device == q.device == slots.device == keys.device, "all tensors must be on one device"
    assert 1 <= bucket <= keys.shape[1], f"bucket {bucket} must be in [1, {keys.shape[1]}]"
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n must be a power of two >= 16"
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    assert head_dim_pad <= 256, f"head_dim {head_dim} is too large (at most 256)"
    assert (keys.shape[1] - 1) * max(keys.stride(1), values.stride(1)) + head_dim < 2**31, (
        "a head's slots span more than 2**31 elements; the kernel indexes them in int32")

    plan = plan_splits(num_kv_heads, num_groups, num_tokens, bucket, block_n, split_keys)
    num_rows = num_groups * num_tokens
    # workspace: each (kv head, split, row) program writes every valid row it owns, so no init
    part_max = torch.empty((num_kv_heads, plan.num_splits, num_rows), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_out = torch.empty((num_kv_heads, plan.num_splits, num_rows, head_dim_pad), dtype=torch.float32,
                           device=q.device)
    out = torch.empty((num_kv_heads, num_groups, num_tokens, head_dim), dtype=q.dtype, device=q.device)

    upcast_dot = _INTERPRETED and q.dtype == torch.bfloat16
    _span_attention_split_kernel[plan.grid(num_kv_heads)](
        q, keys, values, meta, slots,
        part_max, part_sum, part_out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), slots.stride(0),
        num_tokens, num_rows, plan.num_splits, bucket, keys.shape[1], float(scale) * math.log2(math.e),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        SPLIT_KEYS=plan.split_keys, BLOCK_M=plan.block_m, BLOCK_N=block_n,
        # fp32 is the tests' dtype: TF32 would round its inputs to 10 bits
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot, LONG_META=meta.shape[0] >= 8, HAS_SINK=rotations == 3,
        HAS_ORIGIN=meta.shape[0] >= 9, HAS_LANES=meta.shape[0] == 11,
        num_warps=num_warps or NUM_WARPS,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    block_s = min(64, triton.next_power_of_2(plan.num_splits))
    _span_attention_combine_kernel[(num_rows, num_kv_heads)](
        part_max, part_sum, part_out, out,
        out.stride(0), out.stride(1), out.stride(2),
        num_tokens, num_rows, plan.num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_S=block_s,
        num_warps=4 if block_s * head_dim_pad <= 32 * 128 else 8,
    )
    return out


def span_attention(
    q: torch.Tensor,  # [KVH, G, R, T, D]
    keys: torch.Tensor,  # [KVH, S, D]
    values: torch.Tensor,  # [KVH, S, D]
    meta: torch.Tensor,  # int64 [5], [8], [9] or [11]
    slots: torch.Tensor,  # int64 [T]
    scale: float,
    bucket: int,
) -> torch.Tensor:  # [KVH, G, T, D]
    """The split-K kernels on CUDA, the torch reference elsewhere.

    (Tests run the kernels on the CPU through TRITON_INTERPRET=1 by calling
    `span_attention_triton` directly; the interpreter is far too slow for the real path.)
    """
    if triton is not None and q.is_cuda:
        return span_attention_triton(q, keys, values, meta, slots, scale, bucket)
    return span_attention_ref(q, keys, values, meta, slots, scale, bucket)
