"""Token n-gram tables: the most frequent next tokens after each context of 1..N-1 tokens.

Built with numpy from a token stream (a corpus or a document), pruned to the `top_k` next
tokens per context and to contexts seen at least `min_count` times, saved as one .npz. A
context of c tokens is hashed to 50 bits (a 64-bit polynomial hash, shifted), so lookups are
one binary search per order. Used as the n-gram baseline of bench/default_model.py and as
the corpus side of superposed decoding's n-gram interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from editkv.kernels.context_hash import BITS, MULT, SHIFT

_MULT = np.uint64(MULT)  # kernels/context_hash.py defines the hash; this is its numpy form
_VOCAB_BITS = 14  # vocabularies up to 16384 ids are packed next to the context hash
_LIMIT = 1 << _VOCAB_BITS


def _context_hashes(tokens: np.ndarray, c: int) -> np.ndarray:
    """Hash of tokens[i-c:i] for every i in [c, len]: `[len - c + 1]` uint64 (50 significant bits)."""
    t = tokens.astype(np.uint64)
    n = len(t) - c + 1
    h = np.full(n, np.uint64(c), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(c):
            h = (h ^ (t[j : j + n] + np.uint64(1))) * _MULT
            h ^= h >> np.uint64(SHIFT)
        h = h * _MULT  # spread the last token's bits into the high bits we keep
    return h >> np.uint64(64 - BITS)


def _hash_one(context: list[int], c: int) -> int:
    return int(_context_hashes(np.asarray(context[-c:], dtype=np.int64), c)[0])


@dataclass
class NgramTable:
    """Per order c (context length): sorted context hashes, top next tokens and their counts."""

    max_order: int
    hashes: dict[int, np.ndarray]  # c -> [num_contexts] uint64, sorted
    next_ids: dict[int, np.ndarray]  # c -> [num_contexts, top_k] int32 (-1 = none)
    counts: dict[int, np.ndarray]  # c -> [num_contexts, top_k] uint32

    @classmethod
    def build(cls, tokens: np.ndarray, max_order: int = 4, top_k: int = 4, min_count: int = 1,
              separator: int | None = None) -> NgramTable:
        """Count next tokens after every context of 1..max_order-1 tokens of `tokens`.

        Contexts that span `separator` (document boundaries) are skipped.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and int(tokens.max()) >= _LIMIT:
            raise ValueError(f"n-gram tables pack ids below {_LIMIT}")
        hashes, next_ids, counts = {}, {}, {}
        for c in range(1, max_order):
            if len(tokens) <= c:
                hashes[c] = np.zeros(0, np.uint64)
                next_ids[c] = np.zeros((0, top_k), np.int32)
                counts[c] = np.zeros((0, top_k), np.uint32)
                continue
            ctx = _context_hashes(tokens[:-1], c)  # context ending before position i = c..len-1
            nxt = tokens[c:].astype(np.uint64)
            keep = np.ones(len(nxt), dtype=bool)
            if separator is not None:
                sep = tokens == separator
                window = np.zeros(len(nxt), dtype=bool)
                for j in range(c + 1):  # the context or the next token is a separator
                    window |= sep[j : j + len(nxt)]
                keep &= ~window
            pair = (ctx[keep] << np.uint64(_VOCAB_BITS)) | nxt[keep]
            uniq, cnt = np.unique(pair, return_counts=True)
            ctx_u = uniq >> np.uint64(_VOCAB_BITS)
            tok_u = (uniq & np.uint64(_LIMIT - 1)).astype(np.int32)
            order = np.lexsort((-cnt, ctx_u))  # by context, most frequent first
            ctx_u, tok_u, cnt = ctx_u[order], tok_u[order], cnt[order]
            starts = np.flatnonzero(np.r_[True, ctx_u[1:] != ctx_u[:-1]])
            totals = np.add.reduceat(cnt, starts)
            rank = np.arange(len(ctx_u)) - np.repeat(starts, np.diff(np.r_[starts, len(ctx_u)]))
            group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(ctx_u)]))
            kept_groups = totals >= min_count
            sel = (rank < top_k) & kept_groups[group]
            remap = np.cumsum(kept_groups) - 1
            n_ctx = int(kept_groups.sum())
            ids = np.full((n_ctx, top_k), -1, np.int32)
            cts = np.zeros((n_ctx, top_k), np.uint32)
            ids[remap[group[sel]], rank[sel]] = tok_u[sel]
            cts[remap[group[sel]], rank[sel]] = cnt[sel]
            hashes[c] = ctx_u[starts][kept_groups]
            next_ids[c], counts[c] = ids, cts
        return cls(max_order, hashes, next_ids, counts)

    def lookup(self, context: list[int], c: int) -> tuple[np.ndarray, np.ndarray]:
        """(next ids, counts) seen after the last `c` tokens of `context` (empty if unseen)."""
        if c < 1 or c >= self.max_order or len(context) < c:
            return np.zeros(0, np.int32), np.zeros(0, np.uint32)
        h = np.uint64(_hash_one(context, c))
        table = self.hashes[c]
        i = int(np.searchsorted(table, h))
        if i >= len(table) or table[i] != h:
            return np.zeros(0, np.int32), np.zeros(0, np.uint32)
        ids, cts = self.next_ids[c][i], self.counts[c][i]
        valid = ids >= 0
        return ids[valid], cts[valid]

    def predict(self, context: list[int]) -> int | None:
        """Most frequent next token after the longest seen context (None if none is seen)."""
        for c in range(min(self.max_order - 1, len(context)), 0, -1):
            ids, _ = self.lookup(context, c)
            if len(ids):
                return int(ids[0])
        return None

    def distribution(self, context: list[int], c: int) -> dict[int, float]:
        """Relative frequencies of the kept next tokens after the last `c` tokens."""
        ids, cts = self.lookup(context, c)
        total = float(cts.sum())
        return {int(i): float(n) / total for i, n in zip(ids, cts, strict=True)} if total else {}

    def nbytes(self) -> int:
        return sum(a.nbytes for d in (self.hashes, self.next_ids, self.counts) for a in d.values())

    def save(self, path: Path) -> None:
        arrays = {"max_order": np.array(self.max_order)}
        for c in self.hashes:
            arrays[f"h{c}"], arrays[f"i{c}"], arrays[f"n{c}"] = self.hashes[c], self.next_ids[c], self.counts[c]
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> NgramTable:
        data = np.load(path)
        max_order = int(data["max_order"])
        orders = range(1, max_order)
        return cls(max_order, {c: data[f"h{c}"] for c in orders}, {c: data[f"i{c}"] for c in orders},
                   {c: data[f"n{c}"] for c in orders})


