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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from editkv.engine import faults
from editkv.engine.config import ModelConfig
from editkv.engine.rope import Rotary, apply_rotary
from torch import nn


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

    def window(self, offset: int, size: int) -> KVCache:
        """Slots `[offset, offset + size)` of this cache as a cache of their own (same memory).

        A view's scratch is such a window into the spare slots after its document, so that a
        decode step's keys all live in one buffer (what CUDA-graph replay needs).
        """
        assert 0 <= offset and offset + size <= self.capacity
        end = offset + size
        return KVCache(self.k[:, :, :, offset:end], self.v[:, :, :, offset:end], self, offset)

    def ensure_capacity(self, needed: int, *, keep: int | None = None) -> None:
        """Grow (x1.5, or to `needed`) so that `needed` slots fit; copies the first `keep` slots.

        A window that grows becomes a cache of its own (its base is left as it was).
        """
        if needed <= self.capacity:
            return
        self.base, self.offset = None, 0
        new_capacity = max(needed, int(self.capacity * 1.5) + 16)
        keep = self.capacity if keep is None else min(keep, self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            shape = (*old.shape[:3], new_capacity, old.shape[4])
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, :keep] = old[:, :, :, :keep]
            setattr(self, name, new)

    def shrink(self, capacity: int) -> None:
        """Drop slots past `capacity` (frees memory after a document gets shorter)."""
        if capacity < self.capacity:
            self.k = self.k[:, :, :, :capacity].clone()
            self.v = self.v[:, :, :, :capacity].clone()
            self.base, self.offset = None, 0


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
    ) -> torch.Tensor:  # [B, T, hidden]
        c = self.config
        bsz, num_new, _ = x.shape
        q = self.q_proj(x).view(bsz, num_new, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, num_new, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos0, sin0 = rope.by_shift[0]
        k = apply_rotary(k, cos0, sin0, c.rotary_dim)
        write.k[layer, :, :, write_at : write_at + num_new] = k
        write.v[layer, :, :, write_at : write_at + num_new] = v
        k = k.to(write.dtype)
        v = v.to(write.dtype)
        # Queries grouped per KV head: [B, kv_heads, groups * T, head_dim], no K/V repeat.
        q_by_shift = {
            shift: apply_rotary(q, cos, sin, c.rotary_dim)
            .reshape(bsz, c.num_kv_heads, c.num_groups * num_new, c.head_dim)
            for shift, (cos, sin) in rope.by_shift.items()
        }
        if not context:
            q0 = q_by_shift[0].view(bsz, c.num_heads, num_new, c.head_dim)
            out = F.scaled_dot_product_attention(
                q0, k, v, is_causal=num_new > 1, scale=self.scale, enable_gqa=c.num_groups > 1
            )
        elif _own_prefix(context, write, write_at):
            # The common prefill/repair shape: the new tokens continue their own buffer's
            # slots [0, write_at). One fused attention call over [0, write_at + T) with a
            # causal mask aligned to the end (rows are (group, token), as above).
            keys = write.k[layer, :, :, : write_at + num_new]
            values = write.v[layer, :, :, : write_at + num_new]
            rows = torch.arange(write_at, write_at + num_new, device=x.device)
            mask = torch.arange(write_at + num_new, device=x.device)[None] <= rows[:, None]
            out = F.scaled_dot_product_attention(
                q_by_shift[0].to(write.dtype), keys, values, attn_mask=mask.repeat(c.num_groups, 1), scale=self.scale
            )
            out = out.reshape(bsz, c.num_heads, num_new, c.head_dim)
        else:
            out = _attend_spans(q_by_shift, k, v, context, layer, self.scale, c.num_groups)
            out = out.view(bsz, c.num_heads, num_new, c.head_dim)
        out = out.transpose(1, 2).reshape(bsz, num_new, c.num_heads * c.head_dim)
        return self.o_proj(out.to(x.dtype))


def _own_prefix(context: Sequence[Span], write: KVCache, write_at: int) -> bool:
    """Whether the context is exactly the write buffer's slots before the new tokens."""
    if len(context) != 1:
        return False
    span = context[0]
    return span.cache is write and span.start == 0 and span.end == write_at and span.shift == 0


def _attend_spans(
    q_by_shift: dict[int, torch.Tensor],  # shift -> [B, kv_heads, G*T, D]
    k_new: torch.Tensor,  # [B, kv_heads, T, D]
    v_new: torch.Tensor,  # [B, kv_heads, T, D]
    context: Sequence[Span],
    layer: int,
    scale: float,
    groups: int,
) -> torch.Tensor:  # [B, kv_heads, G*T, D]
    """Softmax attention over context spans plus causal new tokens, one score row per query."""
    num_new = k_new.shape[2]
    scores = []
    values = []
    for span in context:
        if span.end == span.start:
            continue
        keys = span.cache.k[layer, :, :, span.start : span.end]
        q = q_by_shift[span.shift].to(keys.dtype)
        scores.append(torch.matmul(q, keys.transpose(-1, -2)).float())
        values.append(span.cache.v[layer, :, :, span.start : span.end])
    q0 = q_by_shift[0].to(k_new.dtype)
    new_scores = torch.matmul(q0, k_new.transpose(-1, -2)).float()  # [B, H, G*T, T]
    causal = torch.ones(num_new, num_new, dtype=torch.bool, device=k_new.device).tril()
    new_scores = new_scores.masked_fill(~causal.repeat(groups, 1), float("-inf"))
    scores.append(new_scores)
    values.append(v_new)
    probs = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)
    out = None
    offset = 0
    for vals in values:
        width = vals.shape[2]
        part = torch.matmul(probs[..., offset : offset + width].to(vals.dtype), vals)
        out = part if out is None else out + part
        offset += width
    return out


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, layer, write, write_at, context):  # noqa: D102
        x = x + self.self_attn(self.input_layernorm(x), rope, layer, write, write_at, context)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class RopeInputs:
    """cos/sin for the new tokens' positions, per distinct span shift (query at position - shift)."""

    by_shift: dict[int, tuple[torch.Tensor, torch.Tensor]]  # shift -> ([B|1, 1, T, rd], same)


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
        self.static = None  # engine.static_decode.StaticForward, once enable_graphs() is called

    def enable_graphs(self, **options) -> None:
        """Run batch-1 forwards of few tokens as replayed CUDA graphs where their spans allow it.

        See engine/static_decode.py; other forwards (and every forward on the CPU) stay eager.
        """
        from editkv.engine.static_decode import StaticForward

        self.static = StaticForward(self, **options)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids `[B, T]` -> `[B, T, hidden]` (these families apply no scaling)."""
        return self.embed_tokens(ids)

    def new_cache(self, capacity: int, *, batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        """A KV buffer on the model's device in the model's dtype."""
        return KVCache.allocate(
            self.config, capacity, batch=batch, dtype=dtype or self.dtype, device=self.device
        )

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
    ) -> torch.Tensor | None:  # [B, T, V] ("all"), [B, V] ("last"), None ("none")
        """Encode T new tokens into `write[write_at:write_at+T]` and return their logits."""
        faults.hit("forward")
        x = self.embed(input_ids) if input_embeds is None else input_embeds
        bsz, num_new, _ = x.shape
        assert positions.shape[-1] == num_new, "one position per new token"
        assert write_at + num_new <= write.capacity, "write region exceeds the cache's capacity"
        assert write.batch == bsz, f"write cache batch {write.batch} != input batch {bsz}"
        for span in context:
            assert span.cache.batch in (1, bsz), "context span batch must be 1 or the input's"
        if self.static is not None:
            handled, out = self.static.forward(input_ids, positions, write, write_at, context, logits,
                                               embeds=input_embeds)
            if handled:
                return out
        if positions.dim() == 1:
            positions = positions[None]
        positions = positions.to(self.device)
        rope = self._rope_inputs(positions, {span.shift for span in context})
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, i, write, write_at, context)
        if logits == "none":
            return None
        if logits == "last":
            x = x[:, -1]
        return self.lm_head(self.norm(x)).float()

    def _rope_inputs(self, positions: torch.Tensor, shifts: set[int]) -> RopeInputs:
        by_shift = {}
        for shift in shifts | {0}:
            cos, sin = self.rotary.cos_sin(positions - shift)  # [B|1, T, rd]
            by_shift[shift] = (cos[:, None], sin[:, None])
        return RopeInputs(by_shift)
