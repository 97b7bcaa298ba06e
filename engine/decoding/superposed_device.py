"""Superposed decoding's steps on the device: scoring, selection and the next input, no host wait.

engine.decoding.superposed scores a step's k x m extensions on the host. On a GPU that is a
wait for every forward: the host reads the top tokens, looks up n-grams, picks the survivors
and sends the next weighted embedding, while the GPU idles. Here one step is device tensors
in, device tensors out, so steps queue up behind each other (on CUDA one captured graph each,
the forward included) and the host reads the drafts once per chain of steps:

  logits [1, V] -> each draft's top m tokens under its healing row (token healing: one masked
  row per byte offset into the healed text, `heal_tables`; a draft past it takes the unmasked
  last row) and their log-probabilities at the low temperature ->
  p_ng of each (draft, token): counts over the workspace's token stream (each draft's last
  1..5 tokens against every position of the stream) and the shipped corpus table (the context
  hash computed on the device, one binary search) -> the mixed scores, renormalised over the m
  -> children: finished ones (a stop id, a line end, the token limit) update the pool that
  decides when decoding ends, the best k unfinished ones live on -> the score-weighted sum of
  their last tokens' embeddings, written into the forward's static input -> the forward.

`select_ref` and `next_input` define a step in torch ops (the CPU's static mode runs them); on
CUDA `advance` runs kernels/superposed_select.py instead (two Triton programs in place of ~150
small kernels; tests/kernels/test_superposed_select.py holds them to the definition).

The per-vocabulary tables a step applies (`token_rules`: which ids stop, which tokens end a
line, what text a finished draft leaves) derive from the engine.generate.Output the host loop's
drafts emit through: its stop ids and its line rule (`line_ends`).

It computes what the host loop computes (tests/engine/test_superposed_device.py holds the
drafts equal), with two differences in what it sees:
  - the line rule is per token: a token that holds a newline ends its draft (max_lines 1),
    and children of one draft that end in the same text are one (the best kept). Two drafts
    of equal text from different tokenizations are not merged on the device; the host merges
    them when it builds the returned pool, so at worst decoding runs a step longer;
  - the workspace stream holds the index's documents, most recently used first, up to
    STREAM tokens (the host index may hold more: past that, counts differ).
Healed text longer than MAX_HEAL_ROWS - 1 bytes leaves the request to the host loop.
Resets (re-encoding the best draft after `reset_every` superposed steps), cancellation and
building the returned drafts' text stay on the host, between chains.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.generate import Output, line_ends
from editkv.engine.identity_cache import IdentityCache
from editkv.engine.ngram import NgramTable
from editkv.engine.readback import Readback
from editkv.kernels.context_hash import BITS, context_hash_ref
from editkv.kernels.logit_summary import logit_summary
from editkv.kernels.superposed_select import counts_buffer, superposed_select_triton
from editkv.kernels.superposed_select import triton as _triton

ORDERS = 5  # context lengths 1..5 (n = 2..6), SuperposedParams.lambdas
STREAM = 65536  # workspace tokens the device counts n-grams over
NEVER = -7  # pads a draft's context: equals no stream entry (stream pads and separators are -1)
MAX_CHAIN = 16
# why a chain stopped: still running, no live draft, the pool is full and no live draft can
# beat it, the latency budget, a reset is due (the host re-encodes the best draft)
RUNNING, NO_LIVE, POOL_FULL, BUDGET, RESET = range(5)
# meta entries: draft length, committed, token budget, reason, steps run, first position,
# first slot, left context length, max tokens, healed bytes to spell out (from the draft start)
LENGTH, COMMITTED, BUDGET_AT, REASON, STEPS, POSITION, SLOT, LEFT, MAX_TOKENS, HEAL = range(10)
META = 10
MAX_HEAL_ROWS = 32  # healing tables: one row per byte offset into the healed text, and a last row


@dataclass
class TokenRules:
    """Per-vocabulary facts the device applies instead of decoding text."""

    finish_class: torch.Tensor  # [V] long: -1 continues the draft; else the id of the text it leaves
    is_stop: torch.Tensor  # [V] bool
    content: torch.Tensor  # [V] bool: the token's bytes hold a non-whitespace byte
    content_before_end: torch.Tensor  # [V] bool: ... before its first newline
    length: torch.Tensor  # [V] long: the token's bytes
    gain: torch.Tensor  # [V] bool: the token adds content to a draft's (line-cut) text
    healer: object = None  # engine.healing.TokenHealer of the tokenizer (it holds the tokenizer weakly)
    # heal_tables' results for these rules, (heal, rows) -> tables, most recent last
    heal_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)


_RULES = IdentityCache()  # tokenizer -> {(stop ids, max lines, vocab, device): TokenRules}, freed with it
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")


def token_rules(out: Output, vocab: int, device: torch.device) -> TokenRules | None:
    """The tables of `out`'s rules (engine.generate.Output, an empty one: what a draft emits
    through on the host): its stop ids, and its line rule per token by `line_ends`, for
    `max_lines` None or 1 (None for more lines: the host loop serves those). The multi-line time
    limit and `stop_text` have no table (the caller decides whether chains run without them)."""
    tokenizer, stop_ids, max_lines = out.tokenizer, out.stop_ids, out.rules.max_lines
    if max_lines not in (None, 1):
        return None
    key = (stop_ids, max_lines, vocab, str(device))
    kept = _RULES.get(tokenizer)
    if kept is None:
        kept = _RULES.put(tokenizer, {})
    found = kept.get(key)
    if found is not None:
        return found
    healer = out.healer
    token_bytes = healer.token_bytes
    finish = np.full(vocab, -1, dtype=np.int64)
    content = np.zeros(vocab, dtype=bool)
    before = np.zeros(vocab, dtype=bool)
    classes = {b"": 0}  # a stop id leaves the draft's text as it was: the class of an empty line end
    for token, data in token_bytes.items():
        if token >= vocab:
            continue
        content[token] = any(b not in _WHITESPACE for b in data)
        ends = line_ends(data)
        if ends:
            end = data.find(b"\n")
            before[token] = any(b not in _WHITESPACE for b in data[:end])
            if max_lines is not None and ends >= max_lines:  # Output's line rule, from a draft with no line end
                finish[token] = classes.setdefault(data[:end], len(classes))
        else:
            before[token] = content[token]
    stop = np.zeros(vocab, dtype=bool)
    for token in stop_ids:
        if 0 <= token < vocab:
            stop[token], finish[token] = True, 0
    length = np.zeros(vocab, dtype=np.int64)
    for token, data in token_bytes.items():
        if token < vocab:
            length[token] = len(data)
    gain = np.where(finish >= 0, before, content) & ~stop
    rules = TokenRules(*(torch.from_numpy(a).to(device) for a in (finish, stop, content, before, length, gain)),
                       healer=healer)
    kept[key] = rules  # a few per tokenizer: one per stop set and line rule
    return rules


_KEPT_HEAL_TABLES = 64  # per TokenRules


def heal_rows(heal: bytes) -> int | None:
    """Rows of the healing tables for `heal` (a power of two > its length), None past MAX_HEAL_ROWS."""
    rows = 1 << len(heal).bit_length()
    return rows if rows <= MAX_HEAL_ROWS else None


def heal_tables(rules: TokenRules, heal: bytes, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, V] allowed, [rows, V] adds content): row o < len(heal) is for a draft with
    heal[o:] still to spell out (the healing mask; whether a token adds content past the healed
    text, up to a line end), the others for a draft past it (every token; `rules.gain`)."""
    key = (heal, rows)
    found = rules.heal_cache.get(key)
    if found is not None:
        rules.heal_cache.move_to_end(key)
        return found
    vocab, device = rules.gain.shape[0], rules.gain.device
    masks = torch.ones((rows, vocab), dtype=torch.bool, device=device)
    gain = rules.gain[None].repeat(rows, 1)
    healer = rules.healer
    for o in range(len(heal)):
        remaining = heal[o:]
        allowed = healer.allowed(remaining)
        row = np.zeros(vocab, dtype=bool)
        adds = np.zeros(vocab, dtype=bool)
        for token in allowed:
            if token >= vocab:
                continue
            row[token] = True
            extra = healer.token_bytes.get(token, b"")[len(remaining):]
            end = extra.find(b"\n")
            adds[token] = any(b not in _WHITESPACE for b in (extra[:end] if end >= 0 else extra))
        masks[o] = torch.from_numpy(row).to(device)
        gain[o] = torch.from_numpy(adds).to(device)
    if len(rules.heal_cache) >= _KEPT_HEAL_TABLES:
        rules.heal_cache.popitem(last=False)
    rules.heal_cache[key] = (masks, gain)
    return masks, gain


