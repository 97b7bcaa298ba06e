"""Flash-style attention of T new tokens over runs of cached keys, each seen through its own
query rotation: the attention of every eager forward (prefill chunks, long repairs, refreshes).

A forward's context is a list of spans (engine/model.py): slot ranges of KV buffers whose keys
act `shift` positions later. Keys are cached after RoPE at their slots' positions, so a shift is
applied to the query instead (rotated to position - shift: RoPE scores depend on position
differences only). Here a span is a *run*: keys and values `[B|1, KVH, S, D]`, the index of the
query rotation it is scored with, and whether it is causal (the new tokens' own keys: key i of
the run is seen by tokens i, i+1, ... only). An attention window's sink is a run with its own
rotation; the window after it is a run at rotation 0.

Every implementation computes, per query head, one softmax over the union of its visible keys,
with fp32 statistics and without materialising a `[T, S]` score matrix (except the reference):

- `segment_attention_triton` (CUDA): one program per (block of BLOCK_M tokens, batch x query
  head) walks the runs BLOCK_N keys at a time with an online softmax (base 2). The runs are
  slot ranges of one buffer (`Segment`s), so one launch covers a whole chunk's context: a
  document's window, its sink and the new tokens. Key blocks that every row of the program sees
  take no mask; only a run's last partial block and the causal diagonal do. Query heads index
  their KV head (GQA) without copying keys. The segments may differ per block of tokens
  (`plan_segments` with groups): several prefill chunks, each under its own window, in one launch.
- `segment_attention_cpu`: PyTorch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`,
  what SDPA dispatches to on the CPU; it also returns the log-sum-exp) once per run (the non-causal ones with no
  mask at all, the causal one with its own causal flag, which for a square run is ours), the
  partial outputs merged by their log-sum-exps. One call over every key with a `[T, S]` mask
  is ~40% slower there. Without the op (another torch), the blocked reference below.
- `segment_attention_torch`: the reference over blocks of queries, so that its fp32 scores stay
  within `SCORE_BUDGET` (forwards over several buffers on a GPU, devices with neither of the above).
- `segment_attention_ref`: the definition, fp32 scores over every key at once (tests).

q is `[B, H, R, T, D]` (R rotations, any strides with a contiguous last dim); the output is
`[B, T, H, D]` in q's dtype, the layout the output projection reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton is optional on CPU-only installs
    triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim; the usual flash-attention
# forward shapes for Hopper, to be checked against `bench/prefill.py --sweep` on the H100.
CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
SCORE_BUDGET = 1 << 24  # fp32 scores `segment_attention_torch` holds at once (64 MB)
MAX_SEGMENTS = 8


@dataclass(frozen=True)
class KeyRun:
    """Keys and values `[B|1, KVH, S, D]` scored with query rotation `rotation`; `causal`: key i
    is seen by tokens first_token + i, first_token + i + 1, ... only (a run of new tokens' own keys)."""

    keys: torch.Tensor
    values: torch.Tensor
    rotation: int = 0
    causal: bool = False
    first_token: int = 0


@dataclass(frozen=True)
class Segment:
    """Slots `[start, end)` of one key buffer as a run (see `KeyRun`)."""

    start: int
    end: int
    rotation: int = 0
    causal: bool = False
    first_token: int = 0

    def run(self, keys: torch.Tensor, values: torch.Tensor) -> KeyRun:
        """This segment of `keys`/`values` `[B|1, KVH, S, D]` as a run."""
        return KeyRun(keys[:, :, self.start : self.end], values[:, :, self.start : self.end],
                      self.rotation, self.causal, self.first_token)


def _check(q: torch.Tensor, runs: Sequence[KeyRun]) -> None:
    assert q.dim() == 5, "q must be [batch, heads, rotations, tokens, head_dim]"
    batch, heads, rotations, _, head_dim = q.shape
    for run in runs:
        assert run.keys.dim() == 4 and run.keys.shape == run.values.shape, "keys, values: [B|1, KVH, S, D]"
        assert run.keys.shape[0] in (1, batch) and run.keys.shape[3] == head_dim, (
            f"keys {tuple(run.keys.shape)} do not match q {tuple(q.shape)}")
        assert heads % run.keys.shape[1] == 0, "query heads must be a multiple of KV heads"
        assert 0 <= run.rotation < rotations, f"rotation {run.rotation} of {rotations}"


def segment_attention_ref(
    q: torch.Tensor,  # [B, H, R, T, D]
    runs: Sequence[KeyRun],
    scale: float,
    token_offset: int = 0,
) -> torch.Tensor:  # [B, T, H, D], q's dtype
    """The definition, in fp32: one softmax over each token's visible keys of every run.

    `token_offset`: q's tokens are tokens token_offset, token_offset + 1, ... of the forward
    (what a causal run's `first_token` counts from). A token that sees no key gets zeros.
    """
    _check(q, runs)
    batch, heads, _, num_tokens, head_dim = q.shape
    tokens = torch.arange(token_offset, token_offset + num_tokens, device=q.device)
    scores, values = [], []
    for run in runs:
        if run.keys.shape[2] == 0:
            continue
        groups = heads // run.keys.shape[1]
        keys = run.keys.float().repeat_interleave(groups, 1).expand(batch, -1, -1, -1)  # [B, H, S, D]
        part = torch.matmul(q[:, :, run.rotation].float(), keys.transpose(-1, -2)) * scale  # [B, H, T, S]
        if run.causal:
            seen = torch.arange(run.keys.shape[2], device=q.device)[None] <= tokens[:, None] - run.first_token
            part = part.masked_fill(~seen, float("-inf"))
        scores.append(part)
        values.append(run.values.float().repeat_interleave(groups, 1).expand(batch, -1, -1, -1))
    if not scores:
        return q.new_zeros(batch, num_tokens, heads, head_dim)
    scores = torch.cat(scores, dim=-1)
    top = scores.amax(dim=-1, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, torch.cat(values, dim=2)) / torch.where(total > 0, total, 1.0)
    return out.transpose(1, 2).to(q.dtype)


def segment_attention_torch(q: torch.Tensor, runs: Sequence[KeyRun], scale: float,
                            block: int | None = None) -> torch.Tensor:  # [B, T, H, D]
    """The reference over blocks of `block` tokens (default: as many as `SCORE_BUDGET` scores
    allow): fp32 scores of one block at a time."""
    batch, heads, _, num_tokens, _ = q.shape
    if block is None:
        keys = sum(run.keys.shape[2] for run in runs)
        block = max(1, SCORE_BUDGET // max(1, batch * heads * keys))
    if num_tokens <= block:
        return segment_attention_ref(q, runs, scale)
    return torch.cat([segment_attention_ref(q[:, :, :, lo : lo + block], runs, scale, token_offset=lo)
                      for lo in range(0, num_tokens, block)], dim=1)


def _cpu_flash() -> object | None:
    """PyTorch's CPU flash-attention op, which also returns the log-sum-exp (None if absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def segment_attention_cpu(q: torch.Tensor, runs: Sequence[KeyRun], scale: float) -> torch.Tensor:  # [B, T, H, D]
    """One CPU flash-attention call per run, merged by their log-sum-exps (see the module docstring)."""
    _check(q, runs)
    flash = _cpu_flash()
    runs = [run for run in runs if run.keys.shape[2] > 0]  # the op fails on zero keys
    if flash is None or not runs or any(r.causal and (r.first_token or r.keys.shape[2] > q.shape[3]) for r in runs):
        return segment_attention_torch(q, runs, scale)
    batch = q.shape[0]
    outs, lses = [], []
    for run in runs:
        keys, values = run.keys, run.values
        if keys.shape[0] != batch:
            keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        # the op's causal mask is aligned top-left: key i is seen by tokens i.. (ours)
        out, lse = flash(q[:, :, run.rotation], keys, values, 0.0, run.causal, scale=scale)
        outs.append(out)  # [B, H, T, D], laid out as [B, T, H, D]
        lses.append(lse)  # [B, H, T] fp32
    if len(outs) == 1:
        return outs[0].transpose(1, 2).to(q.dtype)
    lse = torch.stack(lses)  # [P, B, H, T]: small, the merge's passes are over the outputs
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # each run's share of the total weight
    out = outs[0].float().mul_(weights[0])  # in place on the op's own output
    for part, weight in zip(outs[1:], weights[1:], strict=True):
        out.addcmul_(part.float(), weight)
    return out.transpose(1, 2).to(q.dtype)


if triton is not None:

    @triton.jit
    def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns (triton#11584); fp32 holds them exactly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=INPUT_PRECISION)

    @triton.jit
    def _attend_block(q, k_head, v_head, lo, tokens, row_max, row_sum, acc,
                      start, last, causal_from, stride_ks, stride_vs, qk_scale, d, d_ok,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """One block of BLOCK_N keys from slot `lo` into the online softmax of the rows."""
        j = lo + tl.arange(0, BLOCK_N)
        k_at = k_head + j[:, None] * stride_ks + d[None, :]
        v_at = v_head + j[:, None] * stride_vs + d[None, :]
        if MASKED:
            key_ok = j < last
            k = tl.load(k_at, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_at, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:  # the hot loop: whole blocks, no mask at all
            k = tl.load(k_at)
            v = tl.load(v_at)
        else:
            k = tl.load(k_at, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_at, mask=d_ok[None, :], other=0.0)
        scores = _dot(q, tl.trans(k), INPUT_PRECISION, UPCAST_DOT) * qk_scale
        if MASKED:
            seen = key_ok[None, :] & ((causal_from < 0) | ((j - start)[None, :] <= (tokens - causal_from)[:, None]))
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            # a row that has seen nothing yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
            new_max_safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        else:
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            new_max_safe = new_max
        rescale = tl.exp2(row_max - new_max_safe)
        p = tl.exp2(scores - new_max_safe[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
        return new_max, row_sum, acc

    @triton.jit
    def _segment_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, seg_ptr, stride_seg,
        stride_qb, stride_qh, stride_qr, stride_qt,
        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_ot, stride_oh,
        num_tokens, num_heads, qk_scale,
        GROUPS: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        # the last token blocks (most keys under a causal run) start first
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // num_heads
        h = bh % num_heads
        first = m_block * BLOCK_M
        tokens = first + tl.arange(0, BLOCK_M)
        t_ok = tokens < num_tokens
        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        q_at = q_ptr + b * stride_qb + h * stride_qh + tokens[:, None].to(tl.int64) * stride_qt + d[None, :]
        q_mask = t_ok[:, None] & d_ok[None, :]
        k_head = k_ptr + b * stride_kb + (h // GROUPS) * stride_kh
        v_head = v_ptr + b * stride_vb + (h // GROUPS) * stride_vh

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        segs = seg_ptr + m_block * stride_seg  # this token block's segments (stride 0: every block's)
        for s in tl.static_range(NUM_SEGMENTS):
            start = tl.load(segs + 4 * s)
            end = tl.load(segs + 4 * s + 1)
            rotation = tl.load(segs + 4 * s + 2)
            causal_from = tl.load(segs + 4 * s + 3)  # a causal run's first token, or -1
            causal = (causal_from >= 0).to(tl.int32)
            q = tl.load(q_at + rotation * stride_qr, mask=q_mask, other=0.0)
            # keys every row of this block sees (no mask), then the rest up to `last` (masked):
            # a causal run's diagonal block(s), or a run's partial last block
            seen_by_all = start + first - causal_from
            bulk_end = causal * seen_by_all + (1 - causal) * (start + (end - start) // BLOCK_N * BLOCK_N)
            last = causal * tl.minimum(end, seen_by_all + BLOCK_M) + (1 - causal) * end
            bulk_end = tl.minimum(tl.maximum(bulk_end, start), end)
            last = tl.maximum(last, bulk_end)
            for lo in range(start, bulk_end, BLOCK_N):
                row_max, row_sum, acc = _attend_block(
                    q, k_head, v_head, lo, tokens, row_max, row_sum, acc, start, last, causal_from,
                    stride_ks, stride_vs, qk_scale, d, d_ok,
                    BLOCK_N=BLOCK_N, MASKED=False, EVEN_D=EVEN_D,
                    INPUT_PRECISION=INPUT_PRECISION, UPCAST_DOT=UPCAST_DOT)
            for lo in range(bulk_end, last, BLOCK_N):
                row_max, row_sum, acc = _attend_block(
                    q, k_head, v_head, lo, tokens, row_max, row_sum, acc, start, last, causal_from,
                    stride_ks, stride_vs, qk_scale, d, d_ok,
                    BLOCK_N=BLOCK_N, MASKED=True, EVEN_D=EVEN_D,
                    INPUT_PRECISION=INPUT_PRECISION, UPCAST_DOT=UPCAST_DOT)

        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # a row that saw nothing: zeros
        out_at = out_ptr + b * stride_ob + tokens[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :]
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=q_mask)

    _INTERPRETED = isinstance(_segment_attention_kernel, InterpretedFunction)


def config_for(head_dim: int, num_tokens: int = 1 << 20) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim (padded to a power of two); a few
    tokens (an eager decode step) take a block of 16-64 rows instead of 128 mostly empty ones."""
    padded = max(16, 1 << (head_dim - 1).bit_length())
    block_m, block_n, num_warps, num_stages = CONFIGS[min(max(padded, 64), 256)]
    if num_tokens < block_m:
        block_m = max(16, 1 << (num_tokens - 1).bit_length())
        block_n = min(block_n, block_m) if block_m < 64 else block_n
        block_m = max(block_m, block_n)
        num_warps = 4
    return block_m, block_n, num_warps, num_stages


@dataclass(frozen=True)
class SegmentPlan:
    """Segments as the kernel reads them, for one forward's T tokens: an int32 table
    `[blocks | 1, NUM_SEGMENTS, 4]` (start, end, rotation, a causal run's first token or -1)
    on the device, one row of segments per block of BLOCK_M tokens (or one for all), and the
    launch config. Built once per forward and shared by its layers."""

    table: torch.Tensor
    config: tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    num_tokens: int
    slots: int  # past the last slot any segment names


def plan_segments(
    segments: Sequence[Segment] | Sequence[Sequence[Segment]],
    num_tokens: int,
    head_dim: int,
    device: torch.device | str,
    *,
    group_tokens: Sequence[int] | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> SegmentPlan:
    """The table for `segments` (every token's), or with `group_tokens` one list of segments
    per group of consecutive tokens (groups of whole BLOCK_M blocks but the last): a forward
    that is several prefill chunks at once, each with its own window and sink.

    Copied without making the host wait for the device (a pinned staging buffer on CUDA)."""
    config = config or config_for(head_dim, num_tokens)
    block_m, block_n = config[0], config[1]
    assert block_m % block_n == 0, "BLOCK_M must be a multiple of BLOCK_N (causal blocks start on one)"
    if group_tokens is None:
        groups, group_tokens = [list(segments)], [num_tokens]
    else:
        groups = [list(g) for g in segments]
        assert len(groups) == len(group_tokens) and sum(group_tokens) == num_tokens, "one group per token range"
        assert all(n % block_m == 0 for n in group_tokens[:-1]), f"groups must be whole blocks of {block_m} tokens"
    width = max(len(g) for g in groups)
    assert 1 <= width <= MAX_SEGMENTS, f"1 to {MAX_SEGMENTS} segments, not {width}"
    rows, first = [], 0
    for group, count in zip(groups, group_tokens, strict=True):
        row = []
        for seg in group:
            assert 0 <= seg.start <= seg.end, f"segment {seg}"
            if seg.causal:
                assert first <= seg.first_token and seg.first_token + seg.end - seg.start <= first + count, (
                    "a causal segment holds keys of its own group's tokens")
                assert (seg.first_token - first) % block_m == 0 or len(groups) == 1, "causal runs start on a block"
            row.append([seg.start, seg.end, seg.rotation, seg.first_token if seg.causal else -1])
        row += [[0, 0, 0, -1]] * (width - len(row))
        rows += [row] * (1 if len(groups) == 1 else -(-count // block_m))
        first += count
    host = torch.tensor(rows, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
    slots = max(seg.end for group in groups for seg in group)
    return SegmentPlan(host.to(device, non_blocking=True), config, num_tokens, slots)


def segment_attention_triton(
    q: torch.Tensor,  # [B, H, R, T, D]
    keys: torch.Tensor,  # [B|1, KVH, S, D]: one buffer (a layer's slots)
    values: torch.Tensor,  # [B|1, KVH, S, D]
    segments: Sequence[Segment] | SegmentPlan,
    scale: float,
    *,
    config: tuple[int, int, int, int] | None = None,  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
) -> torch.Tensor:  # [B, T, H, D], q's dtype
    """Same contract as `segment_attention_ref` over `segment.run(keys, values)` of each segment,
    or per group of tokens with a `SegmentPlan` (which a forward builds once for its layers)."""
    batch, heads, _, num_tokens, head_dim = q.shape
    if not isinstance(segments, SegmentPlan):
        _check(q, [s.run(keys, values) for s in segments])
        segments = plan_segments(segments, num_tokens, head_dim, q.device, config=config)
    plan = segments
    assert plan.num_tokens == num_tokens, "the plan is for another token count"
    assert plan.slots <= keys.shape[2], f"segments reach slot {plan.slots}, past the {keys.shape[2]} there are"
    assert q.dtype == keys.dtype == values.dtype, "cast q to the cache's dtype first"
    assert q.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1, "last dim must be contiguous"
    assert keys.shape[0] in (1, batch) and heads % keys.shape[1] == 0 and keys.shape[3] == head_dim
    assert (keys.shape[2] - 1) * max(keys.stride(2), values.stride(2)) + head_dim < 2**31, (
        "a head's slots span more than 2**31 elements; the kernel indexes them in int32")
    block_m, block_n, num_warps, num_stages = plan.config
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty((batch, num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    upcast_dot = _INTERPRETED and q.dtype == torch.bfloat16
    grid = (triton.cdiv(num_tokens, block_m), batch * heads)
    table = plan.table
    _segment_attention_kernel[grid](
        q, keys, values, out, table, table.stride(0) if table.shape[0] > 1 else 0,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        keys.stride(0) if keys.shape[0] > 1 else 0, keys.stride(1), keys.stride(2),
        values.stride(0) if values.shape[0] > 1 else 0, values.stride(1), values.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_tokens, heads, float(scale) * math.log2(math.e),
        GROUPS=heads // keys.shape[1], NUM_SEGMENTS=table.shape[1],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, EVEN_D=head_dim == head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        # fp32 is the tests' dtype: TF32 would round its inputs to 10 bits
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def segment_attention_groups(
    q: torch.Tensor,  # [B, H, R, T, D]
    keys: torch.Tensor,  # [B|1, KVH, S, D]
    values: torch.Tensor,  # [B|1, KVH, S, D]
    segments: Sequence[Sequence[Segment]],
    group_tokens: Sequence[int],
    scale: float,
) -> torch.Tensor:  # [B, T, H, D]
    """Groups of consecutive tokens, each over its own segments (`plan_segments`' groups), by
    `segment_attention` once per group: what the flash kernel does in one launch."""
    batch, heads, _, num_tokens, head_dim = q.shape
    out = torch.empty((batch, num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    first = 0
    for group, count in zip(segments, group_tokens, strict=True):
        runs = [KeyRun(keys[:, :, s.start : s.end], values[:, :, s.start : s.end], s.rotation, s.causal,
                       s.first_token - first) for s in group]
        out[:, first : first + count] = segment_attention(q[:, :, :, first : first + count], runs, scale)
        first += count
    return out


def segment_attention(q: torch.Tensor, runs: Sequence[KeyRun], scale: float) -> torch.Tensor:  # [B, T, H, D]
    """Runs of any buffers: the CPU flash path on the CPU, the blocked reference elsewhere.

    (A CUDA caller whose runs are slots of one buffer calls `segment_attention_triton`.)
    """
    if q.device.type == "cpu":
        return segment_attention_cpu(q, runs, scale)
    return segment_attention_torch(q, runs, scale)
