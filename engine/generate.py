"""Prefill and plain decoding (greedy or sampled) with stop rules and timing counters.

prefill: ids -> slots `[start, start+n)` of a cache, chunked so memory stays bounded.
decode: from the logits after a context, sample tokens one forward at a time into a scratch
cache until a stop rule fires (EOS/stop token, N line ends, max tokens, or a callback, which
is how a cancelled request stops at its next step). The rules live in `Output`, the one output
builder every strategy emits through. Other strategies (speculation, AdaDec, beam search,
superposed drafts) build on the same pieces; a strategy that only changes which token greedy
decoding commits at a step (AdaDec's gate) plugs into `decode` as a `TokenChooser` instead of
copying its loop.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from editkv.engine.healing import healer_for
from editkv.engine.model import KVCache, Span, TokenGroup
from editkv.engine.sampling import SamplingParams, make_generator, next_token
from editkv.engine.tokenizer import Tokenizer
from editkv.kernels.logit_summary import LogitSummary, logit_summary

if TYPE_CHECKING:  # annotations only: engine.runner -> static_decode -> superposed_device imports this module
    from editkv.engine.runner import ModelRunner

PREFILL_CHUNK = 4096  # tokens per prefill forward on the CPU (~1 GB of activations at 7B)
# On a GPU: a whole file in one forward when it fits (large GEMMs, few launches; attention is
# flash-style and keeps no [T, S] scores, so memory grows only with T x the MLP's width).
PREFILL_CHUNK_CUDA = 32768


@dataclass(frozen=True)
class StopRules:
    """When a completion ends. `max_lines=1` stops at the first line end."""

    max_tokens: int = 64
    max_lines: int | None = 1
    stop_ids: frozenset[int] = frozenset()
    should_stop: Callable[[], bool] | None = None  # polled before every forward
    # a time.perf_counter() instant: past it, the completion ends at its next line end (one with
    # text before it); a multi-line suggestion's time limit
    lines_until: float | None = None
    ignore_eos: bool = False  # don't stop at the tokenizer's end/stop tokens (benchmarks of fixed length)

    def stop_set(self, tokenizer: Tokenizer) -> frozenset[int]:
        """The ids that end a completion: `stop_ids`, and the tokenizer's unless `ignore_eos`."""
        return self.stop_ids if self.ignore_eos else self.stop_ids | tokenizer.stop_ids


@dataclass
class DecodeStats:
    """Where a request's time went."""

    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    forwards: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms else 0.0


@dataclass
class Completion:
    """Generated ids, their text cut at the stop rule, and why decoding stopped."""

    ids: list[int]
    text: str
    stop_reason: str  # "stop_token" | "lines" | "max_tokens" | "cancelled" | "stop_text"
    stats: DecodeStats
    logprob: float = 0.0


@dataclass
class DecodeState:
    """Where decoding starts, as every decoding strategy takes it.

    The context's `Span`s (never written), a scratch cache whose first `scratch_used` slots
    hold the prompt's own tokens (written after that), the distribution of the first
    generated token, its position, and token-healing bytes. `prompt_ids` is the exact
    prompt the state stands for (drafters search it); edit_cache's views build these.
    """

    model: ModelRunner
    tokenizer: Tokenizer
    first_logits: torch.Tensor  # [1, V]
    context: list[Span]
    scratch: KVCache
    scratch_used: int
    next_position: int
    heal: bytes = b""
    prompt_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, model: ModelRunner, tokenizer: Tokenizer, prompt: list[int], *, heal: bytes = b"",
                    max_new_tokens: int = 64) -> DecodeState:
        """Prefill `prompt` into a fresh cache (the no-edit-cache path: CLI, benches)."""
        cache = model.new_cache(len(prompt))
        logits = prefill(model, prompt, cache)
        return cls(model, tokenizer, logits, [Span(cache, 0, len(prompt))], model.new_cache(max_new_tokens + 1),
                   0, len(prompt), heal, list(prompt))


