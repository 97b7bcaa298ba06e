"""The KV pool: regions carved from one buffer, given back when dropped, grown in place, moved or
sent off to buffers of their own, with their slots kept."""

import gc

import pytest
import torch
from editkv.engine.kv_pool import KVPool
from editkv.engine.loading import load_model
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_model(make_checkpoint(tmp_path_factory.mktemp("m"), "llama")).config


def _fill(cache, value):
    cache.k.fill_(value)
    cache.v.fill_(-value)


def test_regions_are_views_of_the_pool_and_come_back_when_dropped(config):
    pool = KVPool(config, 100, dtype=torch.float32, device="cpu")
    a, b = pool.allocate(30), pool.allocate(50)
    assert (a.offset, b.offset) == (0, 30) and a.base is b.base is pool.buffer
    assert a.capacity == 30 and a.k.data_ptr() == pool.buffer.k[:, :, :, 0:].data_ptr()
    _fill(b, 2.0)
    assert torch.equal(pool.buffer.k[:, :, :, 30:80], b.k) and pool.buffer.k[:, :, :, 80:].abs().sum() == 0
    assert pool.allocate(21) is None and pool.used_slots() == 80  # 20 left (the last slot is the padding's)
    del a
    gc.collect()
    assert pool.used_slots() == 50
    c = pool.allocate(25)  # first fit: the run a left
    assert c.offset == 0 and c.k.abs().sum() == 0  # zeroed
    del b, c
    gc.collect()
    assert pool.used_slots() == 0 and pool.allocate(100).offset == 0  # runs merged back into one


def test_growing_takes_the_free_run_after_or_moves_keeping_slots(config):
    pool = KVPool(config, 200, dtype=torch.float32, device="cpu")
    a = pool.allocate(40)
    _fill(a, 1.0)
    a.ensure_capacity(50)  # the run after it is free: grown in place (x1.5 + 16 = 76 slots)
    assert a.offset == 0 and a.capacity == 76 and pool.moves == 0
    assert a.k[:, :, :, :40].eq(1).all() and a.k[:, :, :, 40:].eq(0).all()
    b = pool.allocate(10)  # right after a
    a.ensure_capacity(80, keep=30)  # blocked by b: moves (130 slots wanted, 114 free: the 80 needed)
    assert pool.moves == 1 and a.offset == 86 and a.capacity == 80
    assert a.k[:, :, :, :30].eq(1).all() and a.k[:, :, :, 30:].eq(0).all() and a.v[:, :, :, :30].eq(-1).all()
    assert pool.used_slots() == 90  # a's old slots are free again
    window = a.window(50, 20)  # a view's scratch: a window of the pool in a's region
    assert window.base is pool.buffer and window.offset == 136 and window.region is a and window.origin == 86
    a.shrink(60)
    assert a.capacity == 60 and pool.used_slots() == 70 and a.k[:, :, :, :30].eq(1).all()
    a.ensure_capacity(400, keep=60)  # no run that large: a buffer of its own, slots kept
    assert a.base is None and a.pool is None and a.capacity == 400 and pool.left == 1
    assert a.k[:, :, :, :30].eq(1).all() and pool.used_slots() == 10
    del b
    gc.collect()
    assert pool.used_slots() == 0


def test_install_sizes_the_pool_from_the_budget_and_only_when_wanted(config, tmp_path, monkeypatch):
    loaded = load_model(make_checkpoint(tmp_path / "m", "llama"))
    model = loaded.runner
    monkeypatch.delenv("EDITKV_KV_POOL", raising=False)
    assert model.install_pool(1 << 20) is None and model.kv_pool is None  # no graphs on the CPU
    monkeypatch.setenv("EDITKV_KV_POOL", "1")
    pool = model.install_pool(1 << 20)
    slot = model.new_cache(1).slot_bytes()
    assert pool is model.kv_pool and pool.slots == (1 << 20) // slot - 1
    assert model.install_pool(1 << 20) is pool  # same size: kept
    cache = model.new_cache(64)
    assert cache.pool is pool and cache.base is pool.buffer
    assert model.new_cache(8, batch=2).pool is None  # batched buffers stay out of the pool
    assert model.new_cache(pool.slots + 1).pool is None  # too large: a buffer of its own
    monkeypatch.setenv("EDITKV_KV_POOL", "0")
    assert model.install_pool(1 << 20) is None and model.kv_pool is None


def test_a_pool_without_room_asks_its_owner_to_give_back_before_sending_a_region_away(config):
    pool = KVPool(config, 100, dtype=torch.float32, device="cpu")
    held = {"a": pool.allocate(40), "b": pool.allocate(40)}
    asked = []

    def reclaim(keep):  # the owner drops its oldest region that is not `keep`
        asked.append(keep)
        for name, region in held.items():
            if region is not keep:
                del held[name]
                return True
        return False

    pool.reclaim = reclaim
    c = pool.allocate(30)  # 20 free: "a" goes, then it fits where "a" was
    assert c is not None and c.pool is pool and c.offset == 0 and asked == [None] and list(held) == ["b"]
    assert pool.reclaims == 1 and pool.left == 0
    held["c"] = c
    _fill(c, 3.0)
    c.ensure_capacity(60, keep=30)  # blocked by b, no free run of 60: b goes (never c itself), then c grows
    assert asked[-1] is c and list(held) == ["c"] and pool.reclaims == 2
    assert c.pool is pool and c.capacity >= 60 and c.k[:, :, :, :30].eq(3).all()
    c.ensure_capacity(500, keep=30)  # nothing left to give back: a buffer of its own, slots kept
    assert c.pool is None and pool.left == 1 and c.k[:, :, :, :30].eq(3).all()
