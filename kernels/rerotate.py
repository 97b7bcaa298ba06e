"""Move a run of KV slots by `delta` and re-rotate its keys by `delta` positions, in place.

This is PIE's suffix update: after an edit changes the length of a document by `delta`
tokens, every slot after the edit moves by `delta` and its (post-RoPE) keys are rotated by
`delta * inv_freq` in fp64 (rotate_half layout, first `rotary_dim` features); values move unchanged.

Buffers are `[layers, batch, kv_heads, capacity, head_dim]`. Source and destination overlap
(an insertion moves the suffix by a token or two), so the run's keys are first copied aside
in one parallel copy; then every (layer, batch, head, block of slots) is its own program,
which reads the copy and writes rotated keys into place. (An earlier in-place version gave
each program a whole row to walk in the safe direction: 56 programs for a 1.5B model, each
looping over thousands of slots, which left the GPU nearly idle.)

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
    half = rotary_dim // 2
    keys = k[:, :, :, start:end].to(torch.float64)
    cos, sin = cos.to(torch.float64), sin.to(torch.float64)
    x1, x2 = keys[..., :half], keys[..., half:rotary_dim]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, keys[..., rotary_dim:]), dim=-1)
    values = v[:, :, :, start:end].clone()
    k[:, :, :, start + delta : end + delta] = rotated.to(k.dtype)
    v[:, :, :, start + delta : end + delta] = values


if triton is not None:

    # Triton compiles a variant per "is this int 1 / a multiple of 16"; a run length seen for the
    # first time in such a class cost a keystroke a ~200 ms compile on the H100 (issue 9's p95)
    @triton.jit(do_not_specialize=["src_row", "count"])
    def _rerotate_kernel(
        src_ptr, dst_ptr, cos_ptr, sin_ptr,
        src_row, dst_row, stride_slot, count,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        PASS: tl.constexpr, PASS_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        src = src_ptr + row * src_row
        dst = dst_ptr + row * dst_row
        h = tl.arange(0, HALF_PAD)
        h_mask = h < HALF
        cos = tl.load(cos_ptr + h, mask=h_mask, other=1.0)[None, :]
        sin = tl.load(sin_ptr + h, mask=h_mask, other=0.0)[None, :]
        slots = block * BLOCK + tl.arange(0, BLOCK)
        s_mask = slots < count
        at = slots.to(tl.int64)[:, None] * stride_slot
        m_half = s_mask[:, None] & h_mask[None, :]
        x1 = tl.load(src + at + h[None, :], mask=m_half, other=0.0).to(tl.float64)
        x2 = tl.load(src + at + HALF + h[None, :], mask=m_half, other=0.0).to(tl.float64)
        out_dtype = dst_ptr.dtype.element_ty
        # via fp32: a direct fp64 -> bf16 conversion is not supported everywhere
        tl.store(dst + at + h[None, :], (x1 * cos - x2 * sin).to(tl.float32).to(out_dtype), mask=m_half)
        tl.store(dst + at + HALF + h[None, :], (x2 * cos + x1 * sin).to(tl.float32).to(out_dtype), mask=m_half)
        if PASS > 0:
            p = tl.arange(0, PASS_PAD)
            m_pass = s_mask[:, None] & (p < PASS)[None, :]
            kp = tl.load(src + at + 2 * HALF + p[None, :], mask=m_pass, other=0.0)
            tl.store(dst + at + 2 * HALF + p[None, :], kp, mask=m_pass)


def move_rerotate_triton(
    k: torch.Tensor, v: torch.Tensor, start: int, end: int, delta: int,
    cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, block: int = 64,
) -> None:
    """Same contract as `move_rerotate_ref`: the source run is copied aside (one parallel copy),
    then one program per (layer, batch, head, block of slots) rotates it into place."""
    if end <= start:
        return
    assert k.shape == v.shape and k.dim() == 5, "k, v must be [layers, batch, heads, slots, dim]"
    # a region of a bigger buffer (engine/kv_pool.py) is a view: rows (layer, batch, head) must be
    # evenly strided and each row's slots contiguous
    assert k.stride(4) == 1 and k.stride(3) == k.shape[4], "each row's slots must be contiguous"
    assert k.stride(1) == k.shape[2] * k.stride(2) and k.stride(0) == k.shape[1] * k.stride(1), (
        "rows must be evenly strided")
    assert 0 <= start + delta and end + delta <= k.shape[3], "move leaves the buffer"
    layers, batch, heads, slots, dim = k.shape
    count = end - start
    half = rotary_dim // 2
    source = k[:, :, :, start:end].contiguous()  # a copy: source and destination may overlap
    v[:, :, :, start + delta : end + delta] = v[:, :, :, start:end].clone()
    destination = k[:, :, :, start + delta :]
    grid = (layers * batch * heads, triton.cdiv(count, block))
    _rerotate_kernel[grid](
        source, destination, cos.to(torch.float64).contiguous(), sin.to(torch.float64).contiguous(),
        count * dim, k.stride(2), dim, count,
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
