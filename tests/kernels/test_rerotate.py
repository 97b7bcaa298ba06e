"""Fused move + re-rotate kernel vs the torch reference, and the reference vs RoPE itself."""


import pytest
import torch
from editkv.engine.config import ModelConfig
from editkv.engine.rope import Rotary, apply_rotary
from editkv.kernels.rerotate import move_rerotate_ref, move_rerotate_triton
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def _config(head_dim, rotary_factor=1.0):
    return ModelConfig(family="llama", vocab_size=10, hidden_size=head_dim * 2, intermediate_size=8,
                       num_layers=2, num_heads=2, num_kv_heads=2, head_dim=head_dim,
                       partial_rotary_factor=rotary_factor)


def _first_mismatch(a, b, atol, rtol):
    bad = ~torch.isclose(a.float(), b.float(), atol=atol, rtol=rtol)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return f"first mismatch at {idx}: {a[idx].item()} vs {b[idx].item()}"
    return None


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("slots", "start", "end", "delta"), [
    (50, 10, 40, 3),     # insert: move right by less than a block
    (50, 10, 40, -7),    # delete: move left
    (200, 5, 150, 45),   # move right by more than a block, many blocks
    (200, 60, 190, -60),
    (40, 0, 33, 1),
])
@pytest.mark.parametrize(("head_dim", "rotary_factor"), [(64, 1.0), (24, 0.5), (80, 1.0)])
def test_kernel_matches_reference(dtype, slots, start, end, delta, head_dim, rotary_factor):
    config = _config(head_dim, rotary_factor)
    rotary = Rotary(config, DEVICE)
    cos, sin = rotary.delta_cos_sin(delta)
    half = config.rotary_dim // 2
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (2, 1, 3, slots, head_dim)
    k = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    v = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    k_ref, v_ref = k.clone(), v.clone()
    move_rerotate_ref(k_ref, v_ref, start, end, delta, cos[:half], sin[:half], config.rotary_dim)
    move_rerotate_triton(k, v, start, end, delta, cos[:half], sin[:half], config.rotary_dim)
    atol, rtol = TOLERANCES[dtype]
    assert (msg := _first_mismatch(k, k_ref, atol, rtol)) is None, msg
    assert torch.equal(v, v_ref)


def test_reference_rotation_equals_encoding_at_the_new_position():
    """R(delta) applied to a key rotated at p equals the key rotated at p + delta."""
    config = _config(64, 0.5)
    rotary = Rotary(config)
    raw = torch.randn(1, 1, 2, 30, 64)
    positions = torch.arange(30)
    cos, sin = rotary.cos_sin(positions[None])
    k = apply_rotary(raw[0], cos[:, None], sin[:, None], config.rotary_dim)[None]
    v = torch.randn_like(k)
    k_buf = torch.zeros(1, 1, 2, 40, 64)
    v_buf = torch.zeros_like(k_buf)
    k_buf[:, :, :, :30], v_buf[:, :, :, :30] = k, v
    delta = 7
    dcos, dsin = rotary.delta_cos_sin(delta)
    move_rerotate_ref(k_buf, v_buf, 0, 30, delta, dcos[:16], dsin[:16], config.rotary_dim)
    cos2, sin2 = rotary.cos_sin(positions[None] + delta)
    want = apply_rotary(raw[0], cos2[:, None], sin2[:, None], config.rotary_dim)[None]
    assert torch.allclose(k_buf[:, :, :, delta : delta + 30], want, atol=1e-5)
    assert torch.equal(v_buf[:, :, :, delta : delta + 30], v)
