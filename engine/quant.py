"""Weight-only quantized linears for the CPU: int8 per output channel, or int4 per group.

A decode step at batch 1 is a GEMV per projection: an fp32 Qwen2.5-Coder-0.5B reads ~2 GB of
weights per token (the tied output head alone ~545 MB), llama.cpp its Q4_K_M weights (~0.4 GB).
Here the weights are quantized once, at load time, and forwards of a few rows (decode steps,
short speculative verifications) run torch's own weight-only kernels on them:

- "int8": `aten._weight_int8pack_mm`: int8 weight `[N, K]`, one scale per output row
  (symmetric: w ~ q * scale, q in [-127, 127]).
- "int4": `aten._weight_int4pack_mm_for_cpu`: 4-bit weight packed by
  `aten._convert_weight_to_int4pack_for_cpu`, a scale and an offset per group of `group_size`
  inputs of each row (asymmetric: w ~ q * scale + min, q in [0, 15]).

Both kernels are fast only with bf16 activations (bench/quant_matmul.py: with fp32 ones they are
2-10x slower than fp32 F.linear on this CPU), so a QuantLinear rounds its input to bf16 and its
output back (bias added in fp32); the residual stream, norms and attention stay fp32. Both are
slower than a dense bf16 GEMM (oneDNN, AMX/AVX512-BF16) beyond a few rows, so each QuantLinear
also keeps a bf16 copy for forwards of more than SMALL_ROWS rows (prefill chunks, repairs,
views): 2.6 (int4) to 3 (int8) bytes per weight in all, against fp32's 4.

`quantize_model` swaps a model's projections for QuantLinears: each layer's fused q/k/v and
gate/up GEMMs, o_proj, down_proj, and the output head. A tied head gets a copy of its own (the
embedding table stays fp32: a lookup reads one row, superposed decoding mixes rows of it). The
fp32 projection weights are dropped; the q/k/v and gate/up modules become None (their weights
live only in the layer's `Fused`). The GPU path is not touched: CUDA keeps its bf16 weights and
captured graphs (engine/static_decode.py reads the dense weights directly).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "int8", "int4")  # "fp32": the model's own dtype, not quantized
ENV = "EDITKV_CPU_WEIGHTS"  # overrides the load option and the setting (benches)
GROUP_SIZES = (32,)  # int4: the group when `group_size` does not divide a linear's inputs
ACT = torch.bfloat16  # what the kernels take: activations, scales, the dense copy
SMALL_ROWS = 4  # forwards of more rows use the dense bf16 copy (bench/quant_matmul.py: the crossover)


class QuantLinear(nn.Module):
    """`F.linear(x, weight, bias)` over a weight-only quantized copy of `weight` `[N, K]` (forwards
    of at most SMALL_ROWS rows) and a bf16 copy (more rows); activations rounded to bf16.

    `x` is `[..., K]`; the result has x's dtype. int4 needs K to be a multiple of 32 (else the
    linear is int8)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, *,
                 group_size: int = 32) -> None:
        super().__init__()
        weight = weight.detach()
        n, k = weight.shape
        if mode == "int4" and k % 32:
            mode = "int8"  # the int4 kernel takes groups of at least 32 inputs
        self.mode, self.in_features, self.out_features = mode, k, n
        self.group_size = 0
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        w = weight.float()
        if mode == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale.to(ACT))  # [N]
        elif mode == "int4":
            group = next(g for g in (group_size, *GROUP_SIZES) if g <= k and k % g == 0 and g % 32 == 0)
            self.group_size = group
            grouped = w.view(n, k // group, group)
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [N, K/g]
            scale = ((high - low) / 15.0).clamp(min=1e-12)
            q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp_(0, 15)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 1)
            # the kernel dequantizes (q - 8) * scale + zero, so zero = low + 8 * scale; [K/g, N, 2]
            scale_zero = torch.stack((scale, low + 8 * scale), dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", scale_zero.to(ACT))
        else:
            raise ValueError(f"unknown weight format {mode!r}; use int8 or int4")
        self.register_buffer("dense", weight.to(ACT).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(ACT).contiguous()
        out = F.linear(x2, self.dense) if x2.shape[0] > SMALL_ROWS else self._quantized_mm(x2)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features)

    def _quantized_mm(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` `[M, K]` bf16 (M <= SMALL_ROWS) times the quantized weight: `[M, N]` bf16."""
        if self.mode == "int8":
            return torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self.scales)

    def nbytes(self) -> int:
        """Bytes of the quantized weight, its scales and bias (what a decode step reads)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.bias) if t is not None)

    def dequantized(self) -> torch.Tensor:
        """The weight the quantized kernel computes with, `[N, K]` fp32 (tests, error reports)."""
        eye = torch.eye(self.in_features, dtype=ACT)
        return torch.cat([self._quantized_mm(rows) for rows in eye.split(SMALL_ROWS)]).float().T.contiguous()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}"


def quantize_model(model, mode: str, *, group_size: int = 32) -> None:
    """Swap `model`'s (an engine.model.Transformer on the CPU) projections and output head for
    `mode` QuantLinears in place; "fp32" leaves it as it is."""
    if mode not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {mode!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if mode == "fp32" or getattr(model, "weight_format", "fp32") != "fp32":
        return
    if model.device.type != "cpu":
        raise ValueError("quantized weights are for the CPU path only")
    for block, fused in zip(model.layers, model.fused(), strict=True):
        attn, mlp = block.self_attn, block.mlp
        fused.qkv_quant = QuantLinear(fused.qkv_weight, fused.qkv_bias, mode, group_size=group_size)
        fused.gate_up_quant = QuantLinear(fused.gate_up_weight, fused.gate_up_bias, mode, group_size=group_size)
        fused.qkv_weight = fused.qkv_bias = fused.gate_up_weight = fused.gate_up_bias = None
        attn.q_proj = attn.k_proj = attn.v_proj = mlp.gate_proj = mlp.up_proj = None
        attn.o_proj = QuantLinear(attn.o_proj.weight, attn.o_proj.bias, mode, group_size=group_size)
        mlp.down_proj = QuantLinear(mlp.down_proj.weight, mlp.down_proj.bias, mode, group_size=group_size)
    model.lm_head = QuantLinear(model.lm_head.weight, None, mode, group_size=group_size)
    model.weight_format = mode
    model._weights_replaced()  # a runner's static forward reads the fp weights: it is dropped


# The default on the CPU ("auto", see `choose_format`), and the size from which it applies.
# int8 (BENCHMARKS.md, "Weight-only int8/int4 linears on the CPU"): on Qwen2.5-Coder-0.5B from
# its Q4_K_M GGUF, decode 1.6x and prefill 2.5x faster than fp32 with the same greedy tokens, and
# the same realedits EM/ES; int4 decodes faster still (2.45x) but its tokens leave fp32's.
AUTO_FORMAT = "int8"
EMBEDDED_PARAMS = 50_000_000  # above the embedded default model (engine/default_model: 23M with its embeddings)


def choose_format(requested: str | None, device: torch.device, *, num_params: int) -> str:
    """The weight format a load uses: $EDITKV_CPU_WEIGHTS, else `requested`, else "auto".

    Off the CPU always "fp32" (the GPU path keeps its weights). "auto" is AUTO_FORMAT for models
    larger than the embedded one (a GGUF such as Qwen2.5-Coder-0.5B: its decode steps are bound
    by the bytes of weight they read), "fp32" for the embedded one and the tiny test models,
    GGUF or not (their weights fit the CPU's caches: nothing to gain, bench/decode_cpu.py)."""
    import os

    from editkv.engine.errors import EngineError

    env = os.environ.get(ENV, "").strip()
    choice = env or requested or "auto"
    if choice not in (*WEIGHT_FORMATS, "auto"):
        where = f"${ENV}" if env else "cpu weights"
        raise EngineError(f"{where} must be one of auto, {', '.join(WEIGHT_FORMATS)}; got {choice!r}")
    if device.type != "cpu":
        return "fp32"
    if choice == "auto":
        return AUTO_FORMAT if num_params > EMBEDDED_PARAMS else "fp32"
    return choice
