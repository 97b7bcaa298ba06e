"""Fused residual+RMSNorm and silu*up kernels vs their torch definitions and the model's modules."""


import pytest
import torch
import torch.nn.functional as F
from editkv.engine.model import RMSNorm
from editkv.kernels.fused import (
    add_rms_norm_ref,
    add_rms_norm_triton,
    rope_write_ref,
    rope_write_torch,
    rope_write_triton,
    silu_mul_ref,
    silu_mul_triton,
)
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE


def test_reference_norm_is_the_module():
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(48) * 0.3)
    x, delta = torch.randn(3, 48), torch.randn(3, 48)
    total, out = add_rms_norm_ref(x, delta, norm.weight.detach(), 1e-6)
    torch.testing.assert_close(total, x + delta)
    torch.testing.assert_close(out, norm(x + delta).detach())


def test_reference_silu_mul_is_swiglu():
    g, u = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    torch.testing.assert_close(silu_mul_ref(torch.cat((g, u), dim=-1)), F.silu(g) * u)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 80, 1536])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_kernel(dtype, dim, with_delta):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, 5, dim, generator=g, device=DEVICE).to(dtype)
    delta = torch.randn(1, 5, dim, generator=g, device=DEVICE).to(dtype) if with_delta else None
    weight = (1 + 0.2 * torch.randn(dim, generator=g, device=DEVICE)).to(dtype)
    want_total, want = add_rms_norm_ref(x, delta, weight, 1e-5)
    total, out = add_rms_norm_triton(x, delta, weight, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: an ulp from another summation order
    torch.testing.assert_close(total, want_total, atol=tol, rtol=tol)
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    assert out.dtype == want.dtype and out.shape == x.shape


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inner", [96, 1000])
def test_silu_mul_kernel(dtype, inner):
    g = torch.Generator(device=DEVICE).manual_seed(2)
    gate_up = (3 * torch.randn(1, 3, 2 * inner, generator=g, device=DEVICE)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: a few units in the last place
    torch.testing.assert_close(silu_mul_triton(gate_up, block=64), silu_mul_ref(gate_up), atol=tol, rtol=tol)


def test_rope_write_reference_is_the_model_attention_rotation():
    from editkv.engine.config import ModelConfig
    from editkv.engine.rope import Rotary, apply_rotary

    config = ModelConfig(family="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, partial_rotary_factor=0.5)
    rotary = Rotary(config)
    positions = torch.tensor([5, 6, 7])
    cos, sin = rotary.cos_sin(torch.stack((positions, positions - 3)))
    qkv = torch.randn(3, (4 + 2 * 2) * 16)
    k_cache, v_cache = torch.zeros(2, 10, 16), torch.zeros(2, 10, 16)
    q = rope_write_ref(qkv, cos, sin, config.rotary_dim, 4, k_cache, v_cache, torch.tensor([2, 3, 4]))
    q_heads = qkv[:, :64].reshape(3, 4, 16).transpose(0, 1)
    want_q1 = apply_rotary(q_heads, cos[1], sin[1], config.rotary_dim)  # head 3 = kv head 1, group 1
    torch.testing.assert_close(q[1, 1, 1], want_q1[3])
    want_k = apply_rotary(qkv[:, 64:96].reshape(3, 2, 16).transpose(0, 1), cos[0], sin[0], config.rotary_dim)
    torch.testing.assert_close(k_cache[:, 2:5], want_k)
    torch.testing.assert_close(v_cache[:, 2:5], qkv[:, 96:].reshape(3, 2, 16).transpose(0, 1))
    assert not k_cache[:, 5:].any() and not k_cache[:, :2].any()


ROPE_SHAPES = [(4, 2, 16, 16, 2), (6, 2, 32, 16, 3), (4, 4, 24, 24, 3), (4, 2, 16, 16, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "rotary_dim", "rotations"), ROPE_SHAPES)
def test_rope_write_torch_matches_reference(dtype, heads, kv_heads, dim, rotary_dim, rotations):
    """The CPU's path (roll and signed sin, accumulated in place) against the definition."""
    g = torch.Generator().manual_seed(4)
    count = 5
    qkv = torch.randn(count, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    angles = torch.rand(rotations, count, rotary_dim // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    caches = [torch.zeros(2, kv_heads, 12, dim, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([7, 8, 9, 10, 11])
    want = rope_write_ref(qkv, cos, sin, rotary_dim, heads, caches[0][0], caches[0][1], slots)
    got = rope_write_torch(qkv, cos, sin, rotary_dim, heads, caches[1][0], caches[1][1], slots)
    assert got.shape == want.shape == (kv_heads, heads // kv_heads, rotations, count, dim) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(caches[1], caches[0], atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "rotary_dim", "rotations"), ROPE_SHAPES[:3])
def test_rope_write_kernel(dtype, heads, kv_heads, dim, rotary_dim, rotations):
    g = torch.Generator(device=DEVICE).manual_seed(3)
    count = 3
    qkv = torch.randn(count, (heads + 2 * kv_heads) * dim, generator=g, device=DEVICE).to(dtype)
    angles = torch.rand(rotations, count, rotary_dim // 2, generator=g, device=DEVICE) * 6
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos(), angles.sin()
    big = torch.zeros(2, 1, kv_heads, 12, dim, device=DEVICE, dtype=dtype)  # [L, B, KVH, CAP, D]
    want_big = big.clone()
    slots = torch.tensor([4, 5, 6], device=DEVICE)
    # keys into layer 1's buffer, values into layer 0's: strided views of one cache tensor
    want = rope_write_ref(qkv, cos, sin, rotary_dim, heads, want_big[1, 0], want_big[0, 0], slots)
    got = rope_write_triton(qkv, cos, sin, rotary_dim, heads, big[1, 0], big[0, 0], slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(big, want_big, atol=tol, rtol=tol)
