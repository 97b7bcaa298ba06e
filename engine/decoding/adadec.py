"""AdaDec: greedy decoding that reranks by lookahead where the model is unsure (ALGORITHMS.md).

Data flow: DecodeState -> `adadec_decode` -> Completion. adadec_decode is
engine.generate.decode's loop (stop rules, token healing, Completion contract) with a
`GatedChoice` as its token chooser: at each step the logits greedy would take the argmax of
give an entropy H (engine.calibrate.entropy's, read with the argmax from one
kernels.logit_summary). H < tau: the argmax, exactly as greedy. H >= tau
(the gate fires): `Lookahead.rerank` takes the top-B candidates, extends each by an L-token
greedy rollout, and commits the first token of the candidate with the best
`(log p(c) + sum log p(rollout)) / (len + 1)`.

Rollouts run batched on forked KV, without re-prefill: the context the step sees (document
spans, view tokens and the tokens generated so far, all batch 1) is shared by broadcast, and
only the B rollouts' own tokens go to a batch-B rollout cache, one forward per rollout step
for all B rows. The winner's rollout is kept as a draft: the committed token's K/V is copied
from its row instead of being recomputed, and while the following steps stay below tau (so
greedy picks exactly the draft's tokens) they reuse its logits and K/V too.

While token healing constrains a step, the gate measures the entropy of the masked
distribution the token is chosen from, and each rollout row keeps spelling out its own
remaining healed bytes.

Composing with n-gram speculation: `Gate` is the step-level component; it needs only a
position's logits and the batch-1 spans before it. engine/decoding/speculative/verify.py's verifier
scores its drafts with one forward that yields logits at every drafted position,
`gate.fires` marks the uncertain ones, drafts are accepted as before (equal to the argmax) up
to the first position that fires, and there `gate.rerank` picks the token in place of the
argmax; the winner's rollout becomes the next step's draft. Below tau nothing changes, so
speculation keeps its speed on confident stretches, and the output is adadec_decode's
(tests/engine/test_adadec.py).

This module refuses to know about documents, views and files: tau comes in an AdaDecConfig
(`AdaDecConfig.for_model` reads what `editkv calibrate` stored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from editkv.engine.calibrate import load_calibration
from editkv.engine.generate import Completion, DecodeState, DecodeStats, StopRules, decode
from editkv.engine.healing import TokenHealer, healer_for
from editkv.engine.model import KVCache, Span
from editkv.kernels.logit_summary import LogitSummary, logit_summary

if TYPE_CHECKING:  # annotations only
    from editkv.engine.runner import ModelRunner

NUM_CANDIDATES = 2  # B (paper: 3); bench/adadec.py found no config that helps, 2x2 costs least
LOOKAHEAD = 2  # L (paper: 5)


@dataclass(frozen=True)
class AdaDecConfig:
    """The gate (`tau`, nats; +inf = plain greedy) and the lookahead's width B and depth L."""

    tau: float
    num_candidates: int = NUM_CANDIDATES
    lookahead: int = LOOKAHEAD

    def __post_init__(self) -> None:
        if self.num_candidates < 1 or self.lookahead < 1:
            raise ValueError(f"num_candidates and lookahead must be >= 1, got {self.num_candidates}, {self.lookahead}")

    @classmethod
    def for_model(cls, spec: str | Path | None, **overrides) -> AdaDecConfig:
        """The calibrated tau of a model (None = the embedded default model)."""
        return cls(load_calibration(spec).tau, **overrides)


@dataclass
class AdaDecCounters:
    """What the gate did in one completion."""

    steps: int = 0  # tokens chosen (stop tokens included)
    gate_fires: int = 0
    changed: int = 0  # gate fires whose winner is not the argmax
    extra_forwards: int = 0  # batch-B rollout forwards
    rollout_tokens: int = 0  # tokens generated in rollouts, all rows
    reused_steps: int = 0  # greedy forwards skipped by reusing the winner's rollout

    def write(self, extra: dict[str, float]) -> None:
        """Add these counts to `DecodeStats.extra` (keys `adadec_<name>`)."""
        for name, value in vars(self).items():
            extra[f"adadec_{name}"] = extra.get(f"adadec_{name}", 0) + value


@dataclass
class Rerank:
    """One gate decision: candidates, their rollouts and scores, and the winner's draft."""

    token: int
    candidates: list[int]
    scores: list[float]
    rollouts: list[list[int]]  # each candidate's rollout tokens (a stop token ends one)
    forwards: int
    row: int  # the winner's row in the rollout cache
    draft_logits: list[torch.Tensor]  # [1, V] after the winner and each of its rollout tokens


