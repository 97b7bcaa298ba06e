"""Rotary position embeddings: frequencies for each scaling type, and rotation of q/k.

Convention: the "rotate_half" layout of HF Llama (the first rotary_dim/2 features pair with
the next rotary_dim/2), applied to the first `rotary_dim` features of each head (partial
rotary leaves the rest unrotated). Angles are computed in fp64 and
cos/sin stored in fp32. Keys are cached
*after* rotation, so moving a cached key by `delta` positions is one more rotation by
`delta * inv_freq` (`rerotate` here, fused in kernels/rerotate.py), with the same
frequencies and without the attention scaling some types apply to cos/sin.
"""

from __future__ import annotations

import math

import torch
from editkv.engine.config import ModelConfig
from editkv.kernels.fused import apply_rotary, rotate_half  # noqa: F401  (the rotation itself lives with its kernel)


class Rotary:
    """Frequencies of one model; `cos_sin` for positions, `apply` to q or k."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.rotary_dim = config.rotary_dim
        self.device = torch.device(device)
        self.inv_freq, self.attention_scaling = _inv_freq(config, seq_len=None)
        self.inv_freq = self.inv_freq.to(self.device)

    def inv_freq_for(self, max_position: int) -> torch.Tensor:
        """Frequencies in force for a forward whose largest position is `max_position`.

        Only "dynamic" scaling depends on it (NTK base grows past the trained length, like
        transformers does per forward); every other type returns the fixed frequencies.
        """
        cfg = self.config
        if cfg.rope.rope_type == "dynamic" and max_position + 1 > cfg.max_position_embeddings:
            inv_freq, _ = _inv_freq(cfg, seq_len=max_position + 1)
            return inv_freq.to(self.device)
        return self.inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin in fp32 for integer positions `[..., T]` -> two `[..., T, rotary_dim]`."""
        if positions.device != self.device:
            self.device = positions.device
            self.inv_freq = self.inv_freq.to(self.device)
        inv_freq = self.inv_freq
        if self.config.rope.rope_type == "dynamic" and positions.numel():
            inv_freq = self.inv_freq_for(int(positions.max()))  # a host sync, dynamic only
        # fp64 angles: fp32 `position * inv_freq` is off by ~position * 6e-8 rad, which at
        # position 10k is a visible error, and PIE compares keys rotated along two paths.
        angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [..., T, rd/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(torch.float32)
        sin = (angles.sin() * self.attention_scaling).to(torch.float32)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `[B, H, T, head_dim]` by cos/sin `[B or 1, T, rotary_dim]`."""
        return apply_rotary(x, cos[:, None], sin[:, None], self.rotary_dim)

    def delta_cos_sin(self, delta: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp64 cos/sin of a pure rotation by `delta` positions (no attention scaling) -> `[..., rotary_dim]`.

        fp64 because a cached key may be re-rotated thousands of times: fp32 cos/sin have
        |R| != 1 by ~1e-7, which compounds into a drift of the keys' norm.
        """
        delta = torch.as_tensor(delta, dtype=torch.float64, device=self.device)
        angles = delta[..., None] * self.inv_freq.to(torch.float64)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _inv_freq(config: ModelConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    rope = config.rope
    dim = config.rotary_dim
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    kind = rope.rope_type
    if kind == "default":
        return 1.0 / (base**exponents), 1.0
    if kind == "linear":
        return (1.0 / (base**exponents)) / rope.factor, 1.0
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq = max(seq_len or max_pos, max_pos)
        base = base * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        inv_freq = 1.0 / (base**exponents)
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(config, dim, base, exponents)
    raise AssertionError(f"unhandled rope type {kind}")  # ModelConfig validated it


def _yarn(
    config: ModelConfig, dim: int, base: float, exponents: torch.Tensor
) -> tuple[torch.Tensor, float]:
    rope = config.rope
    factor = rope.factor
    original = rope.original_max_position_embeddings or config.max_position_embeddings

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)
