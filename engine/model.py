"""Our own forward pass for RoPE decoders, with caller-owned KV buffers.

A forward computes `T` new tokens given their ids (or input embeddings) and explicit
positions. Their keys (rotated) and values are written into `write` at slots
`[write_at, write_at + T)`. Each new token attends to every slot of the `context` spans and,
causally, to the new tokens before it. A span names a buffer, a slot range and a `shift`:
the span's keys act as if re-rotated by `shift` positions, which is realised by rotating
the query by `-shift` instead of touching the keys (RoPE scores depend on position
differences only). That is how a view puts document slots at other positions — the FIM
view's suffix at +1 — without copying or mutating the document's cache.

Spans may come from different buffers with different batch sizes (a batch-1 document cache
under a batch-B scratch cache for forked rollouts): batch 1 broadcasts.

Attention never materialises a `[T, S]` score matrix (kernels/segment_attention.py). A batch-1
forward whose spans are all slots of its write buffer (`OneBuffer`: prefill chunks, repairs,
views, decode steps) rotates q and k and writes K/V in one fused op, then attends with one
flash-style call per layer over the buffer's segments, each with its query rotation; any other
forward (several buffers, batched forks) attends per run of keys, merged by log-sum-exp.
Residual adds are fused into the norms after them, and q/k/v and gate/up are one GEMM each
(`Transformer.fused`). The model knows nothing of CUDA graphs or KV pools: its forward is
always this eager one. A `engine.runner.ModelRunner` owns the model with its graphs
(engine/static_decode.py) and its KV pool, and replays small batch-1 forwards on a GPU.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from editkv.engine import faults
from editkv.engine.config import ModelConfig
from editkv.engine.rope import Rotary, apply_rotary
from editkv.kernels.fused import add_rms_norm, rope_write, silu_mul
from editkv.kernels.segment_attention import (
    MAX_SEGMENTS,
    KeyRun,
    Segment,
    SegmentPlan,
    config_for,
    plan_segments,
    segment_attention,
    segment_attention_groups,
    segment_attention_triton,
    triton,
)
from torch import nn

log = logging.getLogger(__name__)
# Why the flash kernel failed in this process (a Triton build this GPU or Triton version can't
# compile): every later forward takes the torch path instead of failing every request.
TRITON_FAILED: str | None = None


@dataclass
class KVCache:
    """Preallocated K/V buffers `k`, `v`: `[layers, batch, kv_heads, capacity, head_dim]` each.

    Keys are stored after RoPE at the position each slot was encoded at. The cache does not
    know positions or tokens; its owner (edit_cache, a decoding strategy) does. One tensor
    for all layers lets a kernel move/re-rotate every layer's slots in one launch.
    """

    k: torch.Tensor
    v: torch.Tensor
    base: KVCache | None = None  # set on a window into another cache's slots (`window`)
    offset: int = 0  # this cache's slot 0 is `base`'s slot `offset`
    # Slots in use, as a hint for static-shape forwards (engine/static_decode.py): attending
    # to this many slots (rounded up) lets one captured graph serve every small write into
    # the buffer, wherever it lands. None: only the slots a forward names.
    extent: int | None = None
    # A window's region: the allocation it lies in (a document's cache, for its scratch window);
    # None: this cache is its own region (a buffer of its own, or an allocation from a pool).
    home: KVCache | None = None
    # The engine.kv_pool.KVPool this region was allocated from (None: a buffer of its own or a
    # window): `ensure_capacity` and `shrink` ask it for room instead of reallocating.
    pool: object | None = None

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        capacity: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Zeroed buffers for `capacity` slots."""
        shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        """Bytes held by both buffers."""
        return 2 * self.k.numel() * self.k.element_size()

    def slot_bytes(self) -> int:
        """Bytes one slot takes across layers, keys and values."""
        return self.nbytes() // max(self.capacity, 1)

    @property
    def region(self) -> KVCache:
        """The allocation this cache lies in: itself, or for a window its owner's region."""
        return self.home or self

    @property
    def origin(self) -> int:
        """The slot of the root buffer (`base`, else this one) where the region's slot 0 is."""
        return self.region.offset

    def window(self, offset: int, size: int) -> KVCache:
        """Slots `[offset, offset + size)` of this cache as a cache of their own (same memory).

        A view's scratch is such a window into the spare slots after its document, so that a
        decode step's keys all live in one buffer (what CUDA-graph replay needs). A window of a
        window is a window of the root buffer (`base`), lying in the same region.
        """
        assert 0 <= offset and offset + size <= self.capacity
        end = offset + size
        return KVCache(self.k[:, :, :, offset:end], self.v[:, :, :, offset:end], self.base or self,
                       self.offset + offset, home=self.region)

    def ensure_capacity(self, needed: int, *, keep: int | None = None) -> None:
        """Grow (x1.5, or to `needed`) so that `needed` slots fit; copies the first `keep` slots.

        A pool's allocation asks its pool (which may move it); a window that grows becomes a
        cache of its own (its base is left as it was).
        """
        if needed <= self.capacity:
            return
        new_capacity = max(needed, int(self.capacity * 1.5) + 16)
        keep = self.capacity if keep is None else min(keep, self.capacity)
        if self.pool is not None and self.pool.resize(self, new_capacity, keep, needed):
            return
        self._own_buffer(new_capacity, keep)

    def _own_buffer(self, capacity: int, keep: int) -> None:
        """Move the first `keep` slots into a new buffer of `capacity` slots of this cache's own."""
        old_k, old_v = self.k, self.v
        self._leave_pool()
        for name, old in (("k", old_k), ("v", old_v)):
            shape = (*old.shape[:3], capacity, old.shape[4])
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, :keep] = old[:, :, :, :min(keep, capacity)]
            setattr(self, name, new)

    def _leave_pool(self) -> None:
        if self.pool is not None:
            self.pool.release(self)
        self.base, self.offset, self.home, self.pool = None, 0, None, None

    def shrink(self, capacity: int) -> None:
        """Drop slots past `capacity` (frees memory after a document gets shorter)."""
        if capacity >= self.capacity:
            return
        if self.pool is not None:
            self.pool.resize(self, capacity, capacity, capacity)
            return
        self._own_buffer(capacity, capacity)


