"""The model runner: one Transformer, its CUDA graphs and its KV pool.

The Transformer (engine/model.py) is a plain nn.Module: its forward is always the eager one, and
it knows nothing of graphs or pools. A `ModelRunner` owns the model together with what makes its
forwards fast on a GPU: a `StaticForward` (engine/static_decode.py) that replays small batch-1
forwards as CUDA graphs, and a `KVPool` (engine/kv_pool.py) that every document's cache is a
region of. Whatever runs forwards — decoding strategies, edit_cache's documents and views, the
language server's backend — holds the runner:

    runner(ids, positions, write=..., context=[Span, ...]) -> the static forward (a graph
        replay) where it serves the shape, else the model's eager forward -> logits
    runner.new_cache(capacity) -> a region of the pool where there is one, else a buffer

Chains on the device (greedy `chain`, speculation's `lookup_chain`, superposed steps, beam
lanes) call the static forward itself: `runner.static`, None while graphs are off.

When the model's weights become new tensors (`.to()`, `load_state_dict`) its graphs would keep
reading the old ones: the model calls the runner back (`Transformer.on_weights_replaced`), and
the runner drops them until `enable_graphs` is called again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from editkv.engine import faults
from editkv.engine.config import ModelConfig
from editkv.engine.kv_pool import KVPool, pool_slots, wanted
from editkv.engine.model import KVCache, Span, TokenGroup, Transformer, check_forward
from editkv.engine.pacing import Pacer
from editkv.engine.rope import Rotary
from editkv.engine.static_decode import StaticForward

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs `model`'s forwards: through its static forward (CUDA graphs) where that serves, else
    eagerly; owns its KV pool (see the module docstring)."""

    # no attributes beyond these: a setting meant for the model (`attention`, a patched `forward`)
    # set on the runner by mistake fails instead of being ignored
    __slots__ = ("model", "_static", "_kv_pool", "_pacer", "__weakref__")

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._static: StaticForward | None = None
        self._kv_pool: KVPool | None = None
        self._pacer: Pacer | None = None
        model.on_weights_replaced(self._weights_replaced)

    # ---- what callers read off the model ------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def rotary(self) -> Rotary:
        """The model's RoPE tables (edit_cache re-rotates keys with them)."""
        return self.model.rotary

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ids `[B, T]` -> `[B, T, hidden]` (the model's)."""
        return self.model.embed(ids)

    @property
    def pacer(self) -> Pacer:
        """The one pacer of every interruptible encoding loop on this model's device: shared, so
        that the host stays one chunk ahead across loops too (background jobs of one chunk each
        would otherwise queue a chunk apiece without waiting; engine/pacing.py)."""
        if self._pacer is None or self._pacer.device != self.device:
            self._pacer = Pacer(self.device)
        return self._pacer

    # ---- graphs -------------------------------------------------------------------------------

    @property
    def static(self) -> StaticForward | None:
        """The static forward small batch-1 forwards go through (graphs), or None."""
        return self._static

    @property
    def replays_graphs(self) -> bool:
        """Whether small forwards replay CUDA graphs (`static` in "graphs" mode; its "static" mode
        runs the same ops eagerly, as tests on the CPU do)."""
        return self._static is not None and self._static.mode == "graphs"

    def enable_graphs(self, **options) -> StaticForward:
        """Run batch-1 forwards of few tokens through a new static forward (`options`: StaticForward's):
        replayed CUDA graphs where their spans allow it; other forwards, and every forward on the
        CPU, stay eager."""
        self.use_graphs(StaticForward(self.model, **options))
        return self._static

    def use_graphs(self, static: StaticForward | None) -> StaticForward | None:
        """Run small forwards through `static` (a StaticForward of this runner's model; None: every
        forward eagerly); the one in use before, its graphs kept, so that it can be put back."""
        if static is not None and static.model is not self.model:
            raise ValueError("that StaticForward belongs to another model")
        previous, self._static = self._static, static
        return previous

    def disable_graphs(self) -> StaticForward | None:
        """Run every forward eagerly from now on; the static forward that was in use, or None."""
        return self.use_graphs(None)

    def _weights_replaced(self) -> None:
        if self._static is not None:
            log.warning("the model's weights changed: CUDA graphs turned off until enable_graphs is called again")
            self._static = None

    # ---- KV buffers ---------------------------------------------------------------------------

    @property
    def kv_pool(self) -> KVPool | None:
        """The pool `new_cache` takes batch-1 buffers from, or None."""
        return self._kv_pool

    def install_pool(self, budget_bytes: int | None) -> KVPool | None:
        """A pool of `budget_bytes` (the KV budget; kv_pool.DEFAULT_BYTES when unlimited), or none
        when the runner does not want one (`kv_pool.wanted`: where graphs replay); the pool now in
        use. A pool of the same size is kept; an old one lives on until its last region goes."""
        if not wanted(self.replays_graphs):
            self._kv_pool = None
            return None
        slots = pool_slots(self.config, budget_bytes, dtype=self.dtype, device=self.device)
        pool = self._kv_pool
        if pool is not None and pool.slots == slots:
            return pool
        self._kv_pool = KVPool(self.config, slots, dtype=self.dtype, device=self.device) if slots > 0 else None
        return self._kv_pool

    def use_pool(self, pool: KVPool | None) -> None:
        """New batch-1 caches are regions of `pool` (one of this model's shape and dtype), or with
        None buffers of their own."""
        self._kv_pool = pool

    def drop_pool(self) -> None:
        """New caches are buffers of their own from now on (the pool lives on until its last region
        goes); `install_pool` makes a new one."""
        self.use_pool(None)

    def new_cache(self, capacity: int, *, batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        """A KV buffer on the model's device in the model's dtype: slots of the KV pool when there
        is one with room, else a buffer of its own."""
        pool = self._kv_pool
        if pool is not None and batch == 1 and (dtype is None or dtype == pool.dtype):
            cache = pool.allocate(capacity)
            if cache is not None:
                return cache
        return KVCache.allocate(self.config, capacity, batch=batch, dtype=dtype or self.dtype, device=self.device)

    # ---- forwards -----------------------------------------------------------------------------

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
        """`Transformer.forward`, through the static forward (a graph replay) where it serves the
        forward's shape, else the model's eager forward."""
        static = self._static
        if static is not None:
            context, groups = check_forward(input_ids, positions, write, write_at, context, input_embeds, groups)
            if groups is None:
                handled, out = static.forward(input_ids, positions, write, write_at, context, logits,
                                              embeds=input_embeds)
                if handled:
                    faults.hit("forward")  # every forward passes the site once (the eager one in the model)
                    return out
        return self.model(input_ids, positions, write=write, write_at=write_at, context=context, logits=logits,
                          input_embeds=input_embeds, groups=groups)

    def __call__(self, *args, **kwargs) -> torch.Tensor | None:
        """`runner(...)` is `runner.forward(...)` (looked up on the instance, as nn.Module does)."""
        return self.forward(*args, **kwargs)