class Lookahead:
    """Batched greedy rollouts of the top-B candidates at one position over shared batch-1 context."""

    def __init__(self, model: ModelRunner, num_candidates: int, lookahead: int, stop_ids: frozenset[int],
                 healer: TokenHealer | None = None) -> None:
        self.model = model
        self.num_candidates = num_candidates
        self.lookahead = lookahead
        self.stop_ids = stop_ids
        self.healer = healer
        self.cache = model.new_cache(lookahead, batch=num_candidates)  # rollout tokens, slot j = depth j

    def rerank(
        self,
        logits: torch.Tensor,  # [1, V]: the distribution the token is chosen from (healing mask applied)
        context: Sequence[Span],  # batch-1 spans the position attends to
        position: int,
        remaining: bytes = b"",  # healing bytes still to spell out at this position
        summary: LogitSummary | None = None,  # logit_summary(logits, k >= B), if the caller has it
    ) -> Rerank:
        """Score the top-B candidates by length-normalised log-probability of candidate + rollout."""
        assert logits.dim() == 2 and logits.shape[0] == 1, "rerank takes one position's logits [1, V]"
        model, dev = self.model, self.model.device
        width = min(self.num_candidates, logits.shape[-1])
        if summary is None or summary.ids.shape[-1] < width:
            summary = logit_summary(logits, width)
        # the top-B by logit (equal ones in id order: the first is the argmax), as log-probabilities
        top_logp, top_ids = torch.stack(((summary.values[0, :width] - summary.logsumexp[0]).double(),
                                         summary.ids[0, :width].double())).tolist()
        num = sum(map(math.isfinite, top_logp))  # tokens healing masked out are no candidates
        candidates = [int(c) for c in top_ids[:num]]
        totals = top_logp[:num]
        lengths = [1] * num
        alive = [c not in self.stop_ids for c in candidates]
        heal = [self._advance(remaining, c) for c in candidates]
        rollouts: list[list[int]] = [[] for _ in range(num)]
        row_logits: list[torch.Tensor] = []
        tokens = candidates + [candidates[0]] * (self.num_candidates - num)  # pad rows are ignored
        forwards = 0
        for depth in range(self.lookahead):
            if not any(alive):
                break
            out = model(torch.tensor(tokens, device=dev)[:, None], torch.tensor([position + depth], device=dev),
                        write=self.cache, write_at=depth,
                        context=[*context, Span(self.cache, 0, depth)], logits="last")  # [B, V]
            forwards += 1
            row_logits.append(out)
            rows = out[:num]
            if any(heal[:num]):
                rows = torch.cat([self.healer.mask(rows[i : i + 1], heal[i]) if heal[i] else rows[i : i + 1]
                                  for i in range(num)])
            # every row's argmax and its log-probability, in one host read
            step = logit_summary(rows, 1)
            step_ids, step_logp = torch.stack((step.ids[:, 0].double(),
                                               (step.values[:, 0] - step.logsumexp).double())).tolist()
            for i in range(num):
                if not alive[i]:
                    continue
                token = int(step_ids[i])
                heal[i] = self._advance(heal[i], token)
                totals[i] += step_logp[i]
                lengths[i] += 1
                rollouts[i].append(token)
                tokens[i] = token
                alive[i] = token not in self.stop_ids
        scores = [t / n for t, n in zip(totals, lengths, strict=True)]
        best = max(range(num), key=lambda i: (scores[i], -i))  # ties go to the higher-ranked candidate
        draft = [out[best : best + 1] for out in row_logits][: len(rollouts[best])]
        return Rerank(candidates[best], candidates, scores, rollouts, forwards, best, draft)

    def _advance(self, remaining: bytes, token: int) -> bytes:
        return self.healer.advance(remaining, token) if remaining else b""


