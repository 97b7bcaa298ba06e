"""One KV buffer that every document's cache is a region of.

CUDA graphs bake in the addresses they read. With one buffer per document, a graph captured for
one document's repair serves no other document, and a document that moves to a bigger buffer
captures its graphs again (engine/static_decode.py keys graphs by buffer). With every document a
region of one pool, the graphs read the pool and take the region's first slot as a device
input: one graph per shape (tokens written, slots attended, rows of logits) serves them all.

A region is a `KVCache` whose `base` is the pool's buffer and whose `offset` is its first slot;
its `k`, `v` are views of the pool's. Regions are carved first-fit from a sorted list of free
runs; one that must grow takes the free run right after it when there is one, else moves to a
new region (its kept slots copied), and when the pool has no run large enough it leaves the pool
for a buffer of its own (still correct; its forwards replay graphs of their own, as before the
pool). When no free run is large enough, the pool asks its owner to give something back first
(`reclaim`: the document cache evicts its least recently used document), so that a document that
would fit after an eviction does not leave the pool (a buffer of its own replays graphs of its
own, captured on keystrokes: likely most of the captures after the warm-up in session 16's
50-document H100 replay). A region goes back to the free list when its last reference goes (a
finalizer), so callers never free by hand. The pool's last slot belongs to no region: the static
forward's padding rows write there.

Windows of a region (a view's scratch) lie inside it and hold it alive. A region that moves
while a window of it is alive leaves that window pointing at the old slots: regions grow only in
repairs and allocations, before a request's views take their windows.
"""

from __future__ import annotations

import bisect
import os
import weakref
from collections.abc import Callable

import torch
from editkv.engine.config import ModelConfig
from editkv.engine.model import KVCache


