"""Module caches per tokenizer or n-gram table are held weakly: they go when their object goes
(a model reload frees them), and a new object at a freed one's address does not get its entry."""

import gc

import numpy as np
import torch
from editkv.engine.decoding import superposed_device
from editkv.engine.decoding.superposed_device import device_corpus, heal_tables, token_rules
from editkv.engine.generate import Output, StopRules
from editkv.engine.healing import _HEALERS, healer_for
from editkv.engine.identity_cache import IdentityCache
from editkv.engine.loading import load_model
from editkv.engine.ngram import NgramTable


class Thing:
    pass


def test_entries_die_with_their_objects_and_ids_are_not_reused():
    cache = IdentityCache()
    things = [Thing() for _ in range(50)]
    for i, thing in enumerate(things):
        cache.put(thing, i)
    assert len(cache) == 50 and cache.get(things[7]) == 7
    del things, thing
    gc.collect()
    assert len(cache) == 0
    fresh = [Thing() for _ in range(50)]  # some of them sit where the old ones did
    assert all(cache.get(t) is None for t in fresh)


def test_a_dropped_tokenizer_takes_its_healer_rules_and_corpus_with_it(tmp_path):
    from helpers import make_checkpoint

    loaded = load_model(make_checkpoint(tmp_path / "m", "llama"))
    tok, vocab, cpu = loaded.tokenizer, loaded.config.vocab_size, torch.device("cpu")
    gc.collect()  # (objects of earlier tests go now, not while this one counts)
    healers, kept_rules = len(_HEALERS), len(superposed_device._RULES)
    rules = token_rules(Output(tok, StopRules(max_lines=1), b""), vocab, cpu)
    assert healer_for(tok) is rules.healer and len(_HEALERS) == healers + 1
    heal_tables(rules, b"  ", 4)
    assert rules.heal_cache and token_rules(Output(tok, StopRules(max_lines=1), b""), vocab, cpu) is rules
    table = NgramTable.build(np.array(tok.encode("def f(x):\n    return x\n") * 3, dtype=np.int64), max_order=3)
    corpus = device_corpus(table, cpu)
    assert device_corpus(table, cpu) is corpus
    corpora = len(superposed_device._CORPORA)
    del loaded, tok, rules, table, corpus
    gc.collect()
    assert len(_HEALERS) == healers and len(superposed_device._RULES) == kept_rules
    assert len(superposed_device._CORPORA) == corpora - 1
