"""Small fused kernels for batch-1 forwards: residual add + RMSNorm, SwiGLU's silu * up, and
RoPE on the fused q/k/v projection (queries at the tokens' positions and at shifted ones) with the
new keys and values written into the cache.

A decode step of a 28-layer model at batch 1 is a chain of ~1,500 tiny kernels when every
elementwise op is its own launch (RMSNorm alone is seven: cast, square, mean, add, rsqrt,
multiply, scale). Inside a CUDA graph there is no host overhead left, but each kernel still
costs the GPU a few microseconds to start and drain, which at this size is more than the
math. These kernels do one row per program, in one pass, with the same rounding steps as
the modules they replace (engine/model.py: RMSNorm computes in fp32, casts, then scales by
its weight in the model's dtype; silu and the product round to the model's dtype).

`*_ref` are the torch definitions; the public functions take Triton on CUDA and the
references elsewhere (tests run the kernels on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only installs
    triton = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """Rotate the first `rotary_dim` features of `x` in fp32; cos/sin broadcast against x."""
    dtype = x.dtype
    x_rot = x[..., :rotary_dim].to(torch.float32)
    out = x_rot * cos + rotate_half(x_rot) * sin
    if rotary_dim == x.shape[-1]:
        return out.to(dtype)
    return torch.cat((out.to(dtype), x[..., rotary_dim:]), dim=-1)


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, weight * rmsnorm(x + delta)) over the last dimension; delta may be None."""
    total = x if delta is None else x + delta
    x32 = total.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * normed.to(total.dtype)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for `gate_up` = [..., 2 * I] holding gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place on silu's own output: one fresh tensor, not two