class KVPool:
    """`slots` slots of K/V for `config` in one buffer, handed out as regions (see the module docstring)."""

    def __init__(self, config: ModelConfig, slots: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        if slots < 1:
            raise ValueError(f"a pool needs at least one slot, not {slots}")
        self.buffer = KVCache.allocate(config, slots + 1, dtype=dtype, device=device)  # + the padding slot
        self.slots = slots
        self._free: list[tuple[int, int]] = [(0, slots)]  # sorted (start, size) runs, never adjacent
        self._released: list[list[int]] = []  # given back by finalizers; merged into _free at the next call
        self.allocations = 0
        self.moves = 0  # regions moved to grow
        self.left = 0  # regions that could not fit and took a buffer of their own
        self.reclaims = 0  # times `reclaim` gave slots back so that a region could fit
        # the owner's hook for a pool without room: reclaim(keep) drops one cache other than `keep`
        # (a region growing; None when allocating) and says whether it did; None: no owner
        self.reclaim: Callable[[KVCache | None], bool] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def slot_bytes(self) -> int:
        return self.buffer.slot_bytes()

    def allocate(self, capacity: int) -> KVCache | None:
        """A zeroed region of `capacity` slots, or None when no free run is that large."""
        self._collect()
        start = self._take(capacity)
        while start is None and self._reclaimed(None):
            start = self._take(capacity)
        if start is None:
            return None
        region = KVCache(*self._views(start, capacity), self.buffer, start, pool=self)
        region.k.zero_()
        region.v.zero_()
        record = [start, capacity]  # what the finalizer gives back (resize updates it in place)
        region.pool_slots = record
        weakref.finalize(region, self._released.append, record)
        self.allocations += 1
        return region

    def resize(self, region: KVCache, capacity: int, keep: int, needed: int) -> bool:
        """Give `region` `capacity` slots (at least `needed` when growing), its first `keep` slots
        kept: shrunk or grown in place, or moved. False: it can't have `needed` (the caller moves
        it to a buffer of its own)."""
        self._collect()
        record = region.pool_slots
        start, size = record
        if capacity <= size:  # shrink: the tail goes back
            self._give(start + capacity, size - capacity)
            record[1] = capacity
            region.k, region.v = self._views(start, capacity)
            return True
        while True:  # in place, else moved, else once more after the owner gave something back
            grown = self._extend(start + size, capacity - size, needed - size)
            if grown is not None:
                break
            for want in (capacity, needed):
                new = self._take(want)
                if new is not None:
                    break
            if new is not None or not self._reclaimed(region):
                break
        if grown is not None:
            self.buffer.k[:, :, :, start + size : start + size + grown].zero_()
            self.buffer.v[:, :, :, start + size : start + size + grown].zero_()
            record[1] = size + grown
            region.k, region.v = self._views(start, size + grown)
            return True
        if new is None:
            self.left += 1
            return False
        k, v = self._views(new, want)
        k.zero_()
        v.zero_()
        k[:, :, :, :keep] = region.k[:, :, :, :keep]
        v[:, :, :, :keep] = region.v[:, :, :, :keep]
        self._give(start, size)
        record[0], record[1] = new, want
        region.k, region.v, region.offset = k, v, new
        self.moves += 1
        return True

    def release(self, region: KVCache) -> None:
        """`region` leaves the pool now (it is taking a buffer of its own): its slots are free."""
        record = region.pool_slots
        if record[1]:
            self._give(record[0], record[1])
            record[1] = 0  # the finalizer, when it runs, gives nothing back

    def _reclaimed(self, keep: KVCache | None) -> bool:
        """Whether the owner gave slots back (then merged into the free runs) for want of room."""
        if self.reclaim is None or not self.reclaim(keep):
            return False
        self._collect()
        self.reclaims += 1
        return True

    def used_slots(self) -> int:
        self._collect()
        return self.slots - sum(size for _, size in self._free)

    def _views(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer.k[:, :, :, start : start + size], self.buffer.v[:, :, :, start : start + size]

    def _collect(self) -> None:
        """Merge the runs finalizers gave back (they only append, so they may run at any time)."""
        while self._released:
            record = self._released.pop()
            if record[1]:
                self._give(record[0], record[1])
                record[1] = 0

    def _take(self, size: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, free - size)
                return start
        return None

    def _extend(self, at: int, wanted: int, least: int) -> int | None:
        """Take up to `wanted` (at least `least`) slots of the free run starting at `at`."""
        i = bisect.bisect_left(self._free, (at, 0))
        if i == len(self._free) or self._free[i][0] != at or self._free[i][1] < least:
            return None
        free = self._free[i][1]
        got = min(wanted, free)
        if got == free:
            del self._free[i]
        else:
            self._free[i] = (at + got, free - got)
        return got

    def _give(self, start: int, size: int) -> None:
        if size <= 0:
            return
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] == start + size:  # merge with the run after
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and the one before
            start, size = self._free[i - 1][0], self._free[i - 1][1] + size
            self._free[i - 1] = (start, size)
        else:
            self._free.insert(i, (start, size))


DEFAULT_BYTES = 1 << 30  # a pool's size when the KV budget is unlimited
DEVICE_SHARE = 0.5  # at most this share of the device's free memory (CUDA) at creation


def wanted(replays_graphs: bool) -> bool:
    """Whether a runner should take its caches from a pool: when its small forwards replay CUDA
    graphs (what the pool is for). EDITKV_KV_POOL=1 or 0 overrides (tests run pools on the CPU)."""
    forced = os.environ.get("EDITKV_KV_POOL", "")
    if forced in ("0", "1"):
        return forced == "1"
    return replays_graphs


def pool_slots(config: ModelConfig, budget_bytes: int | None, *, dtype: torch.dtype, device: torch.device) -> int:
    """How many slots a pool of `budget_bytes` (the KV budget; DEFAULT_BYTES when unlimited) gets,
    on CUDA at most DEVICE_SHARE of the device's free memory (`ModelRunner.install_pool`)."""
    slot_bytes = KVCache.allocate(config, 1, dtype=dtype, device="meta").slot_bytes()
    size = budget_bytes or DEFAULT_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = min(size, int(free * DEVICE_SHARE))
    return size // slot_bytes - 1