def prefill(
    model: ModelRunner,
    ids: Sequence[int],
    cache: KVCache,
    *,
    start: int = 0,
    first_position: int = 0,
    context: Sequence[Span] = (),
    chunk: int | None = None,
    logits: str = "last",
    window: int | None = None,
    sink: tuple[KVCache, int] | None = None,
    per_forward: int | None = None,
) -> torch.Tensor | None:
    """Encode `ids` into `cache[start:start+n]` at consecutive positions; last (or all) logits.

    `chunk`: tokens per forward (None: the device's default, `prefill_chunk`). `window`: no
    query attends to a key more than `window - 1` positions back (the model's context, for
    texts longer than it): each chunk sees the keys `windowed` keeps, with `sink` (the document
    start) in front of them. `per_forward`: tokens per forward, several chunks riding in one as
    token groups (`TokenGroup`), each with its own window; default: one chunk, or with the
    default chunk the device's forward size (a window's chunks are small, and every forward
    costs a fixed overhead: ~1 ms of host time on a GPU, the parallel regions of every op on a
    CPU, which other processes on a shared machine make expensive).
    """
    n = len(ids)
    if per_forward is None and chunk is None:
        per_forward = prefill_chunk(None, device=model.device)
    chunk = prefill_chunk(window, chunk, device=model.device, end=first_position + n)
    per_forward = max(chunk, per_forward or chunk)
    cache.ensure_capacity(start + n)
    tensor = torch.tensor(list(ids), dtype=torch.long, device=model.device)[None]
    outputs = []
    out = None
    for lo in range(0, n, per_forward):
        hi = min(n, lo + per_forward)
        groups = []
        for group_lo in range(lo, hi, chunk):
            group_hi = min(hi, group_lo + chunk)
            spans = list(context)
            if group_lo > 0:
                spans = _extend(spans, Span(cache, start, start + group_lo))
            if window is not None:
                spans = windowed(spans, first_position + group_hi - window, sink)
            groups.append(TokenGroup(group_hi - group_lo, spans))
        want = logits if logits == "all" else ("last" if hi == n and logits == "last" else "none")
        positions = torch.arange(first_position + lo, first_position + hi, device=model.device)
        if len(groups) == 1:
            out = model(tensor[:, lo:hi], positions, write=cache, write_at=start + lo,
                        context=groups[0].context, logits=want)
        else:
            out = model(tensor[:, lo:hi], positions, write=cache, write_at=start + lo, groups=groups, logits=want)
        if logits == "all":
            outputs.append(out)
    if logits == "all":
        return torch.cat(outputs, dim=1)
    return out


