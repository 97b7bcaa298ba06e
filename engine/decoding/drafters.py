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

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

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
    """Copy what followed the longest earlier occurrence of the last tokens (n <= `max_match`)."""

    def __init__(self, max_match: int = 8) -> None:
        self.max_match = max_match

    def propose(self, history: TokenHistory, references: Sequence[Reference], max_len: int,
                max_candidates: int = 1) -> list[Candidate]:
        """Up to `max_candidates` distinct continuations, longest match first, then latest."""
        if max_len <= 0 or len(history) == 0:
            return []
        tail = np.asarray(history.tail(self.max_match), dtype=np.int64)
        found = []  # (match length, source order, position, source, array)
        sources = [("history", history.array)] + [(r.kind, r.ids) for r in references]
        for order, (kind, src) in enumerate(sources):
            for length, pos in _matches(src, tail, max_candidates):
                found.append((length, -order, pos, kind, src))
        # the history (order 0) wins ties: it is what the model attends to; then the latest match
        found.sort(key=lambda f: (f[0], f[1], f[2]), reverse=True)
        out, seen = [], set()
        for length, _, pos, kind, src in found:
            tokens = src[pos + 1 : pos + 1 + max_len].tolist()
            if not tokens or tuple(tokens) in seen:
                continue
            seen.add(tuple(tokens))
            m = min(length, self.max_match)
            keys = [("lookup", kind, m, min(j, 8)) for j in range(len(tokens))]
            out.append(Candidate(kind, tokens, keys, [_lookup_prior(m, j) for j in range(len(tokens))]))
            if len(out) >= max_candidates:
                break
        return out


def _matches(src: np.ndarray, tail: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """(match length, end position) of the longest suffix matches of `tail` in `src`, at most `limit`.

    A match ends at position i < len(src) - 1 (something follows it) and never is the tail
    itself when `src` is the history.
    """
    if len(src) < 2 or len(tail) == 0:
        return []
    cand = np.flatnonzero(src[:-1] == tail[-1])
    if len(cand) == 0:
        return []
    length = np.ones(len(cand), dtype=np.int64)
    alive = np.ones(len(cand), dtype=bool)
    for k in range(1, len(tail)):
        idx = cand - k
        ok = alive & (idx >= 0)
        ok[ok] = src[idx[ok]] == tail[-1 - k]
        if not ok.any():
            break
        length += ok
        alive = ok
    order = np.lexsort((-cand, -length))[:limit]  # longest, then latest
    return [(int(length[i]), int(cand[i])) for i in order]


class _Entry:
    """Running sums of the top-k probabilities seen after one context, and how many passes."""

    __slots__ = ("count", "sums")

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[int, float] = {}


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
        self.rows_merged += 1
        for n in self.orders:
            if len(context) < n:
                continue
            key = tuple(context[-n:])
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = _Entry()
                if len(self.entries) > self.max_contexts:
                    self.entries.popitem(last=False)
            else:
                self.entries.move_to_end(key)
            entry.count += 1
            sums = entry.sums
            for t, p in zip(ids, probs, strict=True):
                sums[t] = sums.get(t, 0.0) + p
            if len(sums) > 2 * self.keep:
                entry.sums = dict(sorted(sums.items(), key=lambda kv: kv[1], reverse=True)[: self.keep])

    def lookup(self, context: Sequence[int]) -> tuple[int, dict[int, float]] | None:
        """(order, token -> mean probability) for the longest known context, or None."""
        for n in self.orders:
            if len(context) < n:
                continue
            entry = self.entries.get(tuple(context[-n:]))
            if entry is not None:
                return n, {t: s / entry.count for t, s in entry.sums.items()}
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
                found = self.lookup(ctx[-self.max_order:])
                if found is None:
                    break
                order_j, dist_j = found
                token_j, prob_j = max(dist_j.items(), key=lambda kv: kv[1])
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