class Gate:
    """The step-level AdaDec component: entropy gate, lookahead rerank, counters.

    Any decoder that chooses greedy tokens can call it: `adadec_decode` (`choose`) at every
    step, the speculative verifier at the positions its one forward scored (`fires` on all of
    them, then `rerank` at the first that fires).
    """

    def __init__(self, model: ModelRunner, config: AdaDecConfig, stop_ids: frozenset[int],
                 healer: TokenHealer | None = None) -> None:
        self.config = config
        self.counters = AdaDecCounters()
        self.lookahead = Lookahead(model, config.num_candidates, config.lookahead, stop_ids, healer) \
            if config.tau < math.inf else None

    def fires(self, logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N] bool
        """Where H >= tau (never with tau = +inf)."""
        if self.lookahead is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        return logit_summary(logits, 1).entropy >= self.config.tau

    def choose(
        self,
        logits: torch.Tensor,  # [1, V]: the distribution greedy would take the argmax of (healing applied)
        context: Sequence[Span],  # batch-1 spans before this position
        position: int,
        remaining: bytes = b"",
    ) -> tuple[int, Rerank | None]:
        """The token to commit here: the argmax below tau, the rerank's winner at or above it."""
        self.counters.steps += 1
        if self.lookahead is None:
            return int(logits.argmax()), None
        # the gate's entropy, the argmax and (should it fire) the rerank's candidates: one summary
        summary = logit_summary(logits, min(self.lookahead.num_candidates, logits.shape[-1]))
        fire, token = torch.stack(((summary.entropy[0] >= self.config.tau).double(),
                                   summary.ids[0, 0].double())).tolist()
        if not fire:
            return int(token), None
        return self.rerank(logits, context, position, remaining, summary)

    def rerank(
        self,
        logits: torch.Tensor,  # [1, V]: a position where the gate fired (healing applied)
        context: Sequence[Span],
        position: int,
        remaining: bytes = b"",
        summary: LogitSummary | None = None,  # logit_summary(logits, k >= B), if the caller has it
    ) -> tuple[int, Rerank]:
        """The lookahead's winner at a position the caller found firing; counted as a gate fire."""
        decision = self.lookahead.rerank(logits, context, position, remaining, summary)
        c = self.counters
        c.gate_fires += 1
        c.extra_forwards += decision.forwards
        c.rollout_tokens += sum(len(r) for r in decision.rollouts)
        c.changed += decision.token != decision.candidates[0]  # the first candidate is the argmax
        return decision.token, decision


class GatedChoice:
    """A `TokenChooser` for engine.generate.decode: the gate's token at each step, and the winner's
    rollout reused while greedy follows it (its K/V and logits instead of a forward)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.decision: Rerank | None = None  # this step's rerank, if the gate fired
        self.draft: Rerank | None = None  # the last winner's rollout while greedy follows it
        self.depth = 0  # tokens of the draft committed so far (the winner is depth 0)

    def choose(self, logits: torch.Tensor, context: Sequence[Span], position: int, remaining: bytes) -> int:
        token, self.decision = self.gate.choose(logits, context, position, remaining)
        return token

    def reuse(self, token: int, scratch: KVCache, slot: int) -> torch.Tensor | None:
        draft = self.draft
        if self.decision is not None:
            draft, self.depth = self.decision, 0
        elif draft is not None and self.depth < len(draft.rollouts[draft.row]) \
                and token == draft.rollouts[draft.row][self.depth]:
            self.depth += 1
        else:
            draft = None
        self.draft = draft
        if draft is None or self.depth >= len(draft.draft_logits):
            self.draft = None
            return None
        # The token's K/V and the next distribution were computed by the winner's rollout.
        rollout_cache = self.gate.lookahead.cache
        scratch.k[:, 0, :, slot] = rollout_cache.k[:, draft.row, :, self.depth]
        scratch.v[:, 0, :, slot] = rollout_cache.v[:, draft.row, :, self.depth]
        self.gate.counters.reused_steps += 1
        return draft.draft_logits[self.depth]


def adadec_decode(
    state: DecodeState,
    config: AdaDecConfig,
    rules: StopRules | None = None,
    stats: DecodeStats | None = None,
    *,
    stop_text: Callable[[str], int | None] | None = None,
) -> Completion:
    """Greedy decoding from `state`, reranked by lookahead wherever H >= `config.tau`.

    engine.generate.decode's loop (stop rules, healing, text cut) with a `GatedChoice`; with
    tau = +inf it is greedy, token for token. `stop_text` as decode takes it. Counters go to
    `stats.extra` as `adadec_*`; rollout forwards count in `stats.forwards`.
    """
    stats = stats or DecodeStats()
    stop_ids = (rules or StopRules()).stop_set(state.tokenizer)
    healer = healer_for(state.tokenizer) if state.heal else None  # rollouts need it only while healing
    gate = Gate(state.model, config, stop_ids, healer)
    out = decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                 next_position=state.next_position, rules=rules, scratch=state.scratch,
                 scratch_used=state.scratch_used, stats=stats, heal=state.heal, chooser=GatedChoice(gate),
                 stop_text=stop_text)
    stats.forwards += gate.counters.extra_forwards
    gate.counters.write(stats.extra)
    return out