@dataclass
class DeviceCorpus:
    """The corpus table on the device: every order's hashes (order above bit 50), sorted."""

    keys: torch.Tensor  # [N] long
    next_ids: torch.Tensor  # [N, top] long, -1 = none
    counts: torch.Tensor  # [N, top] float64
    max_order: int


_CORPORA = IdentityCache()  # NgramTable -> {device: DeviceCorpus}, freed with the table (a model reload)


def device_corpus(corpus: NgramTable, device: torch.device) -> DeviceCorpus:
    """`corpus` on `device` (built once per table and device)."""
    kept = _CORPORA.get(corpus)
    if kept is None:
        kept = _CORPORA.put(corpus, {})
    found = kept.get(str(device))
    if found is not None:
        return found
    orders = [c for c in range(1, corpus.max_order) if len(corpus.hashes.get(c, ()))]
    keys = np.concatenate([corpus.hashes[c].astype(np.int64) + (c << BITS) for c in orders]
                          or [np.zeros(0, np.int64)])
    ids = np.concatenate([corpus.next_ids[c].astype(np.int64) for c in orders] or [np.zeros((0, 1), np.int64)])
    counts = np.concatenate([corpus.counts[c].astype(np.float64) for c in orders]
                            or [np.zeros((0, 1), np.float64)])
    found = DeviceCorpus(torch.from_numpy(keys).to(device), torch.from_numpy(ids).to(device),
                         torch.from_numpy(counts).to(device), corpus.max_order)
    kept[str(device)] = found
    return found


