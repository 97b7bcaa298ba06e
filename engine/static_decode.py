"""Decode steps with static shapes over a materialised view, replayed as CUDA graphs.

A view (edit_cache/views.py) attends to spans of several buffers, some with a position
shift. That is what lets it leave the document's cache untouched, but every decode step
then has new shapes and launches a few hundred small kernels from Python: at batch 1 the
GPU waits on the host. The `StaticDecoder` instead copies the view once into an *arena*, a
batch-1 buffer of its own in which every key already sits at the position it acts at (a
shifted span is re-rotated on the way in, as PIE moves keys), and runs each step over a
fixed-length bucket of the arena. Which slots a new token sees is computed on the device
from the slots it is written to (every earlier slot, and itself), so the step has no
host-side shapes or indices and can be captured: on CUDA each (bucket, width) pair is
captured once and replayed after that.

Steps of several tokens (verifying a speculative draft) use the same forward with width
rounded up to a power of two; padding tokens are written after the real ones, where no real
token can see them, and are overwritten by the next step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.generate import DecodeState
from engine.model import Attention, KVCache, Span, Transformer
from engine.rope import apply_rotary
from kernels.rerotate import rerotate_ref


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class StaticDecoder:
    """One batch-1 arena, static-shape steps over it, CUDA graphs per (bucket, width).

    `load(state)` materialises a decode state (a view) into the arena; `step(ids, positions)`
    encodes tokens after everything loaded or stepped so far and returns their logits;
    `rewind(n)` forgets slots past `n` (rejected draft tokens). One decoder serves one
    request at a time; reuse it across requests so its graphs are captured once.
    """

    def __init__(self, model: Transformer, capacity: int, *, bucket: int = 1024, max_width: int = 16,
                 graphs: bool | None = None) -> None:
        self.model = model
        self.bucket = bucket
        self.max_width = _next_power_of_two(max_width)
        dynamic_rope = model.config.rope.rope_type == "dynamic"  # its frequencies need a host sync
        self.use_graphs = (model.device.type == "cuda" and not dynamic_rope) if graphs is None else graphs
        if self.use_graphs and (model.device.type != "cuda" or dynamic_rope):
            raise ValueError("CUDA graphs need a CUDA model without dynamic RoPE scaling")
        dev = model.device
        self._ids = torch.zeros(1, self.max_width, dtype=torch.long, device=dev)
        self._positions = torch.zeros(self.max_width, dtype=torch.long, device=dev)
        self._slots = torch.zeros(self.max_width, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.used = 0
        self.captures = 0
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        capacity = _round_up(capacity + self.max_width, self.bucket)
        self.arena = self.model.new_cache(capacity)
        self._key_index = torch.arange(capacity, device=self.model.device)
        self._graphs.clear()  # they point at the old arena

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    def load(self, state: DecodeState, *, reserve: int = 64) -> None:
        """Copy `state`'s context and prompt slots into the arena, keys at their acting positions."""
        spans = [*state.context, Span(state.scratch, 0, state.scratch_used)]
        total = sum(span.end - span.start for span in spans)
        if total + reserve + self.max_width > self.capacity:
            self._allocate(max(total + reserve, int(self.capacity * 1.5)))
        rotary = self.model.rotary
        rotary_dim = self.model.config.rotary_dim
        n = 0
        for span in spans:
            width = span.end - span.start
            if width == 0:
                continue
            if span.cache.batch != 1:
                raise ValueError("a static decoder loads batch-1 views only")
            keys = span.cache.k[:, :, :, span.start : span.end]
            if span.shift:
                cos, sin = rotary.delta_cos_sin(span.shift)
                keys = rerotate_ref(keys, cos[: rotary_dim // 2], sin[: rotary_dim // 2], rotary_dim)
            self.arena.k[:, :, :, n : n + width] = keys
            self.arena.v[:, :, :, n : n + width] = span.cache.v[:, :, :, span.start : span.end]
            n += width
        self.used = n

    def rewind(self, used: int) -> None:
        """Forget every slot from `used` on (their contents are overwritten by later steps)."""
        assert 0 <= used <= self.used
        self.used = used

    def step(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:  # [T, V] fp32
        """Encode `ids` at `positions` after the arena's used slots; logits of each."""
        count = len(ids)
        assert count == len(positions) and 0 < count <= self.max_width
        width = _next_power_of_two(count)
        if self.used + width > self.capacity:
            raise ValueError(f"the arena holds {self.capacity} slots; load with a larger reserve")
        bucket = min(_round_up(self.used + width, self.bucket), self.capacity)
        last = positions[-1]
        padded_ids = [*ids, *([ids[-1]] * (width - count))]
        padded_positions = [*positions, *range(last + 1, last + 1 + width - count)]
        slots = range(self.used, self.used + width)
        host = torch.tensor([padded_ids, padded_positions, list(slots)], dtype=torch.long)
        self._ids[0, :width].copy_(host[0], non_blocking=True)
        self._positions[:width].copy_(host[1], non_blocking=True)
        self._slots[:width].copy_(host[2], non_blocking=True)
        if self.use_graphs:
            graph, out = self._graph(bucket, width)
            graph.replay()
        else:
            out = self._forward(bucket, width)
        self.used += count
        return out[:count]

    def _graph(self, bucket: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (bucket, width)
        if key not in self._graphs:
            # Warm-up runs compute exactly the step being asked for (same inputs, same
            # slots), so their KV writes are the ones the replay makes.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(bucket, width)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(bucket, width)
            self._graphs[key] = (graph, out)
            self.captures += 1
        return self._graphs[key]

    @torch.inference_mode()
    def _forward(self, bucket: int, width: int) -> torch.Tensor:  # [width, V] fp32
        model = self.model
        c = model.config
        slots = self._slots[:width]
        x = model.embed(self._ids[:, :width])
        cos, sin = model.rotary.cos_sin(self._positions[:width][None])  # [1, T, rd]
        cos, sin = cos[:, None], sin[:, None]
        visible = self._key_index[:bucket][None] <= slots[:, None]  # [T, bucket]
        mask = visible.repeat(c.num_groups, 1)  # query rows are (group, token)
        for layer, block in enumerate(model.layers):
            h = block.input_layernorm(x)
            x = x + _attend(block.self_attn, h, cos, sin, self.arena, layer, slots, bucket, mask)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return model.lm_head(model.norm(x[0])).float()


def _attend(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, arena: KVCache,
            layer: int, slots: torch.Tensor, bucket: int, mask: torch.Tensor) -> torch.Tensor:
    """Attention of T new tokens over the arena's first `bucket` slots (after writing theirs)."""
    c = attn.config
    _, count, _ = x.shape
    q = attn.q_proj(x).view(1, count, c.num_heads, c.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, count, c.num_kv_heads, c.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, count, c.num_kv_heads, c.head_dim).transpose(1, 2)
    q = apply_rotary(q, cos, sin, c.rotary_dim)
    k = apply_rotary(k, cos, sin, c.rotary_dim)
    arena.k[layer, 0].index_copy_(1, slots, k[0].to(arena.dtype))
    arena.v[layer, 0].index_copy_(1, slots, v[0].to(arena.dtype))
    keys = arena.k[layer, :, :, :bucket]
    values = arena.v[layer, :, :, :bucket]
    q = q.reshape(1, c.num_kv_heads, c.num_groups * count, c.head_dim).to(arena.dtype)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    out = out.view(1, c.num_heads, count, c.head_dim).transpose(1, 2).reshape(1, count, -1)
    return attn.o_proj(out.to(x.dtype))
