"""The verdict of one verification forward: which drafts the target accepts (greedy, sampled,
AdaDec-gated).

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from editkv.engine.decoding.adadec import Gate, Rerank
from editkv.engine.decoding.drafters import (
    Candidate,
)
from editkv.engine.decoding.speculative.output import draft_cut
from editkv.engine.decoding.speculative.planning import Plan
from editkv.engine.generate import Output
from editkv.engine.sampling import SamplingParams, sampling_probs


@dataclass(frozen=True)
class Verdict:
    """Verification result: the row kept, how many of its drafts were accepted, the target's next token."""

    row: int
    accepted: int
    token: int


def verify(
    drafts: Sequence[Sequence[int]],
    *,
    argmax: Sequence[Sequence[int]] | None = None,  # greedy: [B][T] target argmax per row position
    probs: torch.Tensor | None = None,  # sampling: [B, T, V] target distribution per row position
    q: Sequence[torch.Tensor] | None = None,  # stochastic drafts (one row): [V] per draft token
    generator: torch.Generator | None = None,
) -> Verdict:
    """Walk the rows (a token tree whose branches are rows) along the target's choices.

    At each depth the target picks a token from the distribution of any row still on the path
    (they share the context up to there); rows whose draft differs drop out; when none is left,
    the picked token is the bonus. Each emitted token is thus drawn from the target's own
    conditional: greedy output equals plain greedy decoding, sampled output keeps its
    distribution. A stochastic draft d ~ q is accepted with probability min(1, p(d)/q(d)) and
    a rejection resamples from norm(max(p - q, 0)) (Leviathan et al.).
    """
    assert (argmax is None) != (probs is None), "give argmax (greedy) or probs (sampling)"
    assert q is None or len(drafts) == 1, "stochastic drafts are verified as a single row"
    alive = list(range(len(drafts)))
    depth = 0
    while True:
        r = alive[0]
        if argmax is not None:
            token = argmax[r][depth]
        else:
            p = probs[r, depth]
            if q is not None and depth < len(drafts[r]):
                d = drafts[r][depth]
                ratio = float(p[d]) / float(q[depth][d])
                if float(torch.rand((), generator=generator)) < ratio:
                    depth += 1
                    continue
                residual = (p - q[depth]).clamp_min(0.0)
                total = float(residual.sum())
                pick_from = residual / total if total > 0 else p
                return Verdict(r, depth, int(torch.multinomial(pick_from, 1, generator=generator)))
            token = int(torch.multinomial(p, 1, generator=generator))
        alive = [b for b in alive if depth < len(drafts[b]) and drafts[b][depth] == token]
        if not alive:
            return Verdict(r, depth, token)
        depth += 1


def judge(
    logits: torch.Tensor,  # [B, T, V] fp32
    plan: Plan,
    out: Output,
    params: SamplingParams,
    generator: torch.Generator | None,
    top_k: int,
) -> tuple[Verdict, list[float], list[list[int]], list[list[float]]]:
    """Verify the plan's drafts: (verdict, log-prob of each emitted token, top-k ids and probs at
    the kept row's positions, for the table)."""
    drafts = plan.drafts
    if params.greedy and not out.remaining:
        # the common case in one device->host transfer: per row position the argmax, its
        # log-prob and the top-k (ids and probs), packed as floats (ids < 2^24 are exact)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        argmax = logits.argmax(-1, keepdim=True)
        if top_k:  # the first top value is the max: the argmax's log-prob comes with the top-k
            top = logits.topk(top_k, -1)
            top_logp = top.values - lse
            parts = [argmax.float(), top_logp[..., :1], top.indices.float(), top_logp.exp()]
        else:
            parts = [argmax.float(), logits.gather(-1, argmax) - lse]
        packed = torch.cat(parts, -1).tolist()  # [B][T][2 + 2k]
        verdict = verify(drafts, argmax=[[int(x[0]) for x in row] for row in packed])
        kept = packed[verdict.row][: len(drafts[verdict.row]) + 1]
        logprobs = [x[1] for x in kept[: verdict.accepted + 1]]
        return (verdict, logprobs, [[int(i) for i in x[2 : 2 + top_k]] for x in kept],
                [x[2 + top_k :] for x in kept])
    host = logits.float().cpu()
    chosen = out.healer.mask(host[0, :1], out.remaining)[None] if out.remaining else host
    if params.greedy:
        verdict = verify(drafts, argmax=chosen.argmax(-1).tolist())
    else:
        probs = sampling_probs(chosen, params)
        q = None
        if plan.rows and plan.rows[0].q is not None:
            q = [dense(dist, probs.shape[-1]) for dist in plan.rows[0].q]
        verdict = verify(drafts, probs=probs, q=q, generator=generator)
    r = verdict.row
    path = [*drafts[r][: verdict.accepted], verdict.token]
    logp = torch.log_softmax(host[r, : len(drafts[r]) + 1], -1)
    logprobs = logp[torch.arange(len(path)), torch.tensor(path)].tolist()
    if not top_k:
        return verdict, logprobs, [], []
    top = logp.topk(top_k, -1)
    return verdict, logprobs, top.indices.tolist(), top.values.exp().tolist()


def first_fire(gate: Gate, row_logits: torch.Tensor, accepted: Sequence[int], out: Output) -> int | None:
    """The first position of the kept row (0..len(accepted)) where the gate fires, or None.

    `row_logits` [T, V]: position j gives the token after `accepted[:j]`. Positions after a
    token that ends the output are never emitted, so they are not gated.
    """
    end = draft_cut(out).ends_at(accepted)
    last = len(accepted) if end is None else end
    scored = row_logits[: last + 1]
    if out.remaining:  # healing: no drafts, one position, gated on the masked distribution
        scored = out.healer.mask(scored, out.remaining)
    fires = gate.fires(scored).tolist()
    return fires.index(True) if True in fires else None


def rollout_candidate(rerank: Rerank) -> Candidate:
    """The rerank winner's greedy rollout: what greedy will most likely emit after the winner."""
    tokens = list(rerank.rollouts[rerank.row])
    keys = [("rerank", min(j, 8)) for j in range(len(tokens))]
    return Candidate("rerank", tokens, keys, [0.9] * len(tokens))


def dense(dist: dict[int, float], vocab: int) -> torch.Tensor:  # -> [V] fp32
    """A sparse draft distribution {token: q} as a dense vector over the vocabulary."""
    q = torch.zeros(vocab, dtype=torch.float32)
    q[list(dist)] = torch.tensor(list(dist.values()), dtype=torch.float32)
    return q
