"""Move a run of KV slots by `delta` and re-rotate its keys by `delta` positions, in place.

This is PIE's suffix update: after an edit changes the length of a document by `delta`
tokens, every slot after the edit moves by `delta` and its (post-RoPE) keys are rotated by
`delta * inv_freq` in fp64 (rotate_half layout, first `rotary_dim` features); values move unchanged.

Buffers are `[layers, batch, kv_heads, capacity, head_dim]`. Source and destination overlap,
so the kernel gives each program one (layer, batch, head) row and walks its slots in the safe
direction (from the end when moving right, from the start when moving left), a block of
slots at a time with a barrier between the block's loads and stores. Rows never overlap, so
programs need no coordination.

`move_rerotate_ref` is the pure-torch reference; `move_rerotate` picks the Triton kernel on
CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only installs
    triton = None


def move_rerotate_ref(
    k: torch.Tensor,  # [L, B, H, S, D]
    v: torch.Tensor,  # [L, B, H, S, D]
    start: int,
    end: int,
    delta: int,
    cos: torch.Tensor,  # [rotary_dim // 2] fp64, cos(delta * inv_freq)
    sin: torch.Tensor,  # [rotary_dim // 2] fp64
    rotary_dim: int,
) -> None:
    """Slots `[start, end)` -> `[start + delta, end + delta)`, keys rotated; in place."""
    if end <= start:
        return
    rotated = rerotate_ref(k[:, :, :, start:end], cos, sin, rotary_dim)
    values = v[:, :, :, start:end].clone()
    k[:, :, :, start + delta : end + delta] = rotated
    v[:, :, :, start + delta : end + delta] = values


def rerotate_ref(
    keys: torch.Tensor,  # [..., head_dim], post-RoPE
    cos: torch.Tensor,  # [rotary_dim // 2] fp64
    sin: torch.Tensor,  # [rotary_dim // 2] fp64
    rotary_dim: int,
) -> torch.Tensor:
    """`keys` rotated further by the angles of `cos`/`sin` (fp64 math), in the keys' dtype."""
    half = rotary_dim // 2
    x = keys.to(torch.float64)
    cos, sin = cos.to(torch.float64), sin.to(torch.float64)
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]), dim=-1)
    return out.to(keys.dtype)


if triton is not None:

    @triton.jit
    def _move_rerotate_kernel(
        k_ptr, v_ptr, cos_ptr, sin_ptr,
        stride_row, stride_slot,
        start, end, delta,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        PASS: tl.constexpr, PASS_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        k_row = k_ptr + row * stride_row
        v_row = v_ptr + row * stride_row
        h = tl.arange(0, HALF_PAD)
        h_mask = h < HALF
        cos = tl.load(cos_ptr + h, mask=h_mask, other=1.0)[None, :]
        sin = tl.load(sin_ptr + h, mask=h_mask, other=0.0)[None, :]
        p = tl.arange(0, PASS_PAD)
        p_mask = p < PASS
        count = end - start
        num_blocks = tl.cdiv(count, BLOCK)
        for i in range(0, num_blocks):
            # Moving right: walk blocks from the end so no source is overwritten before read.
            b = tl.where(delta > 0, num_blocks - 1 - i, i)
            slots = start + b * BLOCK + tl.arange(0, BLOCK)
            s_mask = slots < end
            src = slots.to(tl.int64)[:, None] * stride_slot
            dst = (slots + delta).to(tl.int64)[:, None] * stride_slot
            m_half = s_mask[:, None] & h_mask[None, :]
            x1 = tl.load(k_row + src + h[None, :], mask=m_half, other=0.0).to(tl.float64)
            x2 = tl.load(k_row + src + HALF + h[None, :], mask=m_half, other=0.0).to(tl.float64)
            v1 = tl.load(v_row + src + h[None, :], mask=m_half, other=0.0)
            v2 = tl.load(v_row + src + HALF + h[None, :], mask=m_half, other=0.0)
            if PASS > 0:
                m_pass = s_mask[:, None] & p_mask[None, :]
                kp = tl.load(k_row + src + 2 * HALF + p[None, :], mask=m_pass, other=0.0)
                vp = tl.load(v_row + src + 2 * HALF + p[None, :], mask=m_pass, other=0.0)
            tl.debug_barrier()  # every load of this block happens before any store
            out_dtype = k_ptr.dtype.element_ty
            # via fp32: a direct fp64 -> bf16 conversion is not supported everywhere
            out1 = (x1 * cos - x2 * sin).to(tl.float32).to(out_dtype)
            out2 = (x2 * cos + x1 * sin).to(tl.float32).to(out_dtype)
            tl.store(k_row + dst + h[None, :], out1, mask=m_half)
            tl.store(k_row + dst + HALF + h[None, :], out2, mask=m_half)
            tl.store(v_row + dst + h[None, :], v1, mask=m_half)
            tl.store(v_row + dst + HALF + h[None, :], v2, mask=m_half)
            if PASS > 0:
                tl.store(k_row + dst + 2 * HALF + p[None, :], kp, mask=m_pass)
                tl.store(v_row + dst + 2 * HALF + p[None, :], vp, mask=m_pass)
            tl.debug_barrier()  # and every store before the next block's loads


def move_rerotate_triton(
    k: torch.Tensor, v: torch.Tensor, start: int, end: int, delta: int,
    cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, block: int = 32,
) -> None:
    """Launch the fused kernel; same contract as `move_rerotate_ref`."""
    if end <= start:
        return
    assert k.shape == v.shape and k.dim() == 5, "k, v must be [layers, batch, heads, slots, dim]"
    assert k.is_contiguous() and v.is_contiguous(), "KV buffers must be contiguous"
    assert 0 <= start + delta and end + delta <= k.shape[3], "move leaves the buffer"
    layers, batch, heads, slots, dim = k.shape
    half = rotary_dim // 2
    rows = layers * batch * heads
    _move_rerotate_kernel[(rows,)](
        k, v, cos.to(torch.float64).contiguous(), sin.to(torch.float64).contiguous(),
        slots * dim, dim,
        start, end, delta,
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        PASS=dim - rotary_dim, PASS_PAD=max(triton.next_power_of_2(max(dim - rotary_dim, 1)), 1),
        BLOCK=block,
    )


def move_rerotate(
    k: torch.Tensor, v: torch.Tensor, start: int, end: int, delta: int,
    cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
) -> None:
    """The fused kernel on CUDA, the torch reference elsewhere.

    (Tests run the kernel on the CPU through TRITON_INTERPRET=1 by calling
    `move_rerotate_triton` directly; the interpreter is far too slow for the real path.)
    """
    if triton is not None and k.is_cuda:
        move_rerotate_triton(k, v, start, end, delta, cos, sin, rotary_dim)
    else:
        move_rerotate_ref(k, v, start, end, delta, cos, sin, rotary_dim)
