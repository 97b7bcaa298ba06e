"""Lossless speculative decoding with model-free drafters: draft, verify in one forward, accept.

Data flow of one step: DecodeState + emitted ids -> drafters (drafters.py) propose candidate
chains -> `Speculator.plan` cuts each chain by SpecDec++'s rule (stop before the token that
makes the estimated chance of some rejection exceed `threshold`), keeps the prefix and the
chain with the most expected tokens per unit of forward cost (`StepCost`: measured time per
batch rows x width; no draft at all when a plain step wins), and with `max_rows > 1` adds other
chains as batch rows (a token tree verified by rows that share the context) while that raises
it -> one forward of [last emitted token + drafts] per row, logits at every
position -> `verify` walks the rows: greedy accepts drafts equal to the argmax; sampling
accepts point-mass drafts equal to a sample of the target and stochastic drafts (drawn from q)
with probability min(1, p/q), resampling from norm(max(p - q, 0)) on rejection -> the accepted
drafts and the target's own next token (the bonus) go through the same stop rules, healing and
line cut as engine.generate.decode, so greedy output is token-for-token the same.

AdaDec (greedy): the kept row's positions are gated in order; drafts are accepted up to the
first position whose entropy reaches tau, where the lookahead rerank chooses the token in place
of the argmax, and the winner's rollout is a draft candidate for the next step (`Speculator.plan`
takes it as an `extra` chain). The output is then adadec_decode's.

On graphed forwards (CUDA), greedy decoding without AdaDec drafts and verifies on the device
instead (`config.device_lookup`): `StaticForward.lookup_chain` runs up to `device_steps`
iterations of prompt lookup over the references and the history, a `device_width`-token
verification and the verdict as one replayed graph each, and the host reads the kept tokens
once per chain. On a small model a host-driven step (drafting, the verdict, the wait for it)
costs several times a chained plain step; on the device an 8-token verification costs ~1.2x
one in bf16 and ~1.5x in fp32 (H100, default model). Where a chain's drafts do not pay for
that, the next chain is plain steps.

KV: row tokens are written at the scratch slots that follow the emitted ones; the next write
position only advances by the tokens kept, so rejected drafts' K/V is overwritten later. With
several rows they go to a batch-B side buffer and the kept row's slots are copied over.

The decoder sees only a DecodeState: both edit_cache views work. It refuses to know text
beyond the tokenizer's stop ids, token bytes and the line rule.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from editkv.engine.decoding.adadec import AdaDecConfig, Gate, Rerank
from editkv.engine.decoding.drafters import (
    AcceptanceEstimator,
    Candidate,
    ModelTable,
    PromptLookup,
    Reference,
    TokenHistory,
)
from editkv.engine.generate import Completion, DecodeState, DecodeStats, LineStopper, StopRules, chain_length
from editkv.engine.healing import healer_for
from editkv.engine.model import KVCache, Span
from editkv.engine.sampling import SamplingParams, sampling_probs
from editkv.engine.static_decode import MAX_CHAIN, SOURCE
from editkv.engine.tokenizer import Tokenizer

DRAFTERS = ("lookup", "table")


@dataclass(frozen=True)
class SpeculationConfig:
    """How much to draft and from where; `measure_cost` fits the plan to the device it runs on."""

    drafters: tuple[str, ...] = DRAFTERS
    threshold: float = 0.9  # h: SpecDec++ stop threshold on P(some draft token is rejected)
    max_draft: int = 16  # draft tokens per row
    max_rows: int = 1  # > 1: verify up to this many candidate chains as batch rows
    measure_cost: bool = True  # rank drafts by measured forward time per (rows, width)...
    row_cost: float = 0.5  # ...or, when not measuring, by cost 1 + row_cost per extra row
    max_match: int = 8  # prompt lookup: longest tail matched
    table_orders: tuple[int, ...] = (3, 2, 1)
    table_top_k: int = 10
    table_contexts: int = 50_000
    stochastic_table: bool = True  # sampling: draft from the table's distribution q (STAND)
    recent: int = 8  # own completions kept as a "recent" reference
    # greedy on graphed forwards: a step with nothing to draft runs this many plain steps as one
    # device-side chain (engine.static_decode.StaticForward.chain) instead of one verification
    chain_steps: int = 8
    # greedy on graphed forwards with prompt lookup among the drafters: draft and verify on the
    # device instead (StaticForward.lookup_chain), up to `device_steps` verifications of
    # `device_width` tokens per host round trip; the model table is then not consulted
    device_lookup: bool = True
    device_width: int = 8
    device_steps: int = 8
    device_in_flight: int = 2  # chains queued at once (2: the next runs while the host reads one)

    def __post_init__(self) -> None:
        unknown = set(self.drafters) - set(DRAFTERS)
        if unknown:
            raise ValueError(f"unknown drafters {sorted(unknown)}; use some of {DRAFTERS}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.max_draft < 0 or self.max_rows < 1:
            raise ValueError(f"need max_draft >= 0 and max_rows >= 1, got {self.max_draft}, {self.max_rows}")
        if self.chain_steps < 0:
            raise ValueError(f"chain_steps must be >= 0, got {self.chain_steps}")
        if self.device_width not in (2, 4, 8, 16):
            raise ValueError(f"device_width must be 2, 4, 8 or 16, got {self.device_width}")
        if not 1 <= self.device_steps <= 16:
            raise ValueError(f"device_steps must be in [1, 16], got {self.device_steps}")
        if self.device_in_flight not in (1, 2):
            raise ValueError(f"device_in_flight must be 1 or 2, got {self.device_in_flight}")


@dataclass
class SpecCounters:
    """One request's speculation, in drafted / accepted / bonus tokens.

    Every token the decoder chose is the first one (from the state's logits), an accepted draft,
    a bonus token (one per verification forward) or a chained one (plain greedy steps run on the
    device where there was nothing to draft): `len(ids) + discarded == 1 + accepted + bonus +
    chained`, where `discarded` counts chosen tokens a stop rule cut (the stop token, tokens past
    the end).
    """

    drafted: int = 0  # draft tokens verified, all rows
    accepted: int = 0  # draft tokens the target agreed with (the kept row)
    bonus: int = 0  # tokens the target chose in a verification
    forwards: int = 0  # verification forwards
    rows: int = 0  # batch rows verified, summed over forwards
    discarded: int = 0
    chained: int = 0  # tokens chosen by device-side chains of plain steps (one forward each)
    by_source: dict[str, list[int]] = field(default_factory=dict)  # source -> [drafted, accepted]

    NAMES = ("drafted", "accepted", "bonus", "forwards", "rows", "discarded", "chained")

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def write(self, extra: dict[str, float]) -> None:
        """Add these counts to `DecodeStats.extra` (keys `spec.<name>`, `spec.<name>.<source>`)."""
        for name in self.NAMES:
            extra[f"spec.{name}"] = extra.get(f"spec.{name}", 0) + getattr(self, name)
        for source, (drafted, accepted) in self.by_source.items():
            for name, value in (("drafted", drafted), ("accepted", accepted)):
                key = f"spec.{name}.{source}"
                extra[key] = extra.get(key, 0) + value

    @classmethod
    def read(cls, extra: dict[str, float]) -> SpecCounters:
        """The counters `write` left in a stats' extra."""
        out = cls(**{name: int(extra.get(f"spec.{name}", 0)) for name in cls.NAMES})
        for key, value in extra.items():
            parts = key.split(".", 2)
            if len(parts) == 3 and parts[0] == "spec":
                slot = out.by_source.setdefault(parts[2], [0, 0])
                slot[0 if parts[1] == "drafted" else 1] += int(value)
        return out


@dataclass
class Plan:
    """The rows one verification forward checks, with estimated acceptance per draft token."""

    rows: list[Candidate] = field(default_factory=list)
    accept: list[list[float]] = field(default_factory=list)

    @property
    def drafts(self) -> list[list[int]]:
        return [r.tokens for r in self.rows] or [[]]


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


def expected_accepted(chains: Sequence[tuple[Sequence[int], Sequence[float]]]) -> float:
    """Expected accepted tokens when `(tokens, acceptance per token)` chains are verified together.

    A node counts if its parent is reached and the target picks its token; estimates are
    conditional on the parent, and siblings exclude each other, so they are scaled down when
    they sum past 1.
    """
    cond: dict[tuple[int, ...], float] = {}
    for tokens, accept in chains:
        for j in range(len(tokens)):
            node = tuple(tokens[: j + 1])
            cond[node] = max(cond.get(node, 0.0), accept[j])
    siblings: dict[tuple[int, ...], float] = {}
    for node, p in cond.items():
        siblings[node[:-1]] = siblings.get(node[:-1], 0.0) + p
    reach: dict[tuple[int, ...], float] = {(): 1.0}
    total = 0.0
    for node in sorted(cond, key=len):
        reach[node] = reach[node[:-1]] * cond[node] / max(1.0, siblings[node[:-1]])
        total += reach[node]
    return total


class StepCost:
    """Cost of a verification forward per (rows, width): measured wall time (EMA), or a fixed model.

    Unmeasured shapes borrow the most expensive measured shape no larger than them (optimistic,
    so each shape gets tried once); a sample is clipped to [0.5, 2] x the estimate so that one
    stall of a shared machine does not rule a shape out. The fixed model (drafted tokens free,
    `row_cost` per extra row) is what a GPU looks like, and keeps tests deterministic.
    """

    def __init__(self, measure: bool = True, row_cost: float = 0.5, alpha: float = 0.2) -> None:
        self.measure = measure
        self.row_cost = row_cost
        self.alpha = alpha
        self.ms: dict[tuple[int, int], float] = {}
        self.chain_ms: float | None = None  # measured ms per token of a device-side chain of plain steps

    def estimate(self, rows: int, width: int) -> float:
        if not self.measure:
            return 1.0 + self.row_cost * (rows - 1)
        known = self.ms.get((rows, width))
        if known is not None:
            return known
        return max((v for (b, t), v in self.ms.items() if b <= rows and t <= width), default=1.0)

    def record(self, rows: int, width: int, ms: float) -> None:
        if not self.measure:
            return
        old = self.ms.get((rows, width))
        self.ms[(rows, width)] = self._blend(old, ms)

    def record_chain(self, ms_per_token: float) -> None:
        if self.measure:
            self.chain_ms = self._blend(self.chain_ms, ms_per_token)

    def _blend(self, old: float | None, ms: float) -> float:
        if old is None:
            return ms
        return old + self.alpha * (min(max(ms, 0.5 * old), 2.0 * old) - old)


class Speculator:
    """What outlives a request: the model table, acceptance estimates and recent completions.

    One per model (the table holds that model's distributions); not thread-safe.
    """

    def __init__(self, config: SpeculationConfig | None = None) -> None:
        self.config = config or SpeculationConfig()
        cfg = self.config
        self.lookup = PromptLookup(cfg.max_match)
        self.table = ModelTable(cfg.table_orders, cfg.table_top_k, max_contexts=cfg.table_contexts)
        self.estimator = AcceptanceEstimator()
        self.cost = StepCost(cfg.measure_cost, cfg.row_cost)
        self.recent: deque[Reference] = deque(maxlen=cfg.recent)
        self.device_rate = 2.0  # tokens kept per device-side verification (running mean)
        self.line_tokens: float | None = None  # tokens a completed line took (running mean)

    def decode(self, state: DecodeState, *, params: SamplingParams | None = None, rules: StopRules | None = None,
               references: Sequence[Reference] = (), stats: DecodeStats | None = None,
               adadec: AdaDecConfig | None = None) -> Completion:
        """`speculative_decode` with this speculator."""
        return speculative_decode(state, self, params=params, rules=rules, references=references, stats=stats,
                                  adadec=adadec)

    def plan(self, history: TokenHistory, references: Sequence[Reference], budget: int, *, greedy: bool,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             cut: _DraftCut | None = None, extra: Sequence[Candidate] = (), chain: bool = False) -> Plan:
        """Candidate chains from every drafter (and `extra` ones the decoder has, e.g. AdaDec's
        winning rollout), cut by SpecDec++'s rule; the best by expected tokens per unit of
        forward cost, plus tree rows while they raise it.

        `chain`: the decoder can run plain steps as a device-side chain instead; once its cost per
        token is measured, a draft must beat that rate, not a one-token verification's."""
        cfg = self.config
        if budget <= 0:
            return Plan()
        no_draft = self.goodput(0.0, 1, 1)
        if chain and self.cost.measure and self.cost.chain_ms:
            no_draft = max(no_draft, 1.0 / self.cost.chain_ms)
        candidates: list[Candidate] = [c.truncate(budget) for c in extra if c.tokens]
        if "lookup" in cfg.drafters:
            candidates += self.lookup.propose(history, references, budget, max_candidates=cfg.max_rows + 1)
        if "table" in cfg.drafters:
            stochastic = not greedy and cfg.stochastic_table
            candidates += self.table.propose(history.tail(self.table.max_order), budget,
                                             branches=1 if stochastic else cfg.max_rows,
                                             temperature=temperature if stochastic else 0.0, generator=generator)
        scored = []  # (value, candidate cut to its best length, acceptance estimates)
        for cand in candidates:
            if cut is not None:
                cand = cand.truncate(cut.length(cand.tokens))
            accept, kept = [], 1.0
            for key, prior in zip(cand.keys, cand.priors, strict=True):
                p = self.estimator.estimate((greedy, *key), prior)
                if 1.0 - kept * p > cfg.threshold:
                    break
                kept *= p
                accept.append(p)
            # the prefix with the most expected tokens per cost (no draft at all if none beats it)
            best_len, best_value, reach, expected = 0, no_draft, 1.0, 0.0
            for j, p in enumerate(accept):
                reach *= p
                expected += reach
                value = self.goodput(expected, 1, j + 2)
                if value > best_value:
                    best_len, best_value = j + 1, value
            if best_len:
                scored.append((best_value, cand.truncate(best_len), accept[:best_len]))
        if not scored:
            return Plan()
        scored.sort(key=lambda s: s[0], reverse=True)
        value, first, first_accept = scored[0]
        chosen = [(first, first_accept)]
        if cfg.max_rows > 1 and first.q is None:
            pool = [(c, a) for _, c, a in scored[1:] if c.q is None]
            while pool and len(chosen) < cfg.max_rows:
                values = []
                for extra in pool:
                    rows = [*chosen, extra]
                    width = 1 + max(len(c.tokens) for c, _ in rows)
                    values.append(self.goodput(expected_accepted([(c.tokens, a) for c, a in rows]), len(rows), width))
                best = int(np.argmax(values))
                if values[best] <= value:
                    break
                chosen.append(pool.pop(best))
                value = values[best]
        return Plan([c for c, _ in chosen], [a for _, a in chosen])

    def goodput(self, expected: float, rows: int, width: int) -> float:
        """Expected tokens per forward (accepted + bonus) over the forward's estimated cost."""
        return (1.0 + expected) / self.cost.estimate(rows, width)

    def observe(self, plan: Plan, path: Sequence[int], greedy: bool) -> None:
        """Update acceptance estimates: each row's drafts agree with the emitted `path` up to a point."""
        for cand in plan.rows:
            agree = 0
            while agree < len(cand.tokens) and agree < len(path) and cand.tokens[agree] == path[agree]:
                agree += 1
            for j in range(agree):
                self.estimator.update((greedy, *cand.keys[j]), True)
            if agree < len(cand.tokens):
                self.estimator.update((greedy, *cand.keys[agree]), False)

    def learn(self, tail: Sequence[int], drafts: Sequence[int], top_ids: Sequence[Sequence[int]],
              top_probs: Sequence[Sequence[float]]) -> None:
        """Merge the model's top-k after `tail + drafts[:i]` (row position i) into the table."""
        if "table" not in self.config.drafters:
            return
        self.table.update_row(tail, drafts, top_ids, top_probs)

    def remember(self, ids: Sequence[int]) -> None:
        """Keep a completion as a reference for the next requests (a re-request after typing)."""
        if self.config.recent and ids:
            self.recent.append(Reference.of("recent", ids))


@dataclass
class _DraftCut:
    """Where drafts stop being useful: after a stop token, or after the line the rules end on."""

    stop_ids: frozenset[int]
    token_bytes: dict[int, bytes]
    lines_left: int | None

    def length(self, tokens: Sequence[int]) -> int:
        end = self.ends_at(tokens)
        return len(tokens) if end is None else end + 1

    def ends_at(self, tokens: Sequence[int]) -> int | None:
        """Index of the first token that ends the output (a stop token, the last line's end)."""
        lines = 0
        for j, t in enumerate(tokens):
            if t in self.stop_ids:
                return j
            if self.lines_left is not None:
                lines += self.token_bytes.get(t, b"").count(b"\n")
                if lines >= self.lines_left:
                    return j
        return None


class _Output:
    """Emitted ids through engine.generate.decode's rules, in its order: heal, stop id, line, length.

    Line ends are counted per emitted token (`LineStopper.line_ends`), as `_DraftCut` counts
    them, instead of decoding all ids at each token as `LineStopper.cut` does.
    """

    def __init__(self, tokenizer: Tokenizer, rules: StopRules, heal: bytes) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        self.stop_ids = rules.stop_set(tokenizer)
        self.stopper = LineStopper(tokenizer, rules.max_lines)
        self.healer = healer_for(tokenizer)
        self.remaining = heal
        self.ids: list[int] = []
        self.lines = 0  # line ends in the emitted ids' text
        self.in_line = 0  # emitted ids since the last line end (counted under a line rule)
        self.logprob = 0.0
        self.reason: str | None = None

    def emit(self, tokens: Sequence[int], logprobs: Sequence[float]) -> int:
        """Append tokens until a rule fires; returns how many were appended."""
        max_lines = self.rules.max_lines
        for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            if self.remaining:
                self.remaining = self.healer.advance(self.remaining, token)
            if token in self.stop_ids:
                self.reason = "stop_token"
                return n
            self.logprob += logprob
            self.ids.append(token)
            if max_lines is not None:
                ends = self.stopper.line_ends(token)
                self.lines += ends
                self.in_line = 0 if ends else self.in_line + 1
                if self.lines >= max_lines:
                    self.reason = "lines"
                    return n + 1
            if len(self.ids) >= self.rules.max_tokens:
                self.reason = "max_tokens"
                return n + 1
        return len(tokens)

    def cut(self) -> _DraftCut:
        lines_left = None if self.rules.max_lines is None else self.rules.max_lines - self.lines
        return _DraftCut(self.stop_ids, self.healer.token_bytes, lines_left)

    def text(self, heal: bytes) -> str:
        text = self.stopper.cut(self.ids)[0]
        healed = heal.decode("utf-8", errors="replace")
        return text[len(healed):] if text.startswith(healed) else text


def _judge(
    logits: torch.Tensor,  # [B, T, V] fp32
    plan: Plan,
    out: _Output,
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
            q = [_dense(dist, probs.shape[-1]) for dist in plan.rows[0].q]
        verdict = verify(drafts, probs=probs, q=q, generator=generator)
    r = verdict.row
    path = [*drafts[r][: verdict.accepted], verdict.token]
    logp = torch.log_softmax(host[r, : len(drafts[r]) + 1], -1)
    logprobs = logp[torch.arange(len(path)), torch.tensor(path)].tolist()
    if not top_k:
        return verdict, logprobs, [], []
    top = logp.topk(top_k, -1)
    return verdict, logprobs, top.indices.tolist(), top.values.exp().tolist()


def speculative_decode(
    state: DecodeState,
    speculator: Speculator,
    *,
    params: SamplingParams | None = None,
    rules: StopRules | None = None,
    references: Sequence[Reference] = (),
    stats: DecodeStats | None = None,
    adadec: AdaDecConfig | None = None,
) -> Completion:
    """Decode from `state` like engine.generate.decode, verifying drafts in each forward.

    `references`: token sequences to copy from besides the prompt (the suffix in a
    left-to-right view, other open documents, shown suggestions). Greedy decoding on graphed
    forwards (`model.static`) runs the steps it has nothing to draft for as device-side chains
    of `config.chain_steps` plain steps (counted as `chained`, not as verifications). Counters go to
    `stats.extra` (`SpecCounters.read`). Cancellation (`should_stop`) is polled before each
    forward, so a cancelled request may hold more tokens than plain decoding's.

    `adadec` (greedy only) gates each position the verification scored: drafts are accepted
    up to the first position whose entropy reaches tau, and there the lookahead rerank picks
    the token (and its winning rollout becomes the next step's draft). The output is then
    adadec_decode's; gate counters go to `stats.extra` as `adadec_*`, rollout forwards count
    in `stats.forwards` (not in `spec.forwards`).
    """
    params = params or SamplingParams()
    rules = rules or StopRules()
    stats = stats or DecodeStats()
    cfg = speculator.config
    model = state.model
    device = model.device
    greedy = params.greedy
    first_logits = state.first_logits  # [1, V]
    assert first_logits.dim() == 2 and first_logits.shape[0] == 1, "first_logits must be [1, V]"
    scratch, used = state.scratch, state.scratch_used
    scratch.ensure_capacity(used + rules.max_tokens + 1, keep=used)  # drafts never pass max_tokens
    out = _Output(state.tokenizer, rules, state.heal)
    counters = SpecCounters()
    history = TokenHistory(state.prompt_ids)
    refs = [*references, *speculator.recent]
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    rows_cache = None
    order = speculator.table.max_order
    gate = None
    chainable = (greedy and adadec is None and cfg.chain_steps > 0 and model.static is not None
                 and rules.max_tokens > 0)
    on_device = chainable and cfg.device_lookup and "lookup" in cfg.drafters
    if adadec is not None and adadec.tau < math.inf:
        if not greedy:
            raise ValueError("AdaDec reranks greedy decoding; it does not combine with sampling")
        gate = Gate(model, adadec, out.stop_ids, out.healer if state.heal else None)
    started = time.perf_counter()

    # The first token comes from the state's logits: no forward, no drafts.
    logits = first_logits[None]  # [1, 1, V]
    plan = Plan()
    forward_started = None
    while True:
        drafts = plan.drafts
        tail = history.tail(order)
        top_k = speculator.table.top_k if "table" in cfg.drafters else 0
        verdict, logprobs, top_ids, top_probs = _judge(logits, plan, out, params, generator, top_k)
        if forward_started is not None:  # _judge waited for the forward's results
            speculator.cost.record(len(drafts), 1 + max(len(d) for d in drafts),
                                   1000 * (time.perf_counter() - forward_started))
        r, accepted, token = verdict.row, verdict.accepted, verdict.token
        rerank: Rerank | None = None
        fired = None  # AdaDec: the first uncertain position on the kept path decides there
        if gate is not None:
            fired = _first_fire(gate, logits[r], drafts[r][:accepted], out)
            if fired is not None:
                accepted = fired
        if len(drafts) > 1:  # keep the chosen row's K/V: the emitted token and accepted drafts
            slot = used + len(out.ids) - 1
            for name in ("k", "v"):
                getattr(scratch, name)[:, 0, :, slot : slot + accepted + 1] = \
                    getattr(rows_cache, name)[:, r, :, : accepted + 1]
        if fired is not None:
            at = logits[r, fired : fired + 1]  # [1, V]
            choose_from = out.healer.mask(at, out.remaining) if out.remaining else at
            n = len(out.ids) + fired  # the output index this position chooses
            token, rerank = gate.rerank(choose_from, [*state.context, Span(scratch, 0, used + n)],
                                        state.next_position + n, out.remaining)
            logprobs = [*logprobs[:fired], float(torch.log_softmax(at[0].float(), -1)[token])]
        path = [*drafts[r][:accepted], token]
        if top_k:
            speculator.learn(tail, drafts[r], top_ids, top_probs)
        if plan.rows:
            speculator.observe(plan, path, greedy)
            counters.drafted += sum(len(d) for d in drafts)
            counters.accepted += accepted
            counters.rows += len(drafts)
            for cand in plan.rows:
                counters.by_source.setdefault(cand.source, [0, 0])[0] += len(cand.tokens)
            counters.by_source[plan.rows[r].source][1] += accepted
        appended = out.emit(path, logprobs)
        counters.discarded += len(path) - appended
        if gate is not None:
            gate.counters.steps += appended + (out.reason == "stop_token")
        if out.reason is not None:
            break
        history.extend(path)
        if rules.should_stop is not None and rules.should_stop():
            out.reason = "cancelled"
            break

        if on_device and not out.remaining:
            if _speculate_on_device(state, speculator, out, history, refs, stats, counters):
                break
            on_device = False  # shapes the device chain does not serve: draft on the host

        # Draft, then verify the last emitted token + drafts in one forward.
        n = len(out.ids)
        budget = 0 if out.remaining else min(cfg.max_draft, rules.max_tokens - n - 1)
        extra = [_rollout_candidate(rerank)] if rerank is not None else []
        # a step's cost runs from its drafting to its verdict: what a chain's tokens compete with
        forward_started = time.perf_counter()
        plan = speculator.plan(history, refs, budget, greedy=greedy, temperature=params.temperature,
                               generator=generator, cut=out.cut(), extra=extra, chain=chainable)
        # Nothing to draft: plain greedy steps chained on the device cost a fraction of a
        # verification step each (no drafting, no verdict, no wait between them); drafting
        # resumes after the chain.
        while chainable and not any(plan.drafts) and not out.remaining:
            steps = chain_length(cfg.chain_steps, rules.max_tokens - n)
            chain_started = time.perf_counter()
            chain = _plain_chain(state, out, steps, stats, counters)
            if chain is None:
                break
            path, chain_logprobs = chain
            speculator.cost.record_chain(1000 * (time.perf_counter() - chain_started) / steps)
            appended = out.emit(path, chain_logprobs)
            counters.discarded += steps - appended
            if out.reason is None and rules.should_stop is not None and rules.should_stop():
                out.reason = "cancelled"
            if out.reason is not None:
                break
            history.extend(path)
            n = len(out.ids)
            budget = min(cfg.max_draft, rules.max_tokens - n - 1)
            forward_started = time.perf_counter()
            plan = speculator.plan(history, refs, budget, greedy=greedy, temperature=params.temperature,
                                   generator=generator, cut=out.cut(), chain=True)
        if out.reason is not None:
            break
        rows = [[out.ids[-1], *d] for d in plan.drafts]
        width = max(len(row) for row in rows)
        rows = [row + [row[-1]] * (width - len(row)) for row in rows]  # padding is never accepted
        slot = used + n - 1
        context = [*state.context, Span(scratch, 0, slot)]
        write, write_at = scratch, slot
        if len(rows) > 1:
            if rows_cache is None:
                rows_cache = model.new_cache(cfg.max_draft + 1, batch=cfg.max_rows, dtype=scratch.dtype)
            write = KVCache(rows_cache.k[:, : len(rows)], rows_cache.v[:, : len(rows)])
            write_at = 0
        positions = torch.arange(state.next_position + n - 1, state.next_position + n - 1 + width, device=device)
        logits = model(torch.tensor(rows, device=device), positions, write=write, write_at=write_at,
                       context=context, logits="all")  # [B, T, V]
        stats.forwards += 1
        counters.forwards += 1
        counters.bonus += 1

    stats.decode_tokens += len(out.ids)
    stats.decode_ms += 1000 * (time.perf_counter() - started)
    counters.write(stats.extra)
    if gate is not None:
        stats.forwards += gate.counters.extra_forwards
        gate.counters.write(stats.extra)
    speculator.remember(out.ids)
    if out.reason == "lines" and out.lines:  # how long lines run, for sizing device chains
        tokens = len(out.ids) / out.lines
        old = speculator.line_tokens
        speculator.line_tokens = tokens if old is None else old + 0.2 * (tokens - old)
    return Completion(out.ids, out.text(state.heal), out.reason, stats, out.logprob)


def _speculate_on_device(state: DecodeState, speculator: Speculator, out: _Output, history: TokenHistory,
                         references: Sequence[Reference], stats: DecodeStats, counters: SpecCounters) -> bool:
    """Decode the rest greedily by `StaticForward.lookup_chain`'s parts: drafting, verification
    and the next step's inputs stay on the device, and the host reads each chain's kept tokens
    once and runs them through the stop rules — while the next chain already runs (the device
    state needs nothing from the host; after a stop the chain in flight is wasted). False, with
    `out` consistent, when a chain is refused (the request's shapes or scratch room); the
    caller then drafts on the host.

    Where the drafts stop paying — a chain kept fewer tokens per verification than a chain of
    plain steps gives in the same time (`StepCost`: both measured as they run; a plain chain is
    tried once to measure it) — the next chain is one of plain steps, then lookup resumes."""
    static = state.model.static
    cfg = speculator.config
    cost = speculator.cost
    rules = out.rules
    width = cfg.device_width
    scratch, used = state.scratch, state.scratch_used
    room = rules.max_tokens + 2 * MAX_CHAIN * width
    buffer = _search_buffer(history, references, SOURCE - room)
    if buffer is None:
        return False
    length = static.stage_source(buffer)
    run = None  # the device state of the chains in flight (None: restage from the host's)
    pending: deque = deque()  # (ticket, tokens it is expected to keep)
    plain_next = False
    last = time.perf_counter()
    while True:
        n = len(out.ids)
        slot = used + n - 1
        position = state.next_position + n - 1
        if plain_next and not pending:
            steps = chain_length(cfg.chain_steps, rules.max_tokens - n)
            chain = _plain_chain(state, out, steps, stats, counters)
            if chain is None:
                return False
            kept, logprobs = chain
            now = time.perf_counter()
            cost.record_chain(1000 * (now - last) / steps)
            last = now
            length = static.extend_source(kept, length)
            plain_next = False
            run = None
        else:
            # keep two chains in flight: enough verifications for the tokens still allowed at
            # the rate seen so far (a stop token or line end inside a chain wastes what follows)
            while len(pending) < cfg.device_in_flight and not plain_next:
                left = _tokens_left(out, speculator.line_tokens) - sum(e for _, e in pending)
                if left <= 0 and pending:
                    break
                if run is None:
                    fits = (scratch.capacity - 1 - slot) // width
                    run = static.lookup_start(out.ids[-1], position, scratch, slot,
                                              [*state.context, Span(scratch, 0, slot)], length, width,
                                              min(fits, 2 * MAX_CHAIN))
                    if run is None:
                        return False
                rate = speculator.device_rate
                steps = min(cfg.device_steps, MAX_CHAIN, run.room, math.ceil(max(left, 1) / rate))
                if steps < 1:
                    break
                pending.append((static.lookup_enqueue(run, steps), steps * rate))
            if not pending:
                if plain_next:
                    continue
                return False
            ticket, _ = pending.popleft()
            steps = ticket.steps
            kept, logprobs, accepts = static.lookup_collect(ticket)
            now = time.perf_counter()
            cost.record(1, width, 1000 * (now - last) / steps)  # wall time since the last chain landed
            last = now
            length += len(kept)
            rate = len(kept) / steps
            speculator.device_rate += 0.2 * (rate - speculator.device_rate)
            stats.forwards += steps
            counters.forwards += steps
            counters.rows += steps
            counters.bonus += steps
            counters.drafted += steps * (width - 1)
            counters.accepted += sum(accepts)
            source = counters.by_source.setdefault("device", [0, 0])
            source[0] += steps * (width - 1)
            source[1] += sum(accepts)
            if cfg.chain_steps and cost.measure:
                if cost.chain_ms is None:
                    plain_next = rate < 1.5  # unmeasured: try plain steps where drafts barely pay
                else:
                    plain_next = rate / cost.estimate(1, width) < 1.0 / cost.chain_ms
            if run is not None and run.room < 1 and not pending:
                run = None  # its room is spent: restage from where the host is
        appended = out.emit(kept, logprobs)
        counters.discarded += len(kept) - appended
        if out.reason is None and rules.should_stop is not None and rules.should_stop():
            out.reason = "cancelled"
        if out.reason is not None:
            return True
        history.extend(kept)


def _plain_chain(state: DecodeState, out: _Output, steps: int, stats: DecodeStats,
                 counters: SpecCounters) -> tuple[list[int], list[float]] | None:
    """`steps` plain greedy steps chained on the device after the output's last token
    (`StaticForward.chain`), counted as chained forwards: (ids, log-probs), or None when the
    chain is refused (or `steps` is 0)."""
    if not steps:
        return None
    n = len(out.ids)
    scratch = state.scratch
    slot = state.scratch_used + n - 1
    chain = state.model.static.chain(out.ids[-1], state.next_position + n - 1, scratch, slot,
                                     [*state.context, Span(scratch, 0, slot)], steps)
    if chain is None:
        return None
    chosen, logprobs = chain.tolist()
    stats.forwards += steps
    counters.chained += steps
    return [int(t) for t in chosen], logprobs


def _tokens_left(out: _Output, line_tokens: float | None) -> float:
    """Tokens the request is expected to take still: its token budget, or under a line rule,
    the lines left at the length lines have been running (`Speculator.line_tokens`); a line
    already longer than that is expected to run on by half what it has (so a long line costs
    a few chains, not one per verification)."""
    left = out.rules.max_tokens - len(out.ids)
    if out.rules.max_lines is None or line_tokens is None:
        return left
    lines_left = out.rules.max_lines - out.lines
    return min(left, max(1.0, lines_left * line_tokens - out.in_line, out.in_line / 2))


def _search_buffer(history: TokenHistory, references: Sequence[Reference], limit: int) -> np.ndarray | None:
    """`lookup_chain`'s search buffer in `limit` tokens: each reference's head after a
    separator (-1), then a separator and the history's tail (it must come last)."""
    if limit < 2 or len(history) == 0:
        return None
    tail = history.array[-(limit - 1):]
    parts, left = [], limit - 1 - len(tail)
    for ref in references:
        take = min(len(ref.ids), left - 1)
        if take <= 0:
            break
        parts += [np.array([-1]), ref.ids[:take]]
        left -= take + 1
    return np.concatenate([*parts, np.array([-1]), tail]).astype(np.int64)


def _first_fire(gate: Gate, row_logits: torch.Tensor, accepted: Sequence[int], out: _Output) -> int | None:
    """The first position of the kept row (0..len(accepted)) where the gate fires, or None.

    `row_logits` [T, V]: position j gives the token after `accepted[:j]`. Positions after a
    token that ends the output are never emitted, so they are not gated.
    """
    end = out.cut().ends_at(accepted)
    last = len(accepted) if end is None else end
    scored = row_logits[: last + 1]
    if out.remaining:  # healing: no drafts, one position, gated on the masked distribution
        scored = out.healer.mask(scored, out.remaining)
    fires = gate.fires(scored).tolist()
    return fires.index(True) if True in fires else None


def _rollout_candidate(rerank: Rerank) -> Candidate:
    """The rerank winner's greedy rollout: what greedy will most likely emit after the winner."""
    tokens = list(rerank.rollouts[rerank.row])
    keys = [("rerank", min(j, 8)) for j in range(len(tokens))]
    return Candidate("rerank", tokens, keys, [0.9] * len(tokens))


def _dense(dist: dict[int, float], vocab: int) -> torch.Tensor:  # -> [V] fp32
    q = torch.zeros(vocab, dtype=torch.float32)
    q[list(dist)] = torch.tensor(list(dist.values()), dtype=torch.float32)
    return q
