"""n-gram tables: counts match a brute-force count; save/load round trip; pruning."""

from collections import Counter

import numpy as np
from editkv.engine.ngram import NgramTable


def _brute(tokens, c, sep=None):
    counts = {}
    for i in range(c, len(tokens)):
        ctx = tuple(tokens[i - c : i])
        if sep is not None and (sep in ctx or tokens[i] == sep):
            continue
        counts.setdefault(ctx, Counter())[tokens[i]] += 1
    return counts


def test_counts_match_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=3000).tolist()
    table = NgramTable.build(np.array(tokens), max_order=4, top_k=6, separator=0)
    for c in (1, 2, 3):
        brute = _brute(tokens, c, sep=0)
        assert len(table.hashes[c]) == len(brute)
        for ctx, counter in list(brute.items())[:50]:
            ids, cts = table.lookup(list(ctx), c)
            assert dict(zip(ids.tolist(), cts.tolist(), strict=True)) == dict(counter)
    table.save(tmp_path / "t.npz")
    again = NgramTable.load(tmp_path / "t.npz")
    assert again.predict([1, 2, 3]) == table.predict([1, 2, 3])


def test_predict_prefers_longest_context_and_prunes():
    tokens = [5, 6, 7] * 10 + [9, 6, 8]
    table = NgramTable.build(np.array(tokens), max_order=3, top_k=1)
    assert table.predict([9, 6]) == 8  # seen once after (9, 6)
    assert table.predict([5, 6]) == 7
    assert table.predict([42]) is None
    pruned = NgramTable.build(np.array(tokens), max_order=3, top_k=1, min_count=2)
    assert pruned.predict([9, 6]) == 7  # (9, 6) pruned: backs off to (6,) -> 7