def main(argv: list[str] | None = None) -> None:
    """`python -m editkv.engine.ngram TOKENS OUT.npz`: build a table from a uint16 token file."""
    import argparse
    import time

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("tokens", type=Path, help="raw uint16 token ids (the training corpus)")
    p.add_argument("out", type=Path)
    p.add_argument("--max-tokens", type=int, default=60_000_000, help="use the first N tokens")
    p.add_argument("--max-order", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--separator", type=int, default=0, help="document separator id (<|endoftext|>)")
    p.add_argument("--max-bytes", type=int, default=15_000_000, help="raise min-count until the file fits")
    args = p.parse_args(argv)
    tokens = np.memmap(args.tokens, dtype=np.uint16, mode="r")[: args.max_tokens]
    min_count = args.min_count
    while True:
        started = time.perf_counter()
        table = NgramTable.build(np.asarray(tokens), args.max_order, args.top_k, min_count, args.separator)
        table.save(args.out)
        size = args.out.stat().st_size
        print(f"n-gram table: {len(tokens)} tokens, min_count {min_count}, "
              f"{sum(len(h) for h in table.hashes.values())} contexts, {size / 1e6:.1f} MB, "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        if size <= args.max_bytes:
            return
        min_count *= 2


if __name__ == "__main__":
    main()