def corpus_keys(ctx: torch.Tensor, max_order: int) -> torch.Tensor:
    """[k, ORDERS] keys into DeviceCorpus.keys of each draft's last c = 1..ORDERS tokens (orders
    the table lacks get -1); kernels/context_hash.py's hash."""
    k = ctx.shape[0]
    out = torch.full((k, ORDERS), -1, dtype=torch.long, device=ctx.device)
    for c in range(1, min(max_order, ORDERS + 1)):
        out[:, c - 1] = context_hash_ref(ctx[:, ORDERS - c :]) + (c << BITS)
    return out


class SuperposedBuffers:
    """The device state of one request's superposed chains (k drafts, m extensions each)."""

    def __init__(self, k: int, m: int, max_t: int, vocab: int, device: torch.device) -> None:
        self.k, self.m, self.max_t = k, m, max_t
        self.ids = torch.zeros((k, max_t), dtype=torch.long, device=device)
        self.score = torch.full((k,), -math.inf, dtype=torch.float64, device=device)
        self.nonempty = torch.zeros(k, dtype=torch.bool, device=device)
        self.ctx = torch.full((k, ORDERS), NEVER, dtype=torch.long, device=device)
        self.pool = torch.full((k,), -math.inf, dtype=torch.float64, device=device)
        self.meta = torch.zeros(META, dtype=torch.long, device=device)
        self.heal_at = torch.zeros(k, dtype=torch.long, device=device)  # bytes of the healed text spelled
        self.rows = 1  # healing table rows of this request (their static buffers: `heal_table`)
        self._heal_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.logits = torch.zeros((1, vocab), dtype=torch.float32, device=device)
        # per step of a chain: the drafts extended, the m tokens, the scores of pooled children
        self.log_ids = torch.zeros((MAX_CHAIN, k, max_t), dtype=torch.long, device=device)
        self.log_tokens = torch.zeros((MAX_CHAIN, k, m), dtype=torch.long, device=device)
        self.log_scores = torch.full((MAX_CHAIN, k, m), -math.inf, dtype=torch.float64, device=device)
        # the workspace stream behind ORDERS pad slots (a context reaching before the start
        # matches nothing); the length in use is a power of two >= 1024 (`stream_length`)
        self.stream = torch.full((ORDERS + STREAM,), -1, dtype=torch.long, device=device)
        self.stream_length = 1024
        pinned = device.type == "cuda"
        self._stream_host = torch.full((STREAM,), -1, dtype=torch.long, pin_memory=pinned)
        self._state_host = torch.zeros(k * max_t + META + k * ORDERS + 2 * k, dtype=torch.long, pin_memory=pinned)
        self._score_host = torch.zeros(2 * k, dtype=torch.float64, pin_memory=pinned)
        self.counts = counts_buffer(k, m, device)  # the select kernel's n-gram counts (kept zeroed)
        self.mix_ids = torch.zeros(k, dtype=torch.long, device=device)  # the select kernel's next input
        self.mix_w = torch.zeros(k, dtype=torch.float64, device=device)
        # a ring of two: one chain's results land while the host reads the one before
        self._readback = Readback(self.pack_size, 2, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state by name, as kernels/superposed_select.py takes it."""
        return {"ids": self.ids, "score": self.score, "nonempty": self.nonempty, "ctx": self.ctx, "pool": self.pool,
                "meta": self.meta, "log_ids": self.log_ids, "log_tokens": self.log_tokens,
                "log_scores": self.log_scores, "mix_ids": self.mix_ids, "mix_w": self.mix_w, "heal_at": self.heal_at}

    def state_tensors(self) -> list[torch.Tensor]:
        """What a step reads and writes (a graph's warm-ups are undone by copying these back)."""
        return [self.ids, self.score, self.nonempty, self.ctx, self.pool, self.meta, self.logits, self.log_ids,
                self.log_tokens, self.log_scores, self.counts, self.mix_ids, self.mix_w, self.heal_at]

    def heal_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static [rows, V] healing tables the steps read (filled by `stage_heal`)."""
        found = self._heal_buffers.get(self.rows)
        if found is None:
            vocab, device = self.logits.shape[1], self.logits.device
            found = self._heal_buffers[self.rows] = (torch.ones((self.rows, vocab), dtype=torch.bool, device=device),
                                                     torch.zeros((self.rows, vocab), dtype=torch.bool, device=device))
        return found

    def stage_heal(self, rules: TokenRules, heal: bytes) -> bool:
        """Load the healing tables for `heal`; False when it is too long for them."""
        rows = heal_rows(heal)
        if rows is None:
            return False
        masks, gain = heal_tables(rules, heal, rows)
        self.rows = rows
        table_masks, table_gain = self.heal_table()
        table_masks.copy_(masks)
        table_gain.copy_(gain)
        return True

    @property
    def pack_size(self) -> int:
        k, m, t = self.k, self.m, self.max_t
        return k * t + k + k + k + META + MAX_CHAIN * (k * t + k * m + k * m)

    def stage_stream(self, index: NgramIndex | None) -> None:
        """The index's documents, most recently used first, -1 between them, up to STREAM tokens."""
        host = self._stream_host.numpy()
        n = 0
        if index is not None:
            for uri in reversed(index.docs):
                doc = np.frombuffer(index.docs[uri], dtype=np.int64)
                take = min(len(doc), STREAM - n)
                if take < len(doc) and n:  # keep whole documents where one more does not fit
                    break
                host[n : n + take] = doc[:take]
                n += take
                if n < STREAM:
                    host[n] = -1
                    n += 1
                if n >= STREAM:
                    break
        length = max(1024, 1 << max(n, 1).bit_length()) if n < STREAM else STREAM
        length = min(length, STREAM)
        host[n:length] = -1
        if self._stream_host.is_pinned():
            torch.cuda.current_stream().synchronize()  # the last copy from this buffer has landed
        self.stream[ORDERS : ORDERS + length].copy_(self._stream_host[:length], non_blocking=True)
        self.stream_length = length

    def stage(self, drafts: list[tuple[list[int], float, bool, int]], left: list[int], meta: dict[str, int]) -> None:
        """Load live drafts (ids, score, has content, healed bytes spelled) and the counters (`meta`:
        length, committed, budget, position, slot, left, max_tokens, heal, and the pool's scores),
        in two copies."""
        k, t = self.k, self.max_t
        host = self._state_host.numpy()
        if self._state_host.is_pinned():
            torch.cuda.current_stream().synchronize()  # the last copy from these buffers has landed
        host[: k * t] = 0
        scores = self._score_host.numpy()
        scores[:] = -math.inf
        at = k * t + META
        ctx = host[at : at + k * ORDERS].reshape(k, ORDERS)
        ctx[:] = NEVER
        nonempty = host[at + k * ORDERS : at + k * ORDERS + k]
        nonempty[:] = 0
        heal_at = host[at + k * ORDERS + k :]
        heal_at[:] = meta.get("heal", 0)
        for i, (ids, score, content, spelled) in enumerate(drafts[:k]):
            host[i * t : i * t + len(ids)] = ids
            scores[i] = score
            nonempty[i] = content
            heal_at[i] = spelled
            tail = (left + ids)[-ORDERS:]
            if tail:
                ctx[i, ORDERS - len(tail) :] = tail
        for name, i in (("length", LENGTH), ("committed", COMMITTED), ("budget", BUDGET_AT), ("position", POSITION),
                        ("slot", SLOT), ("left", LEFT), ("max_tokens", MAX_TOKENS), ("heal", HEAL)):
            host[k * t + i] = meta.get(name, 0)
        host[k * t + REASON] = RUNNING
        host[k * t + STEPS] = 0
        pool = meta.get("pool", [])
        scores[k : k + len(pool)] = pool[:k]
        state = self._state_host.to(self.ids.device, non_blocking=True)
        self.ids.copy_(state[: k * t].view(k, t))
        self.meta.copy_(state[k * t : at])
        self.ctx.copy_(state[at : at + k * ORDERS].view(k, ORDERS))
        self.nonempty.copy_(state[at + k * ORDERS : at + k * ORDERS + k] > 0)
        self.heal_at.copy_(state[at + k * ORDERS + k :])
        both = self._score_host.to(self.ids.device, non_blocking=True)
        self.score.copy_(both[:k])
        self.pool.copy_(both[k:])
        self.log_scores.fill_(-math.inf)

    def enqueue_read(self) -> tuple[int, torch.cuda.Event | None, int]:
        """Queue the copy of the state and the chain's log to the host."""
        return self._readback.send([self.ids, self.score, self.nonempty, self.heal_at, self.meta, self.log_ids,
                                    self.log_tokens, self.log_scores])

    def drain(self) -> None:
        """Wait until no copy of this buffer's state is in flight (see engine/readback.py)."""
        self._readback.drain()

    def collect(self, ticket: tuple[int, torch.cuda.Event | None, int]) -> dict:
        """Wait for `enqueue_read`'s copy; the state as Python values."""
        v = self._readback.receive(ticket)
        k, m, t = self.k, self.m, self.max_t
        at = 0

        def take(n):
            nonlocal at
            at += n
            return v[at - n : at]

        ids = take(k * t).reshape(k, t).astype(np.int64)
        score, nonempty, heal_at, meta = take(k), take(k), take(k).astype(np.int64), take(META).astype(np.int64)
        log_ids = take(MAX_CHAIN * k * t).reshape(MAX_CHAIN, k, t).astype(np.int64)
        log_tokens = take(MAX_CHAIN * k * m).reshape(MAX_CHAIN, k, m).astype(np.int64)
        log_scores = take(MAX_CHAIN * k * m).reshape(MAX_CHAIN, k, m)
        return {"ids": ids, "score": score.copy(), "nonempty": nonempty > 0, "heal_at": heal_at, "meta": meta,
                "log_ids": log_ids, "log_tokens": log_tokens, "log_scores": log_scores.copy()}


def ngram_probs(buf: SuperposedBuffers, cand: torch.Tensor, corpus: DeviceCorpus | None, lambdas: tuple[float, ...],
                workspace_weight: float) -> torch.Tensor:
    """[k, m] float64 p_ng of each draft's candidates `cand` [k, m] (NgramMixture's, on the device)."""
    k, n = buf.k, buf.stream_length
    stream = buf.stream
    nxt = stream[ORDERS : ORDERS + n]  # the token at each position
    valid = nxt >= 0
    # runs[c - 1, i, j]: the c tokens before position j are draft i's last c
    runs = []
    run = None
    for c in range(1, ORDERS + 1):
        eq = stream[ORDERS - c : ORDERS - c + n][None, :] == buf.ctx[:, ORDERS - c, None]  # [k, n]
        run = eq if run is None else run & eq
        runs.append(run & valid)
    runs = torch.stack(runs).to(torch.float32)  # [ORDERS, k, n]
    hits = (nxt[None, None, :] == cand[:, :, None]).to(torch.float32)  # [k, m, n]
    totals = runs.sum(-1).double()  # [ORDERS, k]; counts < 2^24 add exactly in float32
    grams = torch.einsum("okn,kmn->okm", runs, hits).double()  # [ORDERS, k, m]
    seen = totals > 0
    workspace = grams / totals.clamp(min=1)[..., None]
    out = torch.zeros((k, cand.shape[1]), dtype=torch.float64, device=cand.device)
    corpus_p = corpus_seen = None
    if corpus is not None and len(corpus.keys):
        keys = corpus_keys(buf.ctx, corpus.max_order)  # [k, ORDERS]
        at = torch.searchsorted(corpus.keys, keys).clamp(max=len(corpus.keys) - 1)
        ctx_len = torch.clamp(buf.meta[LEFT] + buf.meta[LENGTH], max=ORDERS)
        orders = torch.arange(1, ORDERS + 1, device=cand.device)
        found = (corpus.keys[at] == keys) & (keys >= 0) & (orders[None, :] <= ctx_len)  # [k, ORDERS]
        ids, counts = corpus.next_ids[at], corpus.counts[at]  # [k, ORDERS, top]
        total = (counts * (ids >= 0)).sum(-1)  # [k, ORDERS]
        corpus_seen = found & (total > 0)
        match = (ids[:, :, None, :] == cand[:, None, :, None]) & (ids >= 0)[:, :, None, :]  # [k, O, m, top]
        corpus_p = (match * counts[:, :, None, :]).sum(-1) / total.clamp(min=1)[..., None]  # [k, ORDERS, m]
    w = workspace_weight
    for c, lam in enumerate(lambdas[:ORDERS], start=1):
        pw, has_w = workspace[c - 1], seen[c - 1][:, None]  # [k, m], [k, 1]
        if corpus_p is None:
            p = torch.where(has_w, pw, 0.0)
        else:
            pc, has_c = corpus_p[:, c - 1], corpus_seen[:, c - 1][:, None]
            p = torch.where(has_w & has_c, w * pw + (1 - w) * pc, torch.where(has_w, pw, torch.where(has_c, pc, 0.0)))
        out = out + lam * p
    return out


@torch.inference_mode()
def advance(buf: SuperposedBuffers, rules: TokenRules, corpus: DeviceCorpus | None, params, mixed: bool, embed,
            embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
    """One step before its forward: extend the live drafts by the top tokens of `buf.logits`,
    update the pool, keep the best k, and write the next input (`embeds` [1, 1, hidden], the
    position and slot) — kernels/superposed_select.py on CUDA, `select_ref` and `next_input`
    elsewhere."""
    cand, values, lse = candidates(buf, params.temperature)
    if buf.logits.is_cuda and _triton is not None:
        _, gain = buf.heal_table()
        superposed_select_triton(values, cand, lse, buf.counts, buf.stream, buf.stream_length, corpus, rules, gain,
                                 buf.tensors(), params, mixed, positions, slots)
        emb = embed(buf.mix_ids[None])  # [1, k, hidden]
        embeds.copy_((buf.mix_w.to(emb.dtype)[None, :, None] * emb).sum(1, keepdim=True))
    else:
        select_ref(buf, rules, corpus, params, mixed, cand, values, lse)
        next_input(buf, embed, params.weight_scale, embeds, positions, slots)


def candidates(buf: SuperposedBuffers, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([k, m] candidates, their logits / T, [1] log-sum-exp of logits / T): each draft's
    top m of the logits under its healing row (all tokens once its healed text is spelled)."""
    masks, _ = buf.heal_table()
    rows = torch.where(masks, buf.logits / temperature, float("-inf"))  # [rows, V]
    summary = logit_summary(rows, buf.m)
    row = torch.where(buf.heal_at < buf.meta[HEAL], buf.heal_at, buf.rows - 1)  # [k]
    return summary.ids[row], summary.values[row], summary.logsumexp[buf.rows - 1 :]


def select_ref(buf: SuperposedBuffers, rules: TokenRules, corpus: DeviceCorpus | None, params, mixed: bool,
               cand: torch.Tensor, values: torch.Tensor, lse: torch.Tensor) -> None:
    """The definition of a step's selection, in torch ops: `cand` [k, m] each draft's top m
    tokens (masked by its healing row), `values` their logits / T, `lse` [1] the log-sum-exp of
    logits / T (`candidates`)."""
    k, m = buf.k, buf.m
    meta = buf.meta
    length, committed, budget = meta[LENGTH], meta[COMMITTED], meta[BUDGET_AT]
    running = meta[REASON] == RUNNING
    s = (values - lse).double()  # [k, m]; -inf where a healing row allows fewer than m tokens
    if mixed:
        p = torch.where(s > -math.inf, ngram_probs(buf, cand, corpus, params.lambdas, params.workspace_weight), 0.0)
        a = params.alpha
        s = torch.where((p > 0).any(-1, keepdim=True), (1 - a) * s + a * torch.log(p.clamp(min=params.ngram_floor)), s)
    top = s.max(-1, keepdim=True).values.clamp(min=-1e300)  # a row of nothing allowed stays -inf
    norm = top + torch.log(torch.exp(s - top).sum(-1, keepdim=True))
    child = buf.score[:, None] + s - norm  # [k, m]; a dead draft's children stay -inf
    alive = child > -math.inf
    cls = rules.finish_class[cand]  # [k, m]
    at_limit = length + 1 >= meta[MAX_TOKENS]
    finished = (cls >= 0) | at_limit
    # children of one draft that leave the same text are one: the best (the first on a tie)
    same = (cls[:, :, None] == cls[:, None, :]) & (cls >= 0)[:, :, None]  # [k, m, m]
    order = torch.arange(m, device=cand.device)
    first = (order[None, :] < order[:, None])[None]  # [1, m, m]: c' comes before c
    beaten = (child[:, None, :] > child[:, :, None]) | ((child[:, None, :] == child[:, :, None]) & first)
    dup = (same & beaten & ~torch.eye(m, dtype=torch.bool, device=cand.device)[None]).any(-1)  # [k, m]
    _, gain = buf.heal_table()
    row = torch.where(buf.heal_at < meta[HEAL], buf.heal_at, buf.rows - 1)  # [k]
    gained = gain[row[:, None], cand]  # past the healed text, up to a line end
    nonempty = buf.nonempty[:, None] | gained
    pooled = finished & alive & ~dup & nonempty
    pooled_scores = torch.where(pooled, child, -math.inf)
    pool = torch.cat((buf.pool, pooled_scores.flatten())).topk(k).values
    # survivors: the best k unfinished children, ties in (draft, token) order
    cont = torch.where(finished | ~alive, -math.inf, child).flatten()
    picked = torch.sort(cont, descending=True, stable=True).indices[:k]
    new_score = cont[picked]
    parent, token = picked // m, cand.flatten()[picked]
    new_ids = buf.ids[parent].scatter(1, length.expand(k, 1), token[:, None])
    new_nonempty = nonempty.flatten()[picked]
    new_ctx = torch.cat((buf.ctx[parent, 1:], token[:, None]), 1)
    spelled = buf.heal_at[parent]
    new_heal_at = torch.where(spelled < meta[HEAL], torch.clamp(spelled + rules.length[token], max=meta[HEAL]), spelled)
    live = new_score > -math.inf
    n_live = live.sum()
    now = length + 1
    best = new_score[0]
    if params.finish_ratio is not None:
        lower = (budget == meta[MAX_TOKENS]) & (n_live > 0) & (pool[0] > -math.inf) & (pool[0] >= best)
        lowered = torch.minimum(budget, torch.maximum(torch.ceil(params.finish_ratio * now.double()).long(),
                                                      now + params.finish_slack))
        budget = torch.where(lower, lowered, budget)
    reason = torch.where(n_live == 0, NO_LIVE, torch.where(
        (pool[-1] > -math.inf) & (best <= pool[-1]), POOL_FULL, torch.where(
            now >= budget, BUDGET, torch.where(now - 1 - committed >= params.reset_every, RESET, RUNNING))))
    # a single live draft is an ordinary token: its slot is real
    committed = torch.where((reason == RUNNING) & (n_live == 1) & (committed == now - 1), now, committed)
    # log the pooled children with the drafts they extend (the host rebuilds their text)
    step = meta[STEPS].clamp(max=MAX_CHAIN - 1)
    at = step[None]  # a one-element index: a 0-dim one would be read on the host
    buf.log_ids.index_copy_(0, at, torch.where(running, buf.ids, buf.log_ids.index_select(0, at)[0])[None])
    buf.log_tokens.index_copy_(0, at, cand[None])  # [k, m] per step
    buf.log_scores.index_copy_(0, at, torch.where(running, pooled_scores, -math.inf)[None])
    # nothing changes once a step has stopped the chain
    buf.ids.copy_(torch.where(running, new_ids, buf.ids))
    buf.score.copy_(torch.where(running, new_score, buf.score))
    buf.nonempty.copy_(torch.where(running, new_nonempty, buf.nonempty))
    buf.ctx.copy_(torch.where(running, new_ctx, buf.ctx))
    buf.heal_at.copy_(torch.where(running, new_heal_at, buf.heal_at))
    buf.pool.copy_(torch.where(running, pool, buf.pool))
    update = torch.stack((now, committed, budget, reason, meta[STEPS] + 1))
    meta[:5].copy_(torch.where(running, update, meta[:5]))


@torch.inference_mode()
def next_input(buf: SuperposedBuffers, embed, weight_scale: float, embeds: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor) -> None:
    """The live drafts' score-weighted last-token embedding into `embeds` [1, 1, hidden], at the
    slot and position of the drafts' last token."""
    meta = buf.meta
    last = buf.ids.gather(1, (meta[LENGTH] - 1).clamp(min=0).expand(buf.k, 1))[:, 0]
    live = buf.score > -math.inf
    scaled = torch.where(live, weight_scale * buf.score, -1e300)  # no live draft: finite weights
    gamma = torch.softmax(scaled, 0)
    emb = embed(torch.where(live, last, 0)[None])  # [1, k, hidden]
    embeds.copy_((gamma.to(emb.dtype)[None, :, None] * emb).sum(1, keepdim=True))
    positions.copy_((meta[POSITION] + meta[LENGTH] - 1)[None])
    slots.copy_((meta[SLOT] + meta[LENGTH] - 1)[None])
