"""The n-gram context hash (kernels/context_hash.py) is one function in all its forms: the torch
reference, Python ints, engine/ngram.py's numpy arrays and the superposed step's device keys;
and the embedded model's shipped n-gram table still answers under it."""

import random

import numpy as np
import pytest
import torch
from editkv.engine.decoding.superposed_device import ORDERS, corpus_keys
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.ngram import NgramTable, _context_hashes
from editkv.kernels.context_hash import BITS, context_hash_int, context_hash_ref


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_every_form_gives_the_same_keys(c):
    rng = random.Random(c)
    tokens = [rng.randrange(0, 200_000) for _ in range(40)] + [0, 1, 151_935, 2**31 - 1]
    arr = np.asarray(tokens, dtype=np.int64)
    numpy_keys = _context_hashes(arr, c).tolist()  # contexts tokens[i-c:i], i = c..len
    windows = torch.tensor([tokens[i - c : i] for i in range(c, len(tokens) + 1)])
    ref = context_hash_ref(windows).tolist()
    ints = [context_hash_int(tokens[i - c : i]) for i in range(c, len(tokens) + 1)]
    assert ref == ints == numpy_keys
    assert all(0 <= k < (1 << BITS) for k in ref)
    assert len(set(ref)) > len(ref) // 2  # a hash, not a constant


def test_device_keys_add_the_order_above_the_hash():
    ctx = torch.tensor([[5, 9, 2, 7, 3], [1, 1, 1, 1, 1]])
    keys = corpus_keys(ctx, max_order=4)
    for row in range(2):
        for c in range(1, 4):
            assert keys[row, c - 1] == context_hash_int(ctx[row, ORDERS - c :].tolist()) + (c << BITS)
        assert keys[row, 3:].tolist() == [-1] * (ORDERS - 3)  # orders the table lacks


def test_the_shipped_table_is_keyed_by_this_hash():
    loaded = load_model(DEFAULT_MODEL_DIR)
    table = NgramTable.load(DEFAULT_MODEL_DIR / "ngram.npz")
    ids = loaded.tokenizer.encode("    def __init__(self):\n        self.")
    hits = sum(bool(table.distribution(ids[:end], c)) for end in range(4, len(ids)) for c in (1, 2, 3))
    assert hits >= 3 * (len(ids) - 4) // 2  # common Python: most of its contexts are in the table
    shifted = NgramTable(table.max_order, {c: h ^ np.uint64(1) for c, h in table.hashes.items()},
                         table.next_ids, table.counts)  # the same table under another hash
    assert sum(bool(shifted.distribution(ids[:end], 3)) for end in range(4, len(ids))) < hits // 3