def prefill_chunk(window: int | None, chunk: int | None = None, *, device: torch.device | str | None = None,
                  end: int | None = None) -> int:
    """Tokens per prefill forward: `chunk`, or the device's default (`PREFILL_CHUNK`,
    `PREFILL_CHUNK_CUDA`). Under a window, chunks see the keys before them through `windowed`
    but themselves whole, so a chunk must be small against the window, unless the positions
    end (`end`, exclusive) within it, where `windowed` drops nothing whatever the chunk."""
    if chunk is None:
        chunk = PREFILL_CHUNK_CUDA if device is not None and torch.device(device).type == "cuda" else PREFILL_CHUNK
    if window is None or (end is not None and end <= window):
        return chunk
    return max(1, min(chunk, window // 4))


def prefill_prompt(
    model: ModelRunner, prompt: Sequence[int], cache: KVCache, *, sink: int, room: int
) -> tuple[torch.Tensor, list[Span]]:
    """A whole prompt into `cache` under the model's attention window, its first `sink` ids
    the document start: (last logits, the context its decode steps see while they generate
    up to `room` more positions)."""
    window = model.config.max_position_embeddings
    sink_span = (cache, sink)
    logits = prefill(model, prompt, cache, window=window, sink=sink_span)
    return logits, windowed([Span(cache, 0, len(prompt))], len(prompt) + room - window, sink_span)


def windowed(spans: Sequence[Span], keep_from: int, sink: tuple[KVCache, int] | None = None) -> list[Span]:
    """`spans` without the keys at positions before `keep_from`, for texts longer than the
    model's context. Spans must be of caches whose slot index is the key's position (a
    document's cache, a prompt's), acting at index + shift.

    `sink` = (cache, n): slots [0, n) of that cache open every prompt (the document start
    token); the model leans on them as on a sink, so when anything is dropped they are kept,
    moved by PIE's rotation to sit right before the first kept key. Nothing changes while
    every key is at or after `keep_from`.
    """
    n_sink = sink[1] if sink is not None else 0
    if keep_from <= n_sink or all(s.start + s.shift >= keep_from for s in spans if s.end > s.start):
        return list(spans)
    out = [Span(sink[0], 0, n_sink, keep_from - n_sink)] if n_sink else []
    for s in spans:
        if s.end + s.shift <= keep_from:
            continue
        if s.start + s.shift < keep_from:
            s = Span(s.cache, keep_from - s.shift, s.end, s.shift)
        out.append(s)
    return out


def _extend(spans: list[Span], span: Span) -> list[Span]:
    """Append `span`, merging it into the last one when they are adjacent slots of one cache."""
    if spans:
        last = spans[-1]
        if last.cache is span.cache and last.end == span.start and last.shift == span.shift:
            return [*spans[:-1], Span(span.cache, last.start, span.end, span.shift)]
    return [*spans, span]


def chain_length(chain_steps: int, allowed: int) -> int:
    """Tokens to ask a chain for: `chain_steps`, or the largest power of two under the tokens
    still allowed (so a few graphs serve every request)."""
    if chain_steps <= 0 or allowed <= 0:
        return 0
    if allowed >= chain_steps:
        return chain_steps
    return 1 << (allowed.bit_length() - 1)


def line_ends(data: bytes) -> int:
    """Line ends in a token's bytes: what the line rule counts, on the host (`Output`) and in the
    device's tables (engine.decoding.superposed_device.token_rules). A newline byte is never part
    of another character, so per-token counts add up to the decoded text's."""
    return data.count(b"\n")


class LineStopper:
    """Tracks generated text and says where it must be cut for the line rule."""

    def __init__(self, tokenizer: Tokenizer, max_lines: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_lines = max_lines
        self._limit = max_lines  # the rule's own (`out_of_time` may end the text sooner)
        self._token_bytes: dict[int, bytes] | None = None

    def line_ends(self, token: int) -> int:
        """Line ends in one token's bytes (`line_ends`). They add up to `cut`'s count over the
        decoded text, without decoding all ids per token."""
        if self._token_bytes is None:
            self._token_bytes = healer_for(self.tokenizer).token_bytes
        return line_ends(self._token_bytes.get(token, b""))

    def out_of_time(self, lines_until: float | None, ids: list[int], lines: int) -> bool:
        """After a line end: whether `lines_until` has passed and the text up to it holds more than
        white space; then the cut moves there (`max_lines` = `lines`)."""
        if lines_until is None or time.perf_counter() <= lines_until:
            return False
        self.max_lines = lines
        if not self.cut(ids)[0].strip():
            self.max_lines = self._limit
            return False
        return True

    def cut(self, ids: list[int]) -> tuple[str, bool]:
        """(text to show, whether the line limit was reached)."""
        text = self.tokenizer.decode(ids)
        if self.max_lines is None:
            return text, False
        pos = -1
        for _ in range(self.max_lines):
            pos = text.find("\n", pos + 1)
            if pos < 0:
                return text, False
        return text[:pos], True


class Output:
    """Emitted ids through the output rules, in this order: heal, stop id, line (the line limit,
    then the multi-line time limit), stop text, length. Every decoding strategy emits through it:
    plain decoding (`decode`, AdaDec's chooser), speculative decoding on the host and on the
    device (engine/decoding/speculative), beam search (engine/decoding/beam.py) and superposed
    decoding (engine/decoding/superposed.py; its device chains apply the tables
    `superposed_device.token_rules` derives from an Output). `emit` takes a token at a time or a
    verified run of them.

    A strategy that keeps several hypotheses gives each its own Output: a child is its parent's
    `fork` plus one `emit` (`extended`), so the state a fork copies is small (ids, heal bytes
    left, line counts, log-prob, reason); rules, tokenizer and healer are shared.

    Line ends are counted per emitted token (`LineStopper.line_ends`) instead of decoding all ids
    at each token as `LineStopper.cut` does; with `stop_text` (which reads the text) it is decoded.
    """

    def __init__(self, tokenizer: Tokenizer, rules: StopRules, heal: bytes,
                 stop_text: Callable[[str], int | None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        self.stop_ids = rules.stop_set(tokenizer)
        self.stopper = LineStopper(tokenizer, rules.max_lines)
        self.healer = healer_for(tokenizer)
        self.heal = heal
        self.remaining = heal
        self.stop_text = stop_text
        self.ids: list[int] = []
        self.lines = 0  # line ends in the emitted ids' text
        self.in_line = 0  # emitted ids since the last line end (counted under a line rule)
        self.logprob = 0.0
        self.reason: str | None = None
        self._cut_text: str | None = None  # the text `stop_text` ended
        self._cut: str | None = None  # `cut()` of the ids as they are

    def fork(self) -> Output:
        """A copy that goes on on its own (a hypothesis's child): the small state copied, rules,
        tokenizer and healer shared."""
        child = Output.__new__(Output)
        child.__dict__.update(self.__dict__)
        child.ids = list(self.ids)
        if self.rules.lines_until is not None:  # the time limit moves its stopper's cut
            child.stopper = copy.copy(self.stopper)
        return child

    def extended(self, token: int, logprob: float = 0.0) -> Output:
        """A fork with `token` emitted (`reason` says whether a rule ended it)."""
        child = self.fork()
        child.emit([token], [logprob])
        return child

    def resumed(self, ids: Sequence[int], remaining: bytes) -> Output:
        """A fork of this (empty) Output standing after `ids`, emitted elsewhere with no rule firing
        (the drafts device chains extended), `remaining` heal bytes still to spell out."""
        child = self.fork()
        child.ids, child.remaining, child._cut = list(ids), remaining, None
        if self.rules.max_lines is not None or self.rules.lines_until is not None:
            for token in child.ids:
                ends = child.stopper.line_ends(token)
                child.lines += ends
                child.in_line = 0 if ends else child.in_line + 1
        return child

    def emit(self, tokens: Sequence[int], logprobs: Sequence[float]) -> int:
        """Append tokens until a rule fires (then `reason` says which); returns how many were appended."""
        max_lines = self.rules.max_lines
        for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            if self.remaining:
                self.remaining = self.healer.advance(self.remaining, token)
            if token in self.stop_ids:
                self.reason = "stop_token"
                return n
            self.logprob += logprob
            self.ids.append(token)
            self._cut = None
            if max_lines is not None or self.rules.lines_until is not None:
                ends = self.stopper.line_ends(token)
                self.lines += ends
                self.in_line = 0 if ends else self.in_line + 1
                if max_lines is not None and self.lines >= max_lines:
                    self.reason = "lines"
                    return n + 1
                if ends and self.stopper.out_of_time(self.rules.lines_until, self.ids, self.lines):
                    self.reason = "lines"
                    return n + 1
            if self.stop_text is not None:
                text = self.stopper.cut(self.ids)[0]
                if (at := self.stop_text(text)) is not None:
                    self._cut_text, self.reason = text[:at], "stop_text"
                    return n + 1
            if len(self.ids) >= self.rules.max_tokens:
                self.reason = "max_tokens"
                return n + 1
        return len(tokens)

    def cut(self) -> str:
        """The emitted text cut by the rules, the healed prefix still in it (decoded once per length)."""
        if self._cut_text is not None:
            return self._cut_text
        if self._cut is None:
            self._cut = self.stopper.cut(self.ids)[0]
        return self._cut

    def text(self, heal: bytes | None = None) -> str:
        """The emitted text as shown: cut by the rules, the healed prefix (default: this Output's) taken off."""
        text = self.cut()
        healed = (self.heal if heal is None else heal).decode("utf-8", errors="replace")
        return text[len(healed):] if text.startswith(healed) else text


class TokenChooser(Protocol):
    """Chooses each token of a greedy decode in place of the argmax (AdaDec's gate plugs in here).

    `choose` sees the distribution greedy would take the argmax of (healing mask applied), the
    batch-1 spans before the position and the healing bytes still to spell out. After the
    stop rules let the token through, `reuse` may write that token's K/V into `scratch[slot]`
    itself (it computed them already, e.g. in a lookahead rollout) and return the next
    logits [1, V]; None means decode runs the forward.
    """

    def choose(self, logits: torch.Tensor, context: Sequence[Span], position: int, remaining: bytes) -> int: ...

    def reuse(self, token: int, scratch: KVCache, slot: int) -> torch.Tensor | None: ...


def _greedy_step(logits: torch.Tensor, choose_from: torch.Tensor) -> tuple[int, float]:
    """The argmax of `choose_from` [1, V] and its log-probability under `logits`, in one host read.

    `choose_from` is `logits` itself or its healing-masked copy (-inf outside the allowed
    tokens, the allowed ones unchanged), so the argmax's logit is the same in both.
    """
    picked = logit_summary(choose_from, 1)
    full = picked if choose_from is logits else logit_summary(logits, 1)
    token, token_logprob = torch.stack((picked.ids[0, 0].double(),
                                        (picked.values[0, 0] - full.logsumexp[0]).double())).tolist()
    return int(token), token_logprob


def _token_logprob(logits: torch.Tensor, token: int, full: LogitSummary) -> float:
    """log p(token) under `logits` [1, V] (`full` = logit_summary(logits, 1)), the fp32
    difference `_greedy_step` takes: a chooser's greedy tokens carry the very logprob plain
    greedy gives them."""
    return float(logits[0, token].float() - full.logsumexp[0])


def decode(
    model: ModelRunner,
    tokenizer: Tokenizer,
    first_logits: torch.Tensor,  # [1, V]: logits for the first generated token
    *,
    context: Sequence[Span],
    next_position: int,
    params: SamplingParams | None = None,
    rules: StopRules | None = None,
    scratch: KVCache | None = None,
    scratch_used: int = 0,
    stats: DecodeStats | None = None,
    heal: bytes = b"",
    chooser: TokenChooser | None = None,
    stop_text: Callable[[str], int | None] | None = None,
) -> Completion:
    """Plain autoregressive decoding after `context`; generated K/V go to a scratch cache.

    `scratch_used` slots of `scratch` already hold view tokens (attended to, kept). `heal`
    is the text of a prompt token dropped by token healing: the first tokens must spell it
    out again, and it is cut from the returned text. `chooser` (greedy only) picks each token
    in place of the argmax. `stop_text(text)` may end a completion early: it returns where to
    cut the text (None = go on), for stops the line rule can't express (a new top-level `def`
    after a function body); the reason is then "stop_text".
    """
    stats = stats or DecodeStats()
    params = params or SamplingParams()
    rules = rules or StopRules()
    scratch = scratch or model.new_cache(rules.max_tokens + 1)
    scratch.ensure_capacity(scratch_used + rules.max_tokens + 1, keep=scratch_used)
    if chooser is not None and not params.greedy:
        raise ValueError("a TokenChooser replaces greedy's argmax; it does not combine with sampling")
    out = Output(tokenizer, rules, heal, stop_text)
    generator = make_generator(params, model.device)
    logits = first_logits
    started = time.perf_counter()
    # Plain greedy decoding on graphed forwards chains its steps on the device
    # (StaticForward.chain): `chained` holds the tokens a chain chose, not yet through the
    # output rules, with their log-probabilities and whether their K/V are written already.
    chain_steps = model.static.chain_steps if model.static is not None and chooser is None and params.greedy else 0
    chained: deque[tuple[int, float, bool]] = deque()
    while True:
        step = len(out.ids)
        token_logprob, written, full = None, False, None
        if chained:
            token, token_logprob, written = chained.popleft()
        else:
            remaining = out.remaining
            choose_from = out.healer.mask(logits, remaining) if remaining else logits
            if chooser is not None:
                full = logit_summary(logits, 1)  # queued before the chooser's wait; read after it
                token = chooser.choose(choose_from, [*context, Span(scratch, 0, scratch_used + step)],
                                       next_position + step, remaining)
            elif params.greedy:  # the argmax and its logprob in one host read
                token, token_logprob = _greedy_step(logits, choose_from)
            else:
                token = int(next_token(choose_from, params, generator)[0])
        if token_logprob is None and token not in out.stop_ids:
            token_logprob = _token_logprob(logits, token, full) if full is not None else \
                float(torch.log_softmax(logits[0].float(), -1)[token])
        if not out.emit([token], [token_logprob or 0.0]) or out.reason is not None:
            break
        if rules.should_stop is not None and rules.should_stop():
            out.reason = "cancelled"
            break
        slot = scratch_used + step
        if written:  # a chain encoded this token on its way to the next one
            continue
        reused = chooser.reuse(token, scratch, slot) if chooser is not None else None
        if reused is not None:
            logits = reused
            continue
        steps = chain_length(chain_steps, rules.max_tokens - len(out.ids))
        if steps and not out.remaining:
            chain = model.static.chain(token, next_position + step, scratch, slot,
                                       [*context, Span(scratch, 0, slot)], steps)
            if chain is not None:
                chosen, logprobs = chain.tolist()
                for k in range(steps):
                    chained.append((int(chosen[k]), logprobs[k], k < steps - 1))
                stats.forwards += steps
                continue
        logits = model(
            torch.tensor([[token]], device=model.device),
            torch.tensor([next_position + step], device=model.device),
            write=scratch,
            write_at=slot,
            context=[*context, Span(scratch, 0, slot)],
            logits="last",
        )
        stats.forwards += 1
    ids, text, reason = out.ids, out.text(heal), out.reason
    stats.decode_tokens += len(ids)
    stats.decode_ms += 1000 * (time.perf_counter() - started)
    return Completion(ids, text, reason, stats, out.logprob)