def rope_write_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, num_heads: int,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rotate the queries R times and the keys once; write keys and values to the cache slots.

    `qkv` `[T, (H + 2 * KVH) * D]`; cos/sin `[R, T, rotary_dim]` fp32: row 0 at the tokens'
    positions (queries and keys), rows 1.. at shifted positions (queries only: the FIM view's
    suffix, an attention window's sink). `k_cache` and `v_cache` are one layer's
    `[KVH, capacity, D]`. Returns the queries `[KVH, G, R, T, D]` in the cache's dtype: row
    (g, r, t) rotated by cos/sin row r.
    """
    kv_heads, _, dim = k_cache.shape
    count = qkv.shape[0]
    rotations = cos.shape[0]
    q, k, v = qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = q.reshape(count, num_heads, dim).transpose(0, 1)[:, None].expand(num_heads, rotations, count, dim)
    q = apply_rotary(q, cos[None], sin[None], rotary_dim)  # [H, R, T, D]
    k = apply_rotary(k.reshape(count, kv_heads, dim).transpose(0, 1), cos[0], sin[0], rotary_dim)
    k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v.reshape(count, kv_heads, dim).transpose(0, 1).to(v_cache.dtype))
    return q.reshape(kv_heads, num_heads // kv_heads, rotations, count, dim).to(k_cache.dtype).contiguous()


def rope_write_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, num_heads: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`rope_write_ref`'s contract in fewer passes (the CPU's path, where every pass over a fresh
    tensor counts): x * cos + rotate_half(x) * sin as x * cos + roll(x) * (sin with its first
    half negated), the second product accumulated in place."""
    kv_heads, _, dim = k_cache.shape
    count = qkv.shape[0]
    rotations = cos.shape[0]
    half = rotary_dim // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # [R, T, rd]
    q, k, v = qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], -1)

    def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        x_rot = x[..., :rotary_dim].to(torch.float32)
        out = (x_rot * cos).addcmul_(x_rot.roll(half, -1), signed)
        if rotary_dim == dim:
            return out.to(x.dtype)
        return torch.cat((out.to(x.dtype), x[..., rotary_dim:].expand(*out.shape[:-1], -1)), dim=-1)

    q = rotate(q.reshape(count, num_heads, dim).transpose(0, 1)[:, None], cos[None], signed[None])  # [H, R, T, D]
    k = rotate(k.reshape(count, kv_heads, dim).transpose(0, 1), cos[0], signed[0])
    k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v.reshape(count, kv_heads, dim).transpose(0, 1).to(v_cache.dtype))
    return q.view(kv_heads, num_heads // kv_heads, rotations, count, dim).to(k_cache.dtype)


if triton is not None:

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slots_ptr, q_out_ptr,
                           qkv_stride, count, rd, cache_head_stride, cache_slot_stride,
                           NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                           HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, ROTATIONS: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads (which also copy v)
        half = rd // 2
        h = tl.arange(0, HALF_PAD)
        h_mask = h < half
        d = tl.arange(0, DIM_PAD)
        row = qkv_ptr + t.to(tl.int64) * qkv_stride
        dtype = k_ptr.dtype.element_ty
        if head < NUM_HEADS:
            src = row + head * DIM
            x1 = tl.load(src + h, mask=h_mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + half + h, mask=h_mask, other=0.0).to(tl.float32)
            rest_mask = (d >= rd) & (d < DIM)
            rest = tl.load(src + d, mask=rest_mask, other=0.0)
            kv = head // (NUM_HEADS // KV_HEADS)
            g = head % (NUM_HEADS // KV_HEADS)
            for which in tl.static_range(ROTATIONS):
                c = tl.load(cos_ptr + (which * count + t) * rd + h, mask=h_mask, other=1.0)
                s = tl.load(sin_ptr + (which * count + t) * rd + h, mask=h_mask, other=0.0)
                # [KVH, G, R, T, D] contiguous
                dst = q_out_ptr + ((((kv * (NUM_HEADS // KV_HEADS) + g) * ROTATIONS + which) * count + t) * DIM)
                tl.store(dst + h, (x1 * c - x2 * s).to(dtype), mask=h_mask)
                tl.store(dst + half + h, (x2 * c + x1 * s).to(dtype), mask=h_mask)
                tl.store(dst + d, rest.to(dtype), mask=rest_mask)
        else:
            kv = head - NUM_HEADS
            src = row + (NUM_HEADS + kv) * DIM
            x1 = tl.load(src + h, mask=h_mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + half + h, mask=h_mask, other=0.0).to(tl.float32)
            rest_mask = (d >= rd) & (d < DIM)
            rest = tl.load(src + d, mask=rest_mask, other=0.0)
            c = tl.load(cos_ptr + t * rd + h, mask=h_mask, other=1.0)
            s = tl.load(sin_ptr + t * rd + h, mask=h_mask, other=0.0)
            slot = tl.load(slots_ptr + t)
            dst = k_ptr + kv * cache_head_stride + slot * cache_slot_stride
            # rounded to the projection's dtype first, as apply_rotary returns it
            out1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
            out2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
            tl.store(dst + h, out1.to(dtype), mask=h_mask)
            tl.store(dst + half + h, out2.to(dtype), mask=h_mask)
            tl.store(dst + d, rest.to(dtype), mask=rest_mask)
            v_src = row + (NUM_HEADS + KV_HEADS + kv) * DIM
            d_mask = d < DIM
            vals = tl.load(v_src + d, mask=d_mask, other=0.0)
            tl.store(v_ptr + kv * cache_head_stride + slot * cache_slot_stride + d, vals.to(dtype), mask=d_mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, stride, dim, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        dtype = x_ptr.dtype.element_ty
        # arithmetic in fp32, rounded where torch rounds (bf16 ops compute in fp32 and round)
        x32 = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x32 = x32 + tl.load(delta_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            total = x32.to(dtype)
            tl.store(sum_ptr + row * dim + cols, total, mask=mask)
            x32 = total.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
        normed = (x32 * rstd).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inner
        g = tl.load(gu_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride + inner + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * inner + cols, (silu * u).to(dtype), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `add_rms_norm_ref`; rows of the last dimension, one program each."""
    shape = x.shape
    dim = shape[-1]
    rows = x.reshape(-1, dim)
    assert rows.stride(-1) == 1, "rows must be contiguous"
    deltas = rows if delta is None else delta.reshape(-1, dim)
    assert deltas.stride(0) == rows.stride(0)
    total = rows if delta is None else torch.empty_like(rows)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _add_rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, total, out, rows.stride(0), dim, eps,
                                           HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(dim))
    return total.view(shape), out.view(shape)


def silu_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Same contract as `silu_mul_ref`."""
    shape = gate_up.shape
    inner = shape[-1] // 2
    rows = gate_up.reshape(-1, shape[-1])
    assert rows.stride(-1) == 1
    out = torch.empty((rows.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](rows, out, rows.stride(0), inner, BLOCK=block)
    return out.view(*shape[:-1], inner)


def rope_write_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, num_heads: int,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as `rope_write_ref`; one program per (token, head)."""
    kv_heads, _, dim = k_cache.shape
    count = qkv.shape[0]
    assert qkv.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    rotations = cos.shape[0]
    q_out = torch.empty((kv_heads, num_heads // kv_heads, rotations, count, dim), dtype=k_cache.dtype,
                        device=qkv.device)
    _rope_write_kernel[(count, num_heads + kv_heads)](
        qkv, cos, sin, k_cache, v_cache, slots, q_out,
        qkv.stride(0), count, rotary_dim, k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, KV_HEADS=kv_heads, DIM=dim,
        HALF_PAD=triton.next_power_of_2(max(rotary_dim // 2, 1)), DIM_PAD=triton.next_power_of_2(dim),
        ROTATIONS=rotations,
    )
    return q_out


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, num_heads: int,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The kernel on CUDA, `rope_write_torch` elsewhere."""
    if triton is not None and qkv.is_cuda:
        return rope_write_triton(qkv, cos, sin, rotary_dim, num_heads, k_cache, v_cache, slots)
    return rope_write_torch(qkv, cos, sin, rotary_dim, num_heads, k_cache, v_cache, slots)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on CUDA, the reference elsewhere."""
    if triton is not None and x.is_cuda:
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The kernel on CUDA, the reference elsewhere."""
    if triton is not None and gate_up.is_cuda:
        return silu_mul_triton(gate_up)
    return silu_mul_ref(gate_up)
