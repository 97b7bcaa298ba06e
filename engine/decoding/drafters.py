"""Model-free drafters for speculation, and the acceptance estimates that rank their drafts.

Data flow: the decoder hands a drafter the request's tokens so far (`TokenHistory`: prompt +
emitted ids) and `Reference` sequences (the suffix after the cursor, other open documents,
recently shown suggestions); a drafter returns `Candidate` chains, each token tagged with an
acceptance key and a prior. `AcceptanceEstimator` turns a key into an empirical probability
that the target accepts the token given that the tokens before it were accepted, learnt
online from verification results; the decoder uses it to cut chains (SpecDec++) and to choose
between drafters.

- `PromptLookup`: the longest match (up to `max_match` tokens) of the history's tail in the
  history itself or in a reference; proposes what followed the match. Key: source, match
  length, depth in the draft.
- `ModelTable` (STAND): running means of the target model's own top-k next-token
  probabilities per context of the last 1..3 tokens, filled from earlier verification passes.
  It outlives requests. Key: context order, probability decile.

Drafters know token ids only: no model, no tensors on a device, no text.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import torch


@dataclass(frozen=True)
class Reference:
    """Token ids the completion may copy from; `kind` names it in acceptance statistics."""

    kind: str  # "suffix" | "workspace" | "recent" | ...
    ids: np.ndarray  # [N] int64

    @classmethod
    def of(cls, kind: str, ids: Sequence[int]) -> Reference:
        return cls(kind, np.asarray(ids, dtype=np.int64))


@dataclass
class Candidate:
    """A chain of draft tokens from one drafter, with what the estimator needs per token."""

    source: str  # "history", a Reference.kind, or "table"
    tokens: list[int]
    keys: list[tuple]  # acceptance-statistics key per token
    priors: list[float]  # acceptance probability per token before any evidence
    q: list[dict[int, float]] | None = None  # stochastic drafts: the distribution each token came from

    def truncate(self, n: int) -> Candidate:
        q = self.q[:n] if self.q is not None else None
        return Candidate(self.source, self.tokens[:n], self.keys[:n], self.priors[:n], q)


class TokenHistory:
    """Prompt + emitted ids in a growing int64 buffer, searched by `PromptLookup`."""

    def __init__(self, ids: Sequence[int]) -> None:
        self._buf = np.zeros(max(64, 2 * len(ids)), dtype=np.int64)
        self._n = 0
        self.extend(ids)

    def __len__(self) -> int:
        return self._n

    def extend(self, ids: Sequence[int]) -> None:
        need = self._n + len(ids)
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf)), dtype=np.int64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = ids
        self._n = need

    @property
    def array(self) -> np.ndarray:  # [n] int64, a view
        return self._buf[: self._n]

    def tail(self, k: int) -> list[int]:
        return self._buf[max(0, self._n - k) : self._n].tolist()


class AcceptanceEstimator:
    """Beta-smoothed acceptance frequencies per key, halved when a key's count passes `horizon`.

    The prior (the drafter's own guess) weighs as `prior_strength` observations; halving keeps
    the estimate following the model and the workload instead of averaging all history.
    """

    def __init__(self, prior_strength: float = 3.0, horizon: float = 400.0) -> None:
        self.prior_strength = prior_strength
        self.horizon = horizon
        self.counts: dict[tuple, list[float]] = {}  # key -> [accepted, tried]

    def estimate(self, key: tuple, prior: float) -> float:
        accepted, tried = self.counts.get(key, (0.0, 0.0))
        return (accepted + prior * self.prior_strength) / (tried + self.prior_strength)

    def update(self, key: tuple, accepted: bool) -> None:
        c = self.counts.setdefault(key, [0.0, 0.0])
        c[0] += accepted
        c[1] += 1.0
        if c[1] > self.horizon:
            c[0] *= 0.5
            c[1] *= 0.5


def _lookup_prior(match: int, depth: int) -> float:
    """A guess before evidence: longer matches and deeper (already-accepted) copies hold better."""
    return min(0.9, 0.3 + 0.07 * min(match, 8) + 0.03 * min(depth, 8))


class PromptLookup:
    """Copy what followed the longest earlier occurrence of the last tokens (n <= `max_match`).

    The history and the references are searched in one pass over one buffer (`_Sources`), made
    once per request (for a new history or new references); then each step only copies the
    tokens the history gained. A history only grows, and a reference's ids never change.
    """

    def __init__(self, max_match: int = 8) -> None:
        self.max_match = max_match
        self._sources: _Sources | None = None

    def propose(self, history: TokenHistory, references: Sequence[Reference], max_len: int,
                max_candidates: int = 1) -> list[Candidate]:
        """Up to `max_candidates` distinct continuations, longest match first, then latest."""
        if max_len <= 0 or len(history) == 0:
            return []
        sources = self._sources
        if sources is None or not sources.holds(history, references):
            self._sources = sources = _Sources(history, references)
        sources.sync()
        out, seen, per_source = [], set(), [0] * (len(references) + 1)
        for length, source, pos in sources.matches(history.tail(self.max_match)):
            if per_source[source] == max_candidates:  # each source offers its best `max_candidates`
                continue
            per_source[source] += 1
            src = history.array if source == len(references) else references[source].ids
            tokens = src[pos + 1 : pos + 1 + max_len].tolist()
            if not tokens or tuple(tokens) in seen:
                continue
            seen.add(tuple(tokens))
            kind = "history" if source == len(references) else references[source].kind
            keys, priors = _lookup_chain(kind, min(length, self.max_match), len(tokens))
            out.append(Candidate(kind, tokens, list(keys), list(priors)))
            if len(out) >= max_candidates:
                break
        return out


@functools.lru_cache(maxsize=4096)
def _lookup_chain(kind: str, match: int, n: int) -> tuple[tuple[tuple, ...], tuple[float, ...]]:
    """Acceptance keys (source, match length, depth in the draft) and priors of n copied tokens."""
    return (tuple(("lookup", kind, match, min(j, 8)) for j in range(n)),
            tuple(_lookup_prior(match, j) for j in range(n)))


_SEP = -1  # before each source in `_Sources`: equal to no token, so no match spans two sources
_LAST = -2  # in place of each reference's last token: no match ends there, as nothing follows it


class _Sources:
    """The references, then the history, in one int64 buffer: `[SEP, ref 0, SEP, ref 1, ..., SEP,
    history]`, each reference's last token replaced by `_LAST`; the history's new tokens are
    appended by `sync`."""

    def __init__(self, history: TokenHistory, references: Sequence[Reference]) -> None:
        self.history = history
        self.arrays = [r.ids for r in references]  # held, so that identity says "the same references"
        sizes = np.array([1 + len(a) for a in self.arrays] + [1], dtype=np.int64)  # each after a SEP
        self.starts = np.cumsum(sizes) - sizes + 1  # [n refs + 1]: first token of each, the history last
        self.orders = np.roll(np.arange(len(sizes)), -1)  # rank: the history first, then the references
        self.buf = np.full(int(sizes.sum()) + max(64, 2 * len(history)), _SEP, dtype=np.int64)
        for start, a in zip(self.starts[:-1].tolist(), self.arrays, strict=True):
            self.buf[start : start + len(a)] = a
            if len(a):
                self.buf[start + len(a) - 1] = _LAST
        self.n = int(self.starts[-1])  # tokens of `buf` in use

    def holds(self, history: TokenHistory, references: Sequence[Reference]) -> bool:
        return history is self.history and len(references) == len(self.arrays) and all(
            r.ids is a for r, a in zip(references, self.arrays, strict=True))

    def sync(self) -> None:
        """Copy in the tokens the history gained since the last call."""
        have = self.n - int(self.starts[-1])
        new = self.history.array[have:]
        if self.n + len(new) > len(self.buf):
            grown = np.full(2 * (self.n + len(new)), _SEP, dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + len(new)] = new
        self.n += len(new)

    def matches(self, tail: Sequence[int]) -> list[tuple[int, int, int]]:
        """(match length, source, end position in the source) of every suffix match of `tail`,
        longest first, then the history before the references (it is what the model attends
        to), then latest.

        A match ends at a position that something of its source follows, so it never is the
        tail itself in the history.
        """
        buf = self.buf[: self.n]
        cand = np.flatnonzero(buf[:-1] == tail[-1])
        if len(cand) == 0:
            return []
        # [cand, k]: whether the k-th token back from the candidate is the tail's k-th from its
        # end; a SEP (also at index 0, for k past the buffer's start) ends a match, and so
        # does the last column (no entry of `buf` is -3)
        back = np.maximum(cand[:, None] - np.arange(len(tail) + 1), 0)
        same = buf[back] == np.array([*tail[::-1], -3], dtype=np.int64)
        length = same.argmin(axis=1)  # the first mismatch
        source = np.searchsorted(self.starts, cand, side="right") - 1
        pos = cand - self.starts[source]
        ranked = np.lexsort((-pos, self.orders[source], -length))
        return list(zip(length[ranked].tolist(), source[ranked].tolist(), pos[ranked].tolist(), strict=True))


class _Entry:
    """Running sums of the top-k probabilities seen after one context, and how many passes."""

    __slots__ = ("count", "sums", "_best")

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[int, float] = {}
        self._best: tuple[int, float] | None = None  # best(), until the next merge

    def merge(self, pairs: Sequence[tuple[int, float]], keep: int) -> None:
        """Add one pass's (token, probability) pairs; past 2 * `keep` tokens, keep the `keep` largest."""
        self.count += 1
        self._best = None
        sums = self.sums
        for t, p in pairs:
            sums[t] = sums.get(t, 0.0) + p
        if len(sums) > 2 * keep:
            self.sums = dict(sorted(sums.items(), key=itemgetter(1), reverse=True)[:keep])

    def means(self) -> dict[int, float]:
        return {t: s / self.count for t, s in self.sums.items()}

    def best(self) -> tuple[int, float]:
        """The token of the largest mean (the first one seen of equal means) and that mean."""
        if self._best is None:
            means = [s / self.count for s in self.sums.values()]
            best = max(means)
            self._best = (list(self.sums)[means.index(best)], best)
        return self._best


class ModelTable:
    """STAND-style table: context (last n tokens) -> running mean of the model's top-k probabilities.

    `update` merges one verification row's top-k; a token missing from a row's top-k counts as
    0 for that row, so the mean is an average distribution. Each entry keeps its `keep` largest
    tokens; the least recently used contexts go past `max_contexts`.
    """

    def __init__(self, orders: Sequence[int] = (3, 2, 1), top_k: int = 10, keep: int = 12,
                 max_contexts: int = 200_000) -> None:
        self.orders = tuple(sorted(orders, reverse=True))
        self.max_order = self.orders[0]
        self.top_k = top_k
        self.keep = keep
        self.max_contexts = max_contexts
        self.entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.rows_merged = 0

    def __len__(self) -> int:
        return len(self.entries)

    def update(self, context: Sequence[int], ids: Sequence[int], probs: Sequence[float]) -> None:
        """Merge the top-k (`ids`, `probs`) the model gave after `context`."""
        self.update_row(context, (), [ids], [probs])

    def update_row(self, tail: Sequence[int], drafts: Sequence[int], top_ids: Sequence[Sequence[int]],
                   top_probs: Sequence[Sequence[float]]) -> None:
        """Merge a verification row's top-k: after `tail + drafts[:i]` at its position i."""
        context = (*tail, *drafts)
        entries = self.entries
        for i in range(min(len(drafts) + 1, len(top_ids))):
            self.rows_merged += 1
            end = len(tail) + i
            pairs = list(zip(top_ids[i], top_probs[i], strict=True))
            for n in self.orders:
                if end < n:
                    continue
                key = context[end - n : end]
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = _Entry()
                    if len(entries) > self.max_contexts:
                        entries.popitem(last=False)
                else:
                    entries.move_to_end(key)
                entry.merge(pairs, self.keep)

    def lookup(self, context: Sequence[int]) -> tuple[int, dict[int, float]] | None:
        """(order, token -> mean probability) for the longest known context, or None."""
        found = self._find(context)
        return None if found is None else (found[0], found[1].means())

    def _find(self, context: Sequence[int]) -> tuple[int, _Entry] | None:
        for n in self.orders:
            if len(context) < n:
                continue
            entry = self.entries.get(tuple(context[-n:]))
            if entry is not None:
                return n, entry
        return None

    def propose(self, tail: Sequence[int], max_len: int, *, branches: int = 1,
                temperature: float = 0.0, generator: torch.Generator | None = None) -> list[Candidate]:
        """Chains walking the table from `tail`.

        temperature 0: up to `branches` chains, one per top first token, each continued by the
        most probable next token (point-mass drafts). temperature > 0: one chain sampled from
        q ∝ mean^(1/T) (stochastic drafts carrying q, verified with min(1, p/q)).
        """
        out = []
        first = self.lookup(tail)
        if max_len <= 0 or first is None:
            return out
        if temperature > 0:
            cand = self._sampled_chain(list(tail), max_len, temperature, generator)
            return [cand] if cand.tokens else []
        order, dist = first
        for token, prob in sorted(dist.items(), key=lambda kv: kv[1], reverse=True)[:branches]:
            cand = Candidate("table", [token], [("table", order, _decile(prob))], [prob])
            ctx = [*tail, token]
            while len(cand.tokens) < max_len:
                found = self._find(ctx[-self.max_order:])
                if found is None:
                    break
                order_j, entry = found
                token_j, prob_j = entry.best()
                cand.tokens.append(token_j)
                cand.keys.append(("table", order_j, _decile(prob_j)))
                cand.priors.append(prob_j)
                ctx.append(token_j)
            out.append(cand)
        return out

    def _sampled_chain(self, ctx: list[int], max_len: int, temperature: float,
                       generator: torch.Generator | None) -> Candidate:
        cand = Candidate("table", [], [], [], q=[])
        while len(cand.tokens) < max_len:
            found = self.lookup(ctx[-self.max_order:])
            if found is None:
                break
            order, dist = found
            ids = list(dist)
            weights = torch.tensor([dist[t] for t in ids], dtype=torch.float64).clamp_min(1e-12)
            weights = weights.pow(1.0 / temperature)
            weights = weights / weights.sum()
            pick = int(torch.multinomial(weights, 1, generator=generator))
            token = ids[pick]
            q = dict(zip(ids, weights.tolist(), strict=True))
            cand.tokens.append(token)
            cand.keys.append(("table", order, _decile(q[token])))
            cand.priors.append(q[token])
            cand.q.append(q)
            ctx.append(token)
        return cand


def _decile(p: float) -> int:
    return min(9, int(p * 10))