@dataclass(frozen=True)
class Span:
    """Slots `[start, end)` of `cache` visible to the new tokens, keys acting `shift` positions later."""

    cache: KVCache
    start: int
    end: int
    shift: int = 0

    def __post_init__(self) -> None:
        assert 0 <= self.start <= self.end <= self.cache.capacity, (self.start, self.end)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as the HF reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


@dataclass
class Fused:
    """One layer's projections as single matrices: one GEMM for q, k and v, one for gate and up.

    The modules' own weights are slices of these (`Transformer.fused`), so there is one copy.
    With quantized CPU weights (engine/quant.py) the two GEMMs are `*_quant` and the fp weights
    are None."""

    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor | None
    gate_up_bias: torch.Tensor | None
    qkv_quant: nn.Module | None = None
    gate_up_quant: nn.Module | None = None

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of `x` `[..., hidden]`, concatenated: `[..., (H + 2 KVH) D]`."""
        if self.qkv_quant is not None:
            return self.qkv_quant(x)
        return F.linear(x, self.qkv_weight, self.qkv_bias)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """gate and up projections of `x`, concatenated: `[..., 2 intermediate]`."""
        if self.gate_up_quant is not None:
            return self.gate_up_quant(x)
        return F.linear(x, self.gate_up_weight, self.gate_up_bias)


def _fuse(block: Block) -> Fused:
    """Concatenate a layer's q/k/v and gate/up weights, and point the modules at slices of them."""
    attn, mlp = block.self_attn, block.mlp

    def merge(linears):
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = None
        if linears[0].bias is not None:
            bias = torch.cat([lin.bias.detach() for lin in linears])
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
        return weight, bias

    qkv_weight, qkv_bias = merge([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up_weight, gate_up_bias = merge([mlp.gate_proj, mlp.up_proj])
    return Fused(qkv_weight, qkv_bias, gate_up_weight, gate_up_bias)


@dataclass(frozen=True)
class TokenGroup:
    """`count` consecutive new tokens of a forward that see `context` and, causally, each other:
    what a forward of their own would see (their spans may include the slots the forward's
    earlier tokens are written to). A forward of several groups is several prefill chunks at
    once, each under its own window (engine.generate.prefill on a GPU)."""

    count: int
    context: Sequence[Span]


@dataclass
class OneBuffer:
    """A batch-1 forward whose write and context spans are all slots of one buffer (`base`): a
    prefill chunk (or several, as token groups), a repair, a view, a decode step. Its attention
    is one call per layer over its segments (base slots, each group's own tokens last and causal),
    by `kernel`:

    - "sdpa": only the causal segment (a chunk with nothing before it: a whole prefill), on a
      CUDA device in half precision: PyTorch's flash attention, transformers' own call;
    - "triton": kernels/segment_attention.py's flash kernel (CUDA; the CPU under TRITON_INTERPRET=1
      when a test asks for it), every segment of every group in one launch;
    - "cpu": the CPU flash op once per segment, merged by log-sum-exp ("torch" on other
      devices: the reference over blocks of queries).

    RoPE with the K/V write is one fused op over `slots` (the new tokens' base slots)."""

    base: KVCache
    segments: list[list[Segment]]  # per group
    group_tokens: list[int]
    slots: torch.Tensor  # int64 [T]
    kernel: str
    plan: SegmentPlan | None = None  # "triton": every group's segments on the device, shared by the layers


def one_buffer(write: KVCache, write_at: int, groups: Sequence[TokenGroup], rotations: Sequence[dict[int, int]],
               choice: str = "auto", config: tuple[int, int, int, int] | None = None) -> OneBuffer | None:
    """The forward as a `OneBuffer`, or None when its spans reach other buffers (or batches), or
    when its groups are more than one and the flash kernel can't take them.

    `rotations`: per group, span shift -> query rotation. `choice`: "auto" (see `OneBuffer`),
    "triton" for the flash kernel on any device, or "sdpa" for SDPA wherever its causal call
    serves (tests on the CPU); `config` overrides the flash kernel's launch config."""
    base = write.base or write
    num_new = sum(g.count for g in groups)
    if write.batch != 1 or num_new == 0:
        return None
    at = write.offset + write_at
    by_group, first = [], 0
    for group, rotation in zip(groups, rotations, strict=True):
        segments = []
        for span in group.context:
            if span.end == span.start:
                continue
            if (span.cache.base or span.cache) is not base:
                return None
            off = span.cache.offset
            segments.append(Segment(off + span.start, off + span.end, rotation[span.shift]))
        segments.append(Segment(at + first, at + first + group.count, 0, causal=True, first_token=first))
        if len(segments) > MAX_SEGMENTS:
            return None
        by_group.append(segments)
        first += group.count
    device, dtype, head_dim = write.device, write.dtype, write.k.shape[-1]
    if choice == "triton" and triton is not None and TRITON_FAILED is None:
        kernel = "triton"
    elif choice == "sdpa" and len(by_group) == 1 and _causal_from_a_short_prefix(by_group[0], num_new):
        kernel = "sdpa"
    elif device.type != "cuda" or triton is None:
        kernel = "cpu" if device.type == "cpu" else "torch"
    elif len(by_group) == 1 and _causal_from_a_short_prefix(by_group[0], num_new) \
            and dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256:
        kernel = "sdpa"  # flash attention's own conditions; fp32 would fall back to a [H, T, T] math kernel
    else:
        kernel = "triton" if TRITON_FAILED is None else "torch"
    plan = None
    if kernel == "triton":
        config = config or config_for(head_dim, num_new)
        if any(g.count % config[0] for g in groups[:-1]):
            return None  # a token block would straddle two groups
        plan = plan_segments(by_group, num_new, head_dim, device, group_tokens=[g.count for g in groups],
                             config=config)
    slots = torch.arange(at, at + num_new, device=device)
    return OneBuffer(base, by_group, [g.count for g in groups], slots, kernel, plan)


def _causal_from_a_short_prefix(segments: list[Segment], num_new: int) -> bool:
    """Whether the forward's keys are its own (causal), possibly after a few unshifted slots right
    before them (a document's head): one causal SDPA call over both, the queries padded in front
    with as many rows as there are prefix keys (cheap while they are few)."""
    if len(segments) == 1:
        return True
    if len(segments) != 2:
        return False
    prefix, new = segments
    return prefix.rotation == 0 and prefix.end == new.start and prefix.end - prefix.start <= max(16, num_new // 16)


class Attention(nn.Module):
    """GQA self-attention over caller-owned KV spans."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.scale = c.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        rope: RopeInputs,
        layer: int,
        write: KVCache,
        write_at: int,
        context: Sequence[Span],
        fused: Fused,
        plan: OneBuffer | None = None,
    ) -> torch.Tensor:  # [B, T, hidden]
        c = self.config
        bsz, num_new, _ = x.shape
        qkv = fused.qkv(x)  # [B, T, (H + 2 KVH) D]
        if plan is not None:
            out = self._one_buffer(qkv[0], rope, layer, plan)
        else:
            out = self._spans(qkv, rope, layer, write, write_at, context)
        return self.o_proj(out.reshape(bsz, num_new, c.num_heads * c.head_dim).to(x.dtype))

    def _one_buffer(self, qkv: torch.Tensor, rope: RopeInputs, layer: int,
                    plan: OneBuffer) -> torch.Tensor:  # [1, T, H, D]
        c = self.config
        num_new = qkv.shape[0]
        keys, values = plan.base.k[layer], plan.base.v[layer]  # [1, KVH, capacity, D]
        # queries [KVH, G, R, T, D] (one rotation per distinct span shift); keys and values to the slots
        q = rope_write(qkv, rope.cos[:, 0], rope.sin[:, 0], c.rotary_dim, c.num_heads, keys[0], values[0],
                       plan.slots)
        q = q.view(1, c.num_heads, rope.cos.shape[0], num_new, c.head_dim)
        if plan.kernel == "sdpa":
            # transformers' own call (is_causal: query i sees keys 0..i); a short prefix of keys
            # before the new ones gets as many zero query rows in front, whose outputs are dropped
            lo, hi = plan.segments[0][0].start, plan.segments[0][-1].end
            pad = hi - lo - num_new
            q0 = q[:, :, 0]
            if pad:
                q0 = torch.cat([q0.new_zeros(1, c.num_heads, pad, c.head_dim), q0], dim=2)
            out = F.scaled_dot_product_attention(q0, keys[:, :, lo:hi], values[:, :, lo:hi], is_causal=True,
                                                 scale=self.scale, enable_gqa=c.num_groups > 1)
            return out[:, :, pad:].transpose(1, 2)
        if plan.kernel == "triton":
            try:
                return segment_attention_triton(q, keys, values, plan.plan, self.scale)
            except Exception as err:  # compile errors: the torch path below computes the same
                global TRITON_FAILED
                if TRITON_FAILED is None:
                    TRITON_FAILED = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    log.error("the flash attention kernel failed (%s); attention runs through torch from now on",
                              TRITON_FAILED)
        if len(plan.segments) > 1:
            return segment_attention_groups(q, keys, values, plan.segments, plan.group_tokens, self.scale)
        return segment_attention(q, [s.run(keys, values) for s in plan.segments[0]], self.scale)

    def _spans(self, qkv: torch.Tensor, rope: RopeInputs, layer: int, write: KVCache, write_at: int,
               context: Sequence[Span]) -> torch.Tensor:  # [B, T, H, D]
        """Any spans (several buffers, batch-1 context under a batched write): runs of each."""
        c = self.config
        bsz, num_new, _ = qkv.shape
        q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1)
        q = q.view(bsz, num_new, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(bsz, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(bsz, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2)
        k = apply_rotary(k, rope.cos[0][:, None], rope.sin[0][:, None], c.rotary_dim)
        write.k[layer, :, :, write_at : write_at + num_new] = k
        write.v[layer, :, :, write_at : write_at + num_new] = v
        q = torch.stack([apply_rotary(q, cos[:, None], sin[:, None], c.rotary_dim)
                         for cos, sin in zip(rope.cos, rope.sin, strict=True)], dim=2).to(write.dtype)
        runs = [KeyRun(s.cache.k[layer, :, :, s.start : s.end], s.cache.v[layer, :, :, s.start : s.end],
                       rope.shifts.index(s.shift)) for s in context if s.end > s.start]
        runs.append(KeyRun(k.to(write.dtype), v.to(write.dtype), causal=True))
        return segment_attention(q, runs, self.scale)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor, fused: Fused) -> torch.Tensor:  # noqa: D102
        return self.down_proj(silu_mul(fused.gate_up(x)))


class Block(nn.Module):
    """Pre-norm decoder layer (its parts; `Transformer.forward` runs them with fused residual norms)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class RopeInputs:
    """cos/sin for the new tokens' positions, one rotation per distinct span shift (query at
    position - shift); rotation 0 is shift 0 (the new tokens' own keys)."""

    shifts: list[int]
    cos: torch.Tensor  # [R, B|1, T, rd] fp32
    sin: torch.Tensor  # [R, B|1, T, rd] fp32


def _residual_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm of it): the fused kernel on CUDA; on the CPU in fp32, `delta` added into
    `x` in place (the forward's own residual stream), then the norm in three passes (the row
    norms, x times their inverse, times the weight) and one new tensor: the CPU pays for every
    pass, and on a shared machine for every parallel region, more than for the arithmetic."""
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        if delta is not None:
            x = x.add_(delta)
        # sqrt(sum x^2) per row in one pass; the per-row arithmetic on [T, 1] is negligible
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        return x, torch.mul(x, rstd).mul_(weight)
    return add_rms_norm(x, delta, weight, eps)


class Transformer(nn.Module):
    """A RoPE decoder whose KV cache layout, positions and masks belong to the caller."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)
        # called when the parameters become new tensors (`on_weights_replaced`; held weakly)
        self._weights_hooks: list[weakref.WeakMethod] = []
        self._fused: list[Fused] | None = None
        # "fp32": projections in the model's dtype; "int8"/"int4": weight-only quantized on the
        # CPU (engine/quant.py: the q/k/v and gate/up modules are then None, see `Fused`)
        self.weight_format = "fp32"
        # "auto": each forward's attention kernel by device and shape (`OneBuffer`); "triton": the
        # flash kernel for every batch-1 one-buffer forward (tests run it on the CPU's interpreter);
        # "sdpa": SDPA's causal call wherever it serves (tests, on the CPU)
        self.attention = "auto"
        self.attention_config: tuple[int, int, int, int] | None = None  # the flash kernel's, when set

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids `[B, T]` -> `[B, T, hidden]` (these families apply no scaling)."""
        return self.embed_tokens(ids)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor | None,  # [B, T] int64
        positions: torch.Tensor,  # [T] or [B, T] int64
        *,
        write: KVCache,
        write_at: int,
        context: Sequence[Span] = (),
        logits: str = "all",
        input_embeds: torch.Tensor | None = None,  # [B, T, hidden], instead of input_ids
        groups: Sequence[TokenGroup] | None = None,
    ) -> torch.Tensor | None:  # [B, T, V] ("all"), [B, V] ("last"), None ("none")
        """Encode T new tokens into `write[write_at:write_at+T]` and return their logits (eagerly;
        `ModelRunner.forward` replays graphs where they serve).

        `groups` (instead of `context`): consecutive token groups, each with its own context,
        as if each were a forward of its own, one after the other (`TokenGroup`)."""
        context, groups = check_forward(input_ids, positions, write, write_at, context, input_embeds, groups)
        faults.hit("forward")
        x = self.embed(input_ids) if input_embeds is None else input_embeds
        bsz, num_new, _ = x.shape
        if positions.dim() == 1:
            positions = positions[None]
        positions = positions.to(self.device)
        groups = groups or [TokenGroup(num_new, context)]
        rotations = [{shift: r for r, shift in enumerate(_shifts(g.context))} for g in groups]
        plan = one_buffer(write, write_at, groups, rotations, self.attention, self.attention_config) \
            if bsz == 1 else None
        if len(groups) > 1 and (plan is None or self.config.rope.rope_type == "dynamic"):
            return self._one_group_at_a_time(input_ids, positions, write, write_at, groups, logits, input_embeds)
        rope = self._rope_inputs(positions, groups)
        fused = self.fused()
        eps = self.config.rms_norm_eps
        x = x.clone() if input_embeds is not None else x  # the residual stream is this forward's own
        delta = None
        for i, block in enumerate(self.layers):
            # residual adds fused into the norms after them: x + delta, norm(x + delta)
            x, h = _residual_norm(x, delta, block.input_layernorm.weight, eps)
            delta = block.self_attn(h, rope, i, write, write_at, context, fused[i], plan)
            x, h = _residual_norm(x, delta, block.post_attention_layernorm.weight, eps)
            delta = block.mlp(h, fused[i])
        if logits == "none":
            return None
        if logits == "last":
            x, delta = x[:, -1], delta[:, -1]
        _, h = _residual_norm(x, delta, self.norm.weight, eps)
        return self.lm_head(h).float()

    def fused(self) -> list[Fused]:
        """Each layer's fused projections (made on first use; the modules then hold slices of them)."""
        if self._fused is None:
            self._fused = [_fuse(block) for block in self.layers]
        return self._fused

    def on_weights_replaced(self, hook: Callable[[], None]) -> None:
        """Call `hook`, a bound method (held weakly), whenever the parameters become new tensors:
        a `ModelRunner` drops the CUDA graphs that read the old ones."""
        self._weights_hooks.append(weakref.WeakMethod(hook))

    def _weights_replaced(self) -> None:
        """The parameters are new tensors (`.to()`, `.half()`, `load_state_dict`): the fused copies
        read the old ones, so they are dropped (made again on the next forward), and the hooks are
        called (a runner's graphs read them too)."""
        if self.weight_format == "fp32":  # quantized: the fused QuantLinears are the weights
            self._fused = None
        self._weights_hooks = [ref for ref in self._weights_hooks if ref() is not None]
        for ref in list(self._weights_hooks):
            hook = ref()
            if hook is not None:
                hook()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's hook for .to(), .cuda(), .half(), ...
        out = super()._apply(fn, recurse)
        self._weights_replaced()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._weights_replaced()
        return out

    def _rope_inputs(self, positions: torch.Tensor, groups: Sequence[TokenGroup]) -> RopeInputs:
        """cos/sin of every rotation; with several groups rotation r of a token is its group's r-th
        shift (groups have few: 0 and their sink's), so q is rotated R times, not once per shift."""
        if len(groups) == 1:
            ordered = _shifts(groups[0].context)
            pairs = [self.rotary.cos_sin(positions - shift) for shift in ordered]  # each [B|1, T, rd]
            return RopeInputs(ordered, torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs]))
        per_group = [_shifts(g.context) for g in groups]
        rotations = max(len(shifts) for shifts in per_group)
        shifts = torch.tensor([[g[r] if r < len(g) else 0 for g in per_group] for r in range(rotations)])
        counts = torch.tensor([g.count for g in groups])
        table = shifts.repeat_interleave(counts, dim=1).to(positions.device)  # [R, T]: each token's shifts
        cos, sin = self.rotary.cos_sin(positions[None] - table[:, None])  # [R, B|1, T, rd]
        return RopeInputs(per_group[0], cos, sin)

    def _one_group_at_a_time(self, input_ids, positions, write, write_at, groups, logits, input_embeds):
        """`forward` with groups, one forward per group (where one forward can't take them all)."""
        outs, first = [], 0
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            want = logits if logits == "all" or last else "none"
            rows = slice(first, first + group.count)
            out = self.forward(None if input_ids is None else input_ids[:, rows], positions[..., rows],
                               write=write, write_at=write_at + first, context=group.context, logits=want,
                               input_embeds=None if input_embeds is None else input_embeds[:, rows])
            outs.append(out)
            first += group.count
        if logits == "all":
            return torch.cat(outs, dim=1)
        return outs[-1]


