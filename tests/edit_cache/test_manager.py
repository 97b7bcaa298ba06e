"""The document manager keeps all KV caches under one memory budget, evicting LRU documents."""

import pytest
from editkv.edit_cache.document import Document
from editkv.edit_cache.manager import DocumentCache, UnknownDocument
from editkv.edit_cache.views import left_to_right

TEXT = "def f(x):\n    return x + 1\n" * 8


@pytest.fixture(scope="module")
def simulated():
    return Document.create_simulated(TEXT)


def _manager(simulated, budget):
    from editkv.engine.config import ModelConfig

    config = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2)
    return DocumentCache(simulated.model, simulated.tokenizer, config, budget_bytes=budget)


def test_lru_documents_are_evicted_and_rebuilt(simulated):
    probe = _manager(simulated, None)
    probe.open("a", TEXT)
    one_doc = probe.prepare("a")[0].kv_bytes()
    cache = _manager(simulated, int(2.5 * one_doc))
    for key in "abc":
        cache.open(key, TEXT)
        cache.prepare(key)
    assert cache.total_kv_bytes() <= 2.5 * one_doc
    assert not cache.get("a").is_encoded and cache.get("c").is_encoded  # "a" was least recently used
    assert cache.evictions == 1
    # an evicted document still has its text and tokens, and is rebuilt on demand
    view = left_to_right(cache.prepare("a")[0], 10)
    assert view.prompt_ids[1:] == simulated.tokenizer.encode(TEXT[:10])[: len(view.prompt_ids) - 1]
    assert cache.get("a").is_encoded and cache.total_kv_bytes() <= 2.5 * one_doc


def test_the_served_document_is_never_evicted_for_itself(simulated):
    cache = _manager(simulated, 1)  # smaller than any document
    cache.open("big", TEXT)
    assert cache.prepare("big")[0].is_encoded


def test_unknown_document_is_a_clear_error(simulated):
    cache = _manager(simulated, None)
    with pytest.raises(UnknownDocument, match="not open"):
        cache.get("file:///nowhere.py")
    cache.open("x", "a = 1\n")
    cache.close("x")
    with pytest.raises(UnknownDocument):
        cache.prepare("x")


def test_the_pool_reclaims_least_recently_used_first_and_never_the_current_document(simulated):
    """`reclaim` (what a full KV pool calls before a region would leave it): the least recently
    used pooled document goes; never the one a request is being served for (the most recent)."""
    from editkv.engine.kv_pool import KVPool

    runner = simulated.model
    pool = KVPool(runner.config, 4096, dtype=runner.dtype, device="cpu")
    runner.use_pool(pool)
    try:
        cache = _manager(simulated, None)
        cache.open("a", TEXT)
        cache.prepare("a")
        assert cache.get("a").cache.pool is pool
        assert not cache.reclaim() and cache.get("a").is_encoded  # the only, so the current one: kept
        for key in "bc":
            cache.open(key, TEXT)
            cache.prepare(key)
        assert cache.reclaim() and not cache.get("a").is_encoded  # least recently used first
        assert not cache.reclaim(keep=cache.get("b").cache)  # "b" kept as asked, "c" is the current one
        assert cache.get("b").is_encoded and cache.get("c").is_encoded and cache.evictions == 1
    finally:
        runner.use_pool(None)
