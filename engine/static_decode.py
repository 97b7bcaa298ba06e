"""Static-shape forwards over one KV buffer, captured once and replayed as CUDA graphs.

At batch 1, a decode step of a 1.5B model reads ~3 GB of weights (about 1 ms on an H100),
but launched op by op from Python it takes tens of milliseconds: the GPU waits on the host.
The remedy is to capture the step once as a CUDA graph and replay it, which needs every
shape, and every index the kernels read, to be fixed or to live in device memory.

`StaticForward` recognises the forwards the hot path makes — a PIE repair encoding a few
new tokens, a view encoding the text before the cursor, a decode step, a speculative
verification — when they write a few tokens into one buffer (a document's cache, or the
scratch window after its last slot) and attend to slots of that same buffer in this shape:

    [0, sink_end)                   acting `sink_shift` on      (an attention window's sink)
    [prefix_start, prefix_end)      at their positions          (the document before the cursor)
    [suffix_start, suffix_end)      acting `shift` positions on (the FIM view's suffix)
    [scratch_start, own slot]       causally                    (view tokens, generated tokens)

(The sink and a prefix that starts past slot 0 come from documents longer than the model's
context: engine.generate.windowed keeps the window of keys a query may see and moves the
document start in front of it.) Those numbers, the tokens' ids, positions and slots are copied
into static device tensors; attention (kernels/span_attention.py) reads the buffer's first
`bucket` slots (1024 times a power of two, covering the buffer's `extent`, the slots its owner
has in use) and applies the visibility rule on the device, so a repair near the top of a file replays
the same graph as one near its end. Norms, RoPE with the KV write, and SwiGLU are fused kernels
(kernels/fused.py); q/k/v and gate/up are one GEMM each. One graph per
(buffer, bucket, width, rows wanted) is captured on first use and replayed after. On a GPU the
documents' caches are regions of one KV pool (engine/kv_pool.py): the buffer is the pool's, the
spans and the bucket count from the region's first slot (the `origin`, a static input), so the
graphs are per shape and every document replays the same ones. A server defers captures
(`defer_captures`): a forward whose graph is missing runs the same static ops eagerly, and the
graph is captured when the user is idle (`capture_pending`; chained greedy steps too, while
`lookup_chain` and superposed graphs are still captured on first use); the width is
the token count rounded up to a power of two (up to 256), padding rows write into the buffer's
last slot, which the caller keeps free, and the head runs on the rows the caller wants logits
of: all (a verification), the last real one (a view), none (a repair). A forward up to twice
the widest graph (a FIM view's `<SUF>` with its 256 re-encoded suffix tokens) replays as parts,
each part seeing the ones before it in the buffer; wider ones run eagerly.

`forward(..., lanes=(first slot, k))` takes k sequences decoded side by side after one shared
prompt (beam search's beams, engine/decoding/beam.py): their tokens interleave in the scratch
from that slot on, one per lane and step, and each sees the shared spans and its own lane only
(the two lane numbers are static inputs, so it replays the graphs every width-k forward does).

`chain` runs plain greedy decoding on the device: it replays the one-token step `steps` times,
each fed the argmax of the step before by device ops queued between the replays, and hands
back the chosen ids with their log-probabilities in one small copy. Between two graphed decode
steps the host otherwise waits for the argmax, checks the stop rules and fills the next step's
inputs — on a small model that is most of a step's time; the caller applies its stop rules to
the chain's tokens afterwards and drops what follows a stop (their K/V sit in scratch slots
past the ones it keeps).

`lookup_chain` is speculative decoding on the same terms: each iteration drafts by prompt
lookup on the device (the latest, longest match of the last tokens in a search buffer of the
references and the history, `stage_source`), verifies [last token + drafts] in one forward,
keeps the drafts up to the first disagreement plus the target's own next token, appends the
kept tokens to the buffer and advances — one captured graph per iteration (the drafting and
the verdict are one Triton program each, kernels/lookup_draft.py), no host read until the
chain ends. Greedy output is plain greedy decoding's: every kept token is the argmax of the
logits it was verified with. Rejected drafts' K/V sits in slots the next iteration overwrites.

Input embeddings in place of ids (superposed decoding's weighted sum of the drafts' last
tokens) take a static embeddings buffer and graphs of their own. `superposed_chain` runs
superposed decoding's steps on the same terms: one captured graph per step scores the k x m
extensions, updates the drafts and writes the next mixed embedding (engine/decoding/
superposed_device.py, kernels/superposed_select.py) before the forward; the host reads the
drafts once per chain. Anything else — larger writes
(a whole-file prefill), batched rows, a third shifted span, dynamic RoPE scaling, the CPU —
returns `handled=False` and runs eagerly.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from editkv.engine import faults
from editkv.engine.model import Attention, Fused, KVCache, Span, Transformer
from editkv.engine.readback import Readback
from editkv.kernels.fused import add_rms_norm, rope_write, silu_mul
from editkv.kernels.logit_summary import logit_summary
from editkv.kernels.lookup_draft import MAX_MATCH, accept, draft
from editkv.kernels.span_attention import span_attention

BUCKET = 1024
MAX_WIDTH = 256  # a multi-line paste or a realedits-sized repair (~70 tokens) still replays
MAX_GRAPHS = 256  # the warm-up at load takes ~25 per 1024-slot bucket up to 16,384 (lsp_server/warm_up.py)
MAX_SPLIT = 2  # a forward up to this many times max_width runs as parts (a FIM view's head); wider: eager
MAX_CHAIN = 16
CHAIN_STEPS = 8  # engine.generate.decode's chain length (0: decode step by step)
SOURCE = 16384  # tokens a device-side prompt lookup searches (`lookup_chain`)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Layout(NamedTuple):
    """Where a forward's tokens go and what they see, as the static inputs hold it."""

    base: KVCache  # the root buffer the graphs read (a document's, or the KV pool's)
    at: int  # the first written slot, in `base`
    # prefix_end, suffix_start, suffix_end, shift, scratch_start, prefix_start, sink_end,
    # sink_shift, counted from `origin`, then `origin`: the region's first slot in `base`, then
    # lane_start (from `origin`) and lanes (1: none), as kernels/span_attention.py reads them
    meta: list[int]
    extent: int  # slots of the region in use (from `origin`): what the bucket covers at least