def check_forward(input_ids: torch.Tensor | None, positions: torch.Tensor, write: KVCache, write_at: int,
                  context: Sequence[Span], input_embeds: torch.Tensor | None,
                  groups: Sequence[TokenGroup] | None) -> tuple[Sequence[Span], Sequence[TokenGroup] | None]:
    """A forward's arguments checked (`Transformer.forward`'s, as every forward path takes them);
    (context, groups) with a single group turned into a plain context."""
    if groups is not None:
        assert not context, "groups carry their own context"
        assert sum(g.count for g in groups) == positions.shape[-1], "groups must cover the tokens"
        if len(groups) == 1:
            context, groups = groups[0].context, None
    inputs = input_ids if input_embeds is None else input_embeds
    bsz, num_new = inputs.shape[:2]
    assert positions.shape[-1] == num_new, "one position per new token"
    assert write_at + num_new <= write.capacity, "write region exceeds the cache's capacity"
    assert write.batch == bsz, f"write cache batch {write.batch} != input batch {bsz}"
    for span in context:
        assert span.cache.batch in (1, bsz), "context span batch must be 1 or the input's"
    return context, groups


def _shifts(context: Sequence[Span]) -> list[int]:
    """The distinct shifts of a context's spans, 0 first (rotation 0: the new tokens' own keys)."""
    return [0, *sorted({span.shift for span in context} - {0})]
