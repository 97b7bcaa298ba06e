"""The n-gram context hash every corpus lookup uses, defined once (issue 24).

The key of a context t_1..t_c (token ids, c >= 1): start from h = c; for each token in order,
h = (h XOR (t + 1)) * MULT mod 2^64, then h ^= h >> SHIFT; finally h = h * MULT mod 2^64 (spreads
the last token's bits upward) and the key is its top BITS bits, h >> (64 - BITS). Keys of
different orders differ through the starting value; tables of several orders tell them apart
by adding c << BITS.

Written four ways, all pinned to `context_hash_ref` by tests/kernels/test_context_hash.py:
`context_hash_ref` (this torch reference, wrapping int64 arithmetic: any device, batched),
`context_hash_int` (Python ints: ~2 us a call, for host lookups), engine/ngram.py's numpy
version over whole token arrays (building tables), and the Triton kernel of
kernels/superposed_select.py (device lookups inside the superposed step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MULT = 0x9E3779B97F4A7C15  # the golden-ratio multiplier, as an unsigned 64-bit value
MULT_I64 = MULT - (1 << 64)  # the same bits as a (wrapping) signed int64
SHIFT = 29
BITS = 50  # bits of a key; a table of several orders adds `order << BITS`
_MASK64 = (1 << 64) - 1


def context_hash_int(context: Sequence[int]) -> int:
    """The key of `context` (all of it), in Python ints."""
    h = len(context)
    for t in context:
        h = ((h ^ (t + 1)) * MULT) & _MASK64
        h ^= h >> SHIFT
    return ((h * MULT) & _MASK64) >> (64 - BITS)


def _shift_right(h: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 values (as uint64 would shift)."""
    return (h >> bits) & ((1 << (64 - bits)) - 1)


def context_hash_ref(tokens: torch.Tensor) -> torch.Tensor:
    """Keys of contexts `tokens` [..., c] (int64; each row's last dimension is one context): [...] int64."""
    c = tokens.shape[-1]
    h = torch.full(tokens.shape[:-1], c, dtype=torch.long, device=tokens.device)
    for t in tokens.long().unbind(-1):
        h = (h ^ (t + 1)) * MULT_I64
        h = h ^ _shift_right(h, SHIFT)
    return _shift_right(h * MULT_I64, 64 - BITS)