def visibility(write: KVCache, write_at: int, count: int, context: Sequence[Span]) -> Layout | None:
    """The forward's `Layout`, or None when its spans are not of the one-buffer shape described
    in the module docstring, or reach out of the write's region (another document of the pool).
    A shifted span from the region's slot 0 is an attention window's sink
    (engine.generate.windowed); any other shifted span is the FIM view's suffix.
    """
    base = write.base or write
    region = write.region
    origin, limit = region.offset, region.offset + region.capacity
    at = write.offset + write_at
    zero, sink, suffix = [], [], []
    for span in context:
        if span.end == span.start:
            continue
        if (span.cache.base or span.cache) is not base:
            return None
        lo, hi = span.cache.offset + span.start - origin, span.cache.offset + span.end - origin
        if lo < 0 or hi > limit - origin:
            return None
        if not span.shift:
            zero.append((lo, hi))
        else:
            (sink if lo == 0 else suffix).append((lo, hi, span.shift))
    if len(sink) > 1 or len(suffix) > 1:
        return None
    zero.sort()
    merged: list[list[int]] = []
    for lo, hi in zero:
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    prefix_start, prefix_end, scratch_start = 0, 0, at - origin
    for lo, hi in merged:
        if hi == at - origin:  # the run up to the new tokens (from slot 0 on a plain repair)
            scratch_start = lo
        elif prefix_end == 0:
            prefix_start, prefix_end = lo, hi
        elif not suffix:  # a FIM suffix whose view tokens took exactly its slots' count: shift 0
            suffix.append((lo, hi, 0))
        else:
            return None
    suffix_start, suffix_end, shift = suffix[0] if suffix else (0, 0, 0)
    _, sink_end, sink_shift = sink[0] if sink else (0, 0, 0)
    if at + count > base.capacity - 1:  # the last slot takes the padding rows' writes
        return None
    meta = [prefix_end, suffix_start, suffix_end, shift, scratch_start, prefix_start, sink_end, sink_shift, origin,
            0, 1]  # no lanes (StaticForward.forward's `lanes` sets the last two)
    return Layout(base, at, meta, region.extent or 0)


@dataclass
class LookupRun:
    """Chains staged by `StaticForward.lookup_start`: the buffer, the graph, the iterations left."""

    base: KVCache
    bucket: int
    width: int
    room: int
    graph: torch.cuda.CUDAGraph | None


@dataclass(frozen=True)
class LookupTicket:
    """A queued chain (`StaticForward.lookup_enqueue`): its readback ticket and its length."""

    readback: tuple[int, torch.cuda.Event | None, int]
    steps: int


class StaticForward:
    """CUDA-graph replay of one model's small batch-1 forwards (see the module docstring); an
    engine.runner.ModelRunner holds one (`ModelRunner.enable_graphs`) and hands it its forwards."""

    def __init__(self, model: Transformer, *, bucket: int = BUCKET, max_width: int = MAX_WIDTH,
                 max_graphs: int = MAX_GRAPHS, mode: str = "auto", chain_steps: int = CHAIN_STEPS) -> None:
        """`mode`: "graphs" (capture and replay), "static" (the same static-shape forward run
        eagerly: tests on the CPU), "off", or "auto" (graphs on CUDA, off elsewhere).
        `chain_steps`: how many greedy tokens engine.generate.decode asks `chain` for at a time."""
        if mode not in ("auto", "graphs", "static", "off"):
            raise ValueError(f"mode must be auto, graphs, static or off, not {mode!r}")
        self.model = model
        self.bucket = bucket
        self.max_width = _next_power_of_two(max_width)
        self.max_graphs = max_graphs
        dynamic = model.config.rope.rope_type == "dynamic"  # its frequencies need a host sync
        if mode == "auto":
            mode = "graphs" if model.device.type == "cuda" and not dynamic else "off"
        if mode == "graphs" and (model.device.type != "cuda" or dynamic):
            raise ValueError("CUDA graphs need a CUDA model without dynamic RoPE scaling")
        if mode == "static" and dynamic:
            raise ValueError("the static forward does not support dynamic RoPE scaling")
        if mode != "off" and model.weight_format != "fp32":
            raise ValueError("the static forward needs the model's own weights, not quantized ones")
        self.mode = mode
        if not 0 <= chain_steps <= MAX_CHAIN:
            raise ValueError(f"chain_steps must be in [0, {MAX_CHAIN}], not {chain_steps}")
        self.chain_steps = chain_steps
        self._fused = model.fused() if mode != "off" else []
        dev = model.device
        # Every static input in one device tensor, filled from one (pinned) host buffer per call:
        # ids [W], positions [W], slots [W], the eight visibility numbers, the region's origin and
        # the two lane numbers, the last real row.
        w = self.max_width
        self._inputs = torch.zeros(3 * w + 12, dtype=torch.long, device=dev)
        self._host = torch.zeros(3 * w + 12, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._host_np = self._host.numpy()
        self._ids = self._inputs[:w][None]
        self._positions = self._inputs[w : 2 * w]
        self._slots = self._inputs[2 * w : 3 * w]
        self._meta = self._inputs[3 * w : 3 * w + 11]
        self._last = self._inputs[3 * w + 11 :]
        # input embeddings in place of ids (superposed decoding); padding rows read what an earlier
        # call left, and write only the spare slot
        self._embeds = torch.zeros((1, w, model.config.hidden_size), dtype=model.dtype, device=dev)
        # lookup_chain's device state: the search buffer behind MAX_MATCH never-matching slots
        # (the last slot takes writes that go nowhere), [last token, position, slot, tokens kept,
        # buffer length, iteration], and per chain the kept ids, their log-probs and accepts
        self._source = torch.full((MAX_MATCH + SOURCE + 1,), -3, dtype=torch.long, device=dev)
        self._src = self._source[MAX_MATCH:]
        self._src_host = torch.zeros(SOURCE + 1, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._src_host_np = self._src_host.numpy()
        self._spec = torch.zeros(6, dtype=torch.long, device=dev)
        self._spec_host = torch.zeros(6, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._kept = torch.zeros((2, MAX_CHAIN * 16 + 17), dtype=torch.float64, device=dev)  # width <= 16
        self._accepts = torch.zeros(MAX_CHAIN, dtype=torch.long, device=dev)
        self._per_chain = torch.tensor([3, 5], device=dev)  # state entries a chain restarts from 0
        # each chain's results leave in one copy: kept ids and log-probs, accepts, the count
        self._readback = Readback(2 * self._kept.shape[1] + MAX_CHAIN + 1, 3, dev)
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()
        self._pool = None
        self._captured_shapes: set[tuple] = set()
        self.handled = 0  # forwards run here (replayed, or static without graphs), chained ones included
        self.replays = 0
        self.captures = 0  # graphs captured (in the static mode: graph keys taken)
        self.eager = 0  # forwards this object passed back to the eager path
        self.split = 0  # forwards wider than max_width run as parts (each part counted in `handled`)
        self.embedded = 0  # forwards run here from input embeddings instead of ids
        self.chains = 0  # chained greedy runs (each `steps` forwards)
        self.lookup_chains = 0  # lookup_chain runs (each `steps` verification forwards)
        self.superposed_chains = 0  # superposed_chain runs (each `steps` superposed steps)
        # Deferred captures (`defer_captures`, set by a server that captures when idle): a forward
        # whose graph is not captured yet runs its static ops eagerly (a forward's time, not a
        # capture's tens of milliseconds) and its key waits here for `capture_pending`
        self.defer_captures = False
        self._pending: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weakref(base), bucket, width, rows, source)
        self.deferred = 0  # forwards run eagerly because their graph was not captured yet
        self._superposed: dict[tuple, object] = {}  # (k, m, max tokens) -> SuperposedBuffers
        self._superposed_refs: dict[int, object] = {}  # token rules and corpus tables graphs read

    def forward(self, ids: torch.Tensor | None, positions: torch.Tensor, write: KVCache, write_at: int,
                context: Sequence[Span], logits: str, embeds: torch.Tensor | None = None,
                lanes: tuple[int, int] | None = None) -> tuple[bool, torch.Tensor | None]:
        """(True, what Transformer.forward returns) when replayed; (False, None) to run eagerly
        (`ModelRunner.forward` then calls the model's forward).

        `embeds` [1, T, hidden] in place of `ids` (superposed decoding's weighted embeddings).
        `lanes` = (first slot in `write`, count): from that slot on, the write's slots interleave
        that many sequences (beam search's beams, one slot per lane and step), and each token
        sees only its own lane there (kernels/span_attention.py); no eager path exists for it."""
        inputs = embeds if embeds is not None else ids
        if self.mode == "off" or inputs is None or inputs.shape[0] != 1 or write.batch != 1:
            self.eager += 1
            return False, None
        count = inputs.shape[1]
        if lanes is not None:
            layout = visibility(write, write_at, count, context) if count <= self.max_width else None
            if layout is None:
                self.eager += 1
                return False, None
            meta = [*layout.meta[:9], write.offset + lanes[0] - layout.meta[8], lanes[1]]
            return True, self._replay(layout._replace(meta=meta), ids, positions, embeds, 0, count, logits)
        # parts of at most max_width tokens, each also seeing the ones before it in the write buffer:
        # what one forward computes; wider than MAX_SPLIT parts, or a part not of the served shape: eager
        parts = [(start, min(count, start + self.max_width)) for start in range(0, count, self.max_width)]
        found = [visibility(write, write_at + start, end - start,
                            [*context, Span(write, write_at, write_at + start)] if start else context)
                 for start, end in parts] if len(parts) <= MAX_SPLIT else [None]
        if None in found:
            self.eager += 1
            return False, None
        if len(parts) > 1:
            self.split += 1
        outs = [self._replay(layout, ids, positions, embeds, start, end,
                             logits if logits == "all" or end == count else "none")
                for layout, (start, end) in zip(found, parts, strict=True)]
        if logits == "none":
            return True, None
        return True, torch.cat(outs, dim=1) if logits == "all" else outs[-1]

    def _replay(self, layout: Layout, ids: torch.Tensor | None, positions: torch.Tensor,
                embeds: torch.Tensor | None, start: int, end: int, logits: str) -> torch.Tensor | None:
        """Tokens [start, end) of a forward (at most max_width) through the graph for `layout`
        (`visibility`'s answer for them)."""
        base, at = layout.base, layout.at
        count = end - start
        self.handled += 1
        width = _next_power_of_two(count)
        bucket = self._stage(layout, count, at + count)
        # ids and positions usually arrive on the device already: copied there, not via the host
        if embeds is not None:
            self._embeds[:, :count].copy_(embeds[:, start:end])
            self.embedded += 1
        else:
            self._ids[0, :count].copy_(ids[0, start:end], non_blocking=True)
        self._positions[:count].copy_(positions.reshape(-1)[start:end], non_blocking=True)
        # a single row's "last" is its "all": one graph serves decode steps and chains
        rows = "all" if width == 1 and logits == "last" else logits
        source = "embeds" if embeds is not None else "ids"
        found = self._graph(base, bucket, width, rows=rows, source=source) if self.mode == "graphs" else None
        if found is not None:
            graph, out = found
            faults.hit("replay")
            graph.replay()
            self.replays += 1
        elif self.mode == "graphs":  # not captured yet: the same ops, eagerly (captured when idle)
            self.deferred += 1
            out = self._run(base, bucket, width, rows=rows, source=source)
        else:
            self._static_key(base, bucket, width, rows, source)
            faults.hit("replay")
            out = self._run(base, bucket, width, rows=rows, source=source)
        if logits == "none":
            return None
        if logits == "last":
            return out[-1:].clone()
        return out[None, :count].clone()

    def chain(self, token: int, position: int, write: KVCache, write_at: int, context: Sequence[Span],
              steps: int) -> torch.Tensor | None:
        """Greedy decoding of `steps` tokens on the device, after `token`.

        `token` is encoded at `write_at` (position `position`), then each of the `steps` forwards
        picks the argmax (the lowest id on ties, as `torch.argmax`; kernels/logit_summary.py) and
        feeds it to the next one, so the K/V of `token` and of the first `steps - 1` chosen tokens
        are written. Returns [2, steps] float64 (chosen ids, their log-probabilities under the
        logits they were chosen from), or None when the write and spans are not of the shape this
        class serves (decode step by step).
        """
        if self.mode == "off" or write.batch != 1 or not 1 <= steps <= MAX_CHAIN:
            return None
        found = visibility(write, write_at, steps, context)
        if found is None:
            return None
        base, at = found.base, found.at
        self.chains += 1
        self.handled += steps
        bucket = self._stage(found, 1, at + steps, first=(token, position))
        if self.mode != "graphs":
            self._static_key(base, bucket, 1, "all", "ids")
            faults.hit("replay")
            return self._run_chain(base, bucket, steps)
        # The one-token step's graph, replayed `steps` times; between replays a few device ops
        # choose the token and advance the static inputs. Nothing waits for the GPU, so the host
        # queues the whole chain while the first steps run, and no graph is captured per chain
        # length (each would cost a document its first completions' time).
        found = self._graph(base, bucket, 1, rows="all")
        if found is None:  # not captured yet: the same steps, eagerly
            self.deferred += steps
            return self._run_chain(base, bucket, steps)
        graph, out = found
        result = torch.empty((2, steps), dtype=torch.float64, device=out.device)
        for step in range(steps):
            faults.hit("replay")
            graph.replay()
            self.replays += 1
            summary = logit_summary(out, 1)
            result[0, step : step + 1].copy_(summary.ids[0])
            result[1, step : step + 1].copy_(summary.values[0] - summary.logsumexp)
            self._ids[0, :1].copy_(summary.ids[0])
            self._positions[:1] += 1
            self._slots[:1] += 1
        return result

    def stage_source(self, tokens: np.ndarray) -> int:
        """Load `lookup_chain`'s search buffer: int64 token ids, negative ones separating
        sources (they match nothing and are never drafted). The history must come last: its end
        is where the chains append. Returns the buffer length to pass to `lookup_chain`; keep
        room for the tokens the chains will append (at most SOURCE in all)."""
        if self.mode == "off":
            raise RuntimeError("the static forward is off")
        n = len(tokens)
        if not 0 < n <= SOURCE:
            raise ValueError(f"a search buffer holds 1..{SOURCE} tokens, not {n}")
        # only the first n slots are ever read as tokens (matches end before `length`, drafts
        # come from before it, chains write what they keep after it)
        if self._src_host.is_pinned():
            torch.cuda.current_stream().synchronize()  # the last copy is done reading the buffer
        self._src_host_np[:n] = tokens
        self._src[:n].copy_(self._src_host[:n], non_blocking=True)
        return n

    def extend_source(self, tokens: Sequence[int], length: int) -> int:
        """Append tokens decoded some other way (a `chain`) to the search buffer at `length`;
        returns the new length."""
        end = length + len(tokens)
        if not 0 < length <= end <= SOURCE:
            raise ValueError(f"the search buffer holds {SOURCE} tokens: cannot append {len(tokens)} at {length}")
        self._src[length:end].copy_(torch.tensor(list(tokens), dtype=torch.long), non_blocking=False)
        return end

    def lookup_chain(self, token: int, position: int, write: KVCache, write_at: int, context: Sequence[Span],
                     length: int, steps: int, width: int) -> tuple[list[int], list[float], list[int]] | None:
        """`steps` iterations of greedy speculative decoding on the device after `token`, each
        verifying `width - 1` tokens drafted by prompt lookup over the staged search buffer (its
        first `length` tokens; the history ends there and each iteration appends what it kept).

        `token` is encoded at `write_at` (position `position`), as in `chain`. Returns (kept ids,
        their log-probabilities, drafts accepted per iteration): between `steps` and `steps *
        width` tokens, every one the argmax of the logits it was verified with. None when the
        shapes are not of the kind this class serves. (`lookup_start`, `lookup_enqueue` and
        `lookup_collect` are the same in parts, for a caller that keeps a chain in flight while
        it reads the one before.)
        """
        run = self.lookup_start(token, position, write, write_at, context, length, width, steps)
        if run is None:
            return None
        return self.lookup_collect(self.lookup_enqueue(run, steps))

    def lookup_start(self, token: int, position: int, write: KVCache, write_at: int, context: Sequence[Span],
                     length: int, width: int, room: int) -> LookupRun | None:
        """Stage the device state for chains that continue from `token` (see `lookup_chain`) for
        up to `room` iterations in all; None when the shapes are not served."""
        if (self.mode == "off" or write.batch != 1 or width not in (2, 4, 8, 16) or room < 1
                or not 0 < length <= SOURCE - room * width):
            return None
        found = visibility(write, write_at, room * width, context)
        if found is None:
            return None
        base, at = found.base, found.at
        # the bucket covers two of the longest chains, so that a document's chains of any length
        # replay the same graph
        bucket = self._stage(found, width, at + 2 * MAX_CHAIN * width)
        self._spec_host.copy_(torch.tensor([token, position, at, 0, length, 0]))
        self._spec.copy_(self._spec_host, non_blocking=True)
        graph = self._lookup_graph(base, bucket, width) if self.mode == "graphs" else None
        return LookupRun(base, bucket, width, room, graph)

    def lookup_enqueue(self, run: LookupRun, steps: int) -> LookupTicket:
        """Queue `steps` more iterations of `run` and the copy of their results to the host;
        nothing waits for the GPU (on CUDA)."""
        if not 1 <= steps <= min(MAX_CHAIN, run.room):
            raise ValueError(f"steps must be in [1, {min(MAX_CHAIN, run.room)}], not {steps}")
        run.room -= steps
        self.lookup_chains += 1
        self.handled += steps
        self._spec.index_fill_(0, self._per_chain, 0)  # tokens kept and iterations count per chain
        for _ in range(steps):
            faults.hit("replay")
            if run.graph is not None:
                run.graph.replay()
                self.replays += 1
            else:
                self._lookup_step(run.base, run.bucket, run.width)
        return LookupTicket(self._readback.send([self._kept, self._accepts, self._spec[3:4]]), steps)

    def lookup_collect(self, ticket: LookupTicket) -> tuple[list[int], list[float], list[int]]:
        """Wait for a queued chain; (kept ids, their log-probabilities, drafts accepted per
        iteration), as `lookup_chain` returns them."""
        packed = self._readback.receive(ticket.readback).tolist()
        kept = self._kept.shape[1]
        count = int(packed[-1])
        return ([int(t) for t in packed[:count]], packed[kept : kept + count],
                [int(a) for a in packed[2 * kept : 2 * kept + ticket.steps]])

    def superposed_buffers(self, k: int, m: int, max_tokens: int):
        """The device state for superposed chains of k drafts x m extensions (one per shape)."""
        from editkv.engine.decoding.superposed_device import SuperposedBuffers

        max_t = max(16, _next_power_of_two(max_tokens + 1))
        key = (k, m, max_t)
        if key not in self._superposed:
            self._superposed[key] = SuperposedBuffers(k, m, max_t, self.model.config.vocab_size, self.model.device)
        return self._superposed[key]

    def superposed_start(self, write: KVCache, write_at: int, context: Sequence[Span],
                         room: int) -> tuple[KVCache, int, int] | None:
        """Stage the static inputs for superposed steps whose first forward writes `write_at`
        and whose later ones the next `room - 1` slots; (buffer, bucket, absolute slot of
        `write_at`), or None when the shapes are not served."""
        if self.mode == "off" or write.batch != 1 or room < 1:
            return None
        found = visibility(write, write_at, room, context)
        if found is None:
            return None
        bucket = self._stage(found, 1, found.at + room)
        return found.base, bucket, found.at

    def superposed_chain(self, buf, base: KVCache, bucket: int, steps: int, rules, corpus, params,
                         mixed: bool) -> tuple[int, torch.cuda.Event | None, int]:
        """Queue `steps` superposed steps (engine.decoding.superposed_device: select the drafts from
        `buf.logits`, mix the next input, run the forward) and the copy of the state to the host;
        returns the ticket `buf.collect` waits on. Nothing waits for the GPU (on CUDA)."""
        from editkv.engine.decoding.superposed_device import MAX_CHAIN, STEPS, advance

        if not 1 <= steps <= MAX_CHAIN:
            raise ValueError(f"steps must be in [1, {MAX_CHAIN}], not {steps}")
        buf.meta[STEPS : STEPS + 1].zero_()
        buf.log_scores.fill_(float("-inf"))

        @torch.inference_mode()
        def step() -> None:
            advance(buf, rules, corpus, params, mixed, self.model.embed, self._embeds[:, :1], self._positions[:1],
                    self._slots[:1])
            buf.logits.copy_(self._run(base, bucket, 1, rows="all", source="embeds"))

        graph = None
        if self.mode == "graphs":
            key = ("superposed", base.k.data_ptr(), base.v.data_ptr(), tuple(base.k.shape), bucket, buf.k, buf.m,
                   buf.max_t, buf.stream_length, buf.rows, id(rules), id(corpus), params, mixed)
            self._superposed_refs[id(rules)], self._superposed_refs[id(corpus)] = rules, corpus
            # the warm-ups advance the drafts
            graph, _ = self._capture(key, step, warmups=2, restore=buf.state_tensors())
        for _ in range(steps):
            faults.hit("replay")
            if graph is not None:
                graph.replay()
                self.replays += 1
            else:
                step()
        self.handled += steps
        self.embedded += steps
        self.superposed_chains += 1
        return buf.enqueue_read()

    def _lookup_graph(self, base: KVCache, bucket: int, width: int) -> torch.cuda.CUDAGraph:
        key = ("lookup", base.k.data_ptr(), base.v.data_ptr(), tuple(base.k.shape), bucket, width)
        # the warm-up runs advance the chain state (what they wrote past it — K/V, buffer tokens,
        # kept ids — the replays overwrite)
        graph, _ = self._capture(key, lambda: self._lookup_step(base, bucket, width), warmups=2, restore=[self._spec])
        return graph

    @torch.inference_mode()
    def _lookup_step(self, base: KVCache, bucket: int, width: int) -> None:
        """One `lookup_chain` iteration: device tensors in, device tensors out."""
        draft(self._source, self._spec, self._ids[0, :width], self._positions[:width], self._slots[:width])
        logits = self._run(base, bucket, width, rows="all")  # [width, V]
        summary = logit_summary(logits, 1)
        accept(summary.ids[:, 0], summary.values[:, 0], summary.logsumexp, self._ids[0, :width], self._source,
               self._spec, self._kept, self._accepts)

    def _stage(self, layout: Layout, count: int, reach: int, first: tuple[int, int] | None = None) -> int:
        """Fill the static inputs for `count` tokens written from slot `layout.at`; the attention
        bucket (slots from the region's origin covering `reach`, a slot of the base buffer, the
        spans and the region's extent) is returned. Ids and positions are the caller's to copy, or
        `first` = (id, position) of a single token."""
        base, at, meta = layout.base, layout.at, layout.meta
        width = _next_power_of_two(count)
        reach = max(meta[0], meta[2], meta[6], reach - meta[8], layout.extent)
        w = self.max_width
        host = self._host_np
        host[: 2 * w] = 0  # padding rows read id 0 at position 0
        if first is not None:
            host[0], host[w] = first
        host[2 * w : 2 * w + width] = base.capacity - 1  # padding rows write the spare last slot
        host[2 * w : 2 * w + count] = range(at, at + count)
        host[3 * w : 3 * w + 11] = meta
        host[3 * w + 11] = count - 1
        self._upload()
        # a power of two of `bucket`s: fewer graph shapes (each captured once) for little more work,
        # as the kernel skips the key blocks past every span
        return min(self.bucket * _next_power_of_two(-(-reach // self.bucket)), base.capacity)

    def _upload(self) -> None:
        """The host buffer's static inputs to the device (one copy)."""
        if self._host.is_pinned():
            # the previous call's copy must be done reading the buffer before it is refilled
            torch.cuda.current_stream().synchronize()
        self._inputs.copy_(self._host, non_blocking=True)

    @staticmethod
    def _key(base: KVCache, bucket: int, width: int, rows: str, source: str) -> tuple:
        """A forward graph's key: the buffer it reads (address and shape) and its shapes."""
        return (base.k.data_ptr(), base.v.data_ptr(), tuple(base.k.shape), bucket, width, rows, source)

    def _graph(self, base: KVCache, bucket: int, width: int, rows: str = "all", source: str = "ids",
               defer: bool | None = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None] | None:
        """The graph for these shapes, captured now if need be; None when it is not captured yet
        and captures are deferred (`defer_captures`): its key waits for `capture_pending`."""
        key = self._key(base, bucket, width, rows, source)
        if key not in self._graphs and (self.defer_captures if defer is None else defer):
            self._defer(key, base, bucket, width, rows, source)
            return None
        # The warm-up runs compute the very step being asked for (same inputs, same slots),
        # so their writes are the ones the replay repeats. Two the first time a shape is
        # captured (compiles, library workspaces); one for the same shape on another buffer.
        shape = (tuple(base.k.shape[:3]), base.k.shape[4], bucket, width, rows, source)
        found = self._capture(key, lambda: self._run(base, bucket, width, rows=rows, source=source),
                              warmups=1 if shape in self._captured_shapes else 2)
        self._captured_shapes.add(shape)
        return found

    def _defer(self, key: tuple, base: KVCache, bucket: int, width: int, rows: str, source: str) -> None:
        """Remember a graph a forward ran without, for `capture_pending` (a bounded set)."""
        self._pending[key] = (weakref.ref(base), bucket, width, rows, source)
        self._pending.move_to_end(key)
        while len(self._pending) > self.max_graphs:
            self._pending.popitem(last=False)

    @property
    def pending_captures(self) -> int:
        """Graphs a forward wanted and ran without (deferred captures), not captured yet."""
        return len(self._pending)

    def capture_pending(self, should_stop=lambda: False, limit: int = 1) -> int:
        """Capture up to `limit` of the deferred graphs, most recently wanted first, stopping early
        when `should_stop` says so; how many were captured (see `capture_shape`)."""
        done = 0
        while self._pending and done < limit and not should_stop():
            key, (ref, bucket, width, rows, source) = self._pending.popitem(last=True)
            base = ref()
            if base is None or key != self._key(base, bucket, width, rows, source):
                continue  # its buffer is gone or moved
            done += self.capture_shape(base, bucket, width, rows, source)
        return done

    def capture_shape(self, base: KVCache, bucket: int, width: int, rows: str, source: str = "ids") -> bool:
        """Capture the forward graph of this shape over `base` now (a deferred one, or the warm-up
        at load); whether it was not there yet. Its warm-up and capture runs read harmless static
        inputs: every row writes only the buffer's spare last slot (the one padding rows write),
        so no document's keys change."""
        key = self._key(base, bucket, width, rows, source)
        if key in self._graphs:
            return False
        w = self.max_width
        self._host_np[:] = 0
        self._host_np[2 * w : 3 * w] = base.capacity - 1
        self._upload()
        if self.mode == "graphs":
            self._graph(base, bucket, width, rows=rows, source=source, defer=False)
        else:  # static: what a capture's warm-up runs, and the key it leaves
            faults.hit("capture")
            self._run(base, bucket, width, rows=rows, source=source)
            self._graphs[key] = (None, None)
            self.captures += 1
            self._evict()
        return True

    def _capture(self, key: tuple, run, warmups: int,
                 restore: Sequence[torch.Tensor] = ()) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        """The graph of `run` (with what its capture returned) under `key`: from the cache, or
        captured after `warmups` runs on a side stream; the least recently used go first.
        `restore`: state `run` advances, put back as it was before the warm-ups, so that the
        first replay starts where they did."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        faults.hit("capture")
        saved = [t.clone() for t in restore]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        for tensor, value in zip(restore, saved, strict=True):
            tensor.copy_(value)
        self._graphs[key] = (graph, out)
        self.captures += 1
        self._evict()
        return graph, out

    def _static_key(self, base: KVCache, bucket: int, width: int, rows: str, source: str) -> None:
        """The "static" mode's stand-in for `_graph`: the keys a graph would be taken for, kept
        under the same bound (or left pending, with deferred captures), so that the cache's
        growth, the capture site (faults) and deferral can be exercised on the CPU."""
        key = self._key(base, bucket, width, rows, source)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return
        if self.defer_captures:
            self._defer(key, base, bucket, width, rows, source)
            return
        faults.hit("capture")
        self._graphs[key] = (None, None)
        self.captures += 1
        self._evict()

    def _evict(self) -> None:
        """Least recently used graphs beyond `max_graphs` go, and the superposed references only
        the dropped graphs read."""
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        if self._superposed_refs:
            read = {ref for key in self._graphs if key and key[0] == "superposed" for ref in key[10:12]}
            for ref in [r for r in self._superposed_refs if r not in read]:
                del self._superposed_refs[ref]

    @property
    def num_graphs(self) -> int:
        """Graphs (keys, in "static" mode) held now; never more than `max_graphs`."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (after a device fault: a graph captured
        around it may be broken; the next forwards capture afresh)."""
        self._graphs.clear()
        self._pending.clear()
        self._superposed_refs.clear()
        self._captured_shapes.clear()
        self._pool = None

    def quiesce(self) -> None:
        """Wait until no chain's results are in flight (the static forward's and every superposed
        buffer's readback ring), so that nothing is still running when an answer is sent."""
        self._readback.drain()
        for buf in self._superposed.values():
            buf.drain()

    @torch.inference_mode()
    def _run_chain(self, base: KVCache, bucket: int, steps: int) -> torch.Tensor:  # [2, steps] float64
        """`steps` one-token forwards, each fed the previous one's argmax (see `chain`); the
        static mode's chain, the same ops as the replayed one."""
        token = self._ids[:, :1]
        position, slot = self._positions[:1], self._slots[:1]
        chosen, logprobs = [], []
        for step in range(steps):
            logits = self._run(base, bucket, 1, token, position + step, slot + step)  # [1, V] fp32
            # the argmax and its log-probability as engine.generate's greedy step computes them
            summary = logit_summary(logits, 1)
            chosen.append(summary.ids[0])
            logprobs.append(summary.values[0] - summary.logsumexp)
            token = summary.ids  # [1, 1]
        return torch.stack((torch.cat(chosen).double(), torch.cat(logprobs).double()))

    @torch.inference_mode()
    def _run(self, base: KVCache, bucket: int, width: int, ids: torch.Tensor | None = None,
             positions: torch.Tensor | None = None, slots: torch.Tensor | None = None,
             rows: str = "all", source: str = "ids") -> torch.Tensor | None:
        """The forward itself: only device tensors decide what it reads and writes; ids `[1, width]`,
        positions and slots `[width]` default to the static inputs. Returns fp32 logits of every
        row (`rows="all"`, `[width, V]`), of the last real row (`"last"`, `[1, V]`: the row the
        static input `_last` names), or nothing (`"none"`: a repair wants only the K/V written)."""
        model = self.model
        slots = self._slots[:width] if slots is None else slots
        positions = self._positions[:width] if positions is None else positions
        shift, sink_shift = self._meta[3], self._meta[7]
        # cos/sin at the tokens' positions, and shifted back for the suffix keys and for the sink's
        cos, sin = model.rotary.cos_sin(torch.stack((positions, positions - shift, positions - sink_shift)))
        eps = model.config.rms_norm_eps
        if source == "embeds":
            x = self._embeds[:, :width]
        else:
            x = model.embed(self._ids[:, :width] if ids is None else ids)
        delta = None
        for layer, block in enumerate(model.layers):
            fused = self._fused[layer]
            x, h = add_rms_norm(x, delta, block.input_layernorm.weight, eps)
            attended = _attend(block.self_attn, fused, h, cos, sin, base, layer, slots, self._meta, bucket)
            x, h = add_rms_norm(x, attended, block.post_attention_layernorm.weight, eps)
            mlp = block.mlp
            delta = F.linear(silu_mul(F.linear(h, fused.gate_up_weight, fused.gate_up_bias)),
                             mlp.down_proj.weight, mlp.down_proj.bias)
        if rows == "none":
            return None
        if rows == "last":
            x, delta = x[:, self._last], delta[:, self._last]  # index by a device tensor: no sync
        _, h = add_rms_norm(x, delta, model.norm.weight, eps)
        return model.lm_head(h[0]).float()


def _attend(attn: Attention, fused: Fused, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, base: KVCache,
            layer: int, slots: torch.Tensor, meta: torch.Tensor, bucket: int) -> torch.Tensor:
    """T new tokens attend to the buffer's first `bucket` slots (after writing their own K/V)."""
    c = attn.config
    _, count, _ = x.shape
    qkv = F.linear(x[0], fused.qkv_weight, fused.qkv_bias)  # [T, (H + 2 KVH) D]
    # queries [KVH, G, 3, T, D] (at their positions, shifted for suffix keys, for sink keys); the keys and
    # values go to the buffer's slots
    q = rope_write(qkv, cos, sin, c.rotary_dim, c.num_heads, base.k[layer, 0], base.v[layer, 0], slots)
    out = span_attention(q, base.k[layer, 0], base.v[layer, 0], meta, slots, attn.scale, bucket)  # [KVH, G, T, D]
    out = out.view(1, c.num_heads, count, c.head_dim).transpose(1, 2).reshape(1, count, -1)
    return attn.o_proj(out.to(x.dtype))

