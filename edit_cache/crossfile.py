"""Cross-file context: other documents' KV caches placed in front of a view, CacheBlend-style.

Data flow of one request:

  current text + other documents (path, Document) + a token budget
    -> `choose_chunks`: per document its whole text when small, else the top-level definitions
       and class methods whose names the current text uses, as token ranges, under the budget;
    -> `block_layout`: the block's ids in the model's prompt format (`context_format`): fresh
       wrapper tokens (repo-level `<|file_sep|>path` headers, or a path comment) around `Piece`s,
       token ranges of other documents; the block ends with the current document's head;
    -> `build_block`: a KV buffer holding the block at positions 0..C-1. Each piece's keys and
       values are copied from its document's cache (as its own document holds them: encoded
       after that document's earlier text, not after this block), the keys re-rotated from the
       positions they act at there to the block's (PIE's rotation, kernels/rerotate.py). The
       wrapper tokens are encoded. Then CacheBlend's selective recompute: at a check layer every
       block token is recomputed, and the `recompute_ratio` of the reused tokens whose K/V
       deviate most from the copied values are recomputed through the remaining layers,
       attending to the whole block (the others keep their copied K/V);
    -> `ContextBlock`: views (edit_cache/views.py, `block=`) attend to its slots first, then to
       the document's own cache with every position moved back by `block.shift`.

The block holds the document's head (its start token) itself, encoded after the context, so a
view uses the document's tokens and not its head. This module never writes another document's
cache. With one KV pool (issue 24) the pieces that are not recomputed could be attended where
they lie, with a span shift, instead of copied.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from editkv.edit_cache.document import Document
from editkv.engine.model import KVCache, Span, Transformer
from editkv.engine.prompting import doc_start_ids
from editkv.engine.rope import apply_rotary
from editkv.engine.runner import ModelRunner
from editkv.engine.tokenizer import Tokenizer
from editkv.kernels.rerotate import move_rerotate

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUERY_BLOCK = 512  # queries per attention call in the recompute: bounds the [H, q, C] scores


# ---- choosing what to show -----------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A stretch of whole lines of a file that defines `names` (chars `[start, end)`)."""

    names: frozenset[str]
    start: int
    end: int
    needs: int | None = None  # index of a unit shown with this one (a method's class header)


@dataclass
class Chunk:
    """What one document contributes: token ranges `[a, b)` of its ids, in order."""

    path: str
    document: Document
    ranges: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return sum(b - a for a, b in self.ranges)


@functools.cache
def _parser():
    import tree_sitter
    import tree_sitter_python

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))


def _line_offsets(text: str) -> list[int]:
    """str index where each "\\n"-terminated line begins (tree-sitter's rows), plus len(text)."""
    return [0] + [m.end() for m in re.finditer("\n", text)] + [len(text)]


@functools.lru_cache(maxsize=16)
def definition_units(text: str) -> tuple[Unit, ...]:
    """The module-level definitions of Python `text`: functions, classes (split into the class's
    header and one unit per method, each method needing its header) and assignments. Kept for
    the texts seen last: the server asks again at every keystroke while the other files stay."""
    tree = _parser().parse(text.encode("utf-8"))
    lines = _line_offsets(text)

    def span(node) -> tuple[int, int]:
        return lines[min(node.start_point[0], len(lines) - 1)], lines[min(node.end_point[0] + 1, len(lines) - 1)]

    def defined(node) -> tuple[str, object]:
        inner = node.child_by_field_name("definition") if node.type == "decorated_definition" else node
        if inner is None or inner.type not in ("function_definition", "class_definition"):
            return "", None
        name = inner.child_by_field_name("name")
        return (name.text.decode("utf-8", "replace") if name is not None else ""), inner

    units: list[Unit] = []
    for node in tree.root_node.children:
        name, inner = defined(node)
        if inner is not None and inner.type == "class_definition":
            body = inner.child_by_field_name("body")
            methods = [c for c in (body.children if body is not None else []) if defined(c)[1] is not None]
            start, end = span(node)
            header_end = span(methods[0])[0] if methods else end
            header = len(units)
            units.append(Unit(frozenset({name}), start, header_end))
            for m in methods:
                m_name, _ = defined(m)
                names = {m_name} | set(re.findall(r"self\.([A-Za-z_]\w*)\s*=", text[slice(*span(m))]))
                if m_name == "__init__":
                    names.add(name)  # the constructor's signature is the class's
                units.append(Unit(frozenset(names), *span(m), needs=header))
        elif inner is not None:
            units.append(Unit(frozenset({name}), *span(node)))
        elif node.type == "expression_statement" and node.children and node.children[0].type == "assignment":
            left = node.children[0].child_by_field_name("left")
            names = set(_IDENTIFIER.findall(left.text.decode("utf-8", "replace"))) if left is not None else set()
            units.append(Unit(frozenset(names), *span(node)))
    return tuple(units)


def used_names(text: str) -> set[str]:
    """Identifiers of 3+ characters in `text` (what a context file's definitions are matched on)."""
    return {m for m in _IDENTIFIER.findall(text) if len(m) >= 3}


def choose_chunks(text: str, sources: Sequence[tuple[str, Document]], budget: int, *,
                  small_file_tokens: int | None = None) -> list[Chunk]:
    """Chunks of `sources` (in their order) for a document whose text is `text`, at most `budget`
    tokens of theirs in all (the block's wrapper tokens come on top: a few per file).

    A source of at most `small_file_tokens` tokens (default: the budget split evenly over the
    sources) is taken whole if it fits; otherwise its definitions that `text` uses (a used
    method brings its class's header), in file order, each while it fits."""
    if budget <= 0 or not sources:
        return []
    small = small_file_tokens if small_file_tokens is not None else budget // len(sources)
    used = used_names(text)
    left = budget
    out = []
    for path, doc in sources:
        n = len(doc.ids)
        if n == 0:
            continue
        if n <= min(small, left):
            out.append(Chunk(path, doc, [(0, n)]))
            left -= n
            continue
        units = definition_units(doc.text)
        wanted = [i for i, u in enumerate(units) if u.names & used]
        ranges: dict[int, tuple[int, int]] = {}
        for i in wanted:
            need = [j for j in (units[i].needs, i) if j is not None and j not in ranges]
            spans = {j: (doc.tokens.first_token_at_or_after(units[j].start),
                         doc.tokens.first_token_at_or_after(units[j].end)) for j in need}
            cost = sum(b - a for a, b in spans.values())
            if cost <= left:
                ranges.update(spans)
                left -= cost
        if ranges:
            out.append(Chunk(path, doc, _merged(sorted(r for r in ranges.values() if r[1] > r[0]))))
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ---- the block's token layout --------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Block tokens `[at, at + end - start)` are tokens `[start, end)` of `document`."""

    at: int
    document: Document
    start: int
    end: int


@dataclass
class BlockLayout:
    """The block's ids (pieces included) and where pieces sit in it; it ends with the document's
    head (`head` ids) and then its first `document_tokens` tokens."""

    ids: list[int]
    pieces: list[Piece]
    head: int
    document_tokens: int = 0

    @property
    def reused_tokens(self) -> int:
        return sum(p.end - p.start for p in self.pieces)


def context_format(tokenizer: Tokenizer) -> str:
    """"repo": the model has Qwen2.5-Coder's repo-level tokens (`<|repo_name|>`, `<|file_sep|>`),
    which llama.cpp's /infill also uses for extra context; "plain": other files as earlier
    documents of a packed sequence, each with a path comment (the default model's training)."""
    if tokenizer.token_id("<|repo_name|>") is not None and tokenizer.token_id("<|file_sep|>") is not None:
        return "repo"
    return "plain"


def block_layout(tokenizer: Tokenizer, config, chunks: Sequence[Chunk], head: Sequence[int], *,
                 path: str = "", repo: str = "", style: str | None = None,
                 document: Document | None = None, document_tokens: int = 0) -> BlockLayout:
    """The block in front of a document with head `head` and path `path`.

    repo:  `<|repo_name|>repo\\n` (`<|file_sep|>p\\n` chunk)* `<|file_sep|>path\\n` head
    plain: `<start>` (`# p\\n` chunk)* `<eos>` head

    `document`, `document_tokens`: the block also takes that document's first tokens, after its
    head, as one more piece (CacheBlend over the current file too: its tokens, cached without
    the context, get their share of the recompute; a view then reads the rest of the document
    from its own cache).
    """
    style = style or context_format(tokenizer)
    ids: list[int] = []
    pieces: list[Piece] = []

    def add(chunk: Chunk) -> None:
        for a, b in chunk.ranges:
            pieces.append(Piece(len(ids), chunk.document, a, b))
            ids.extend(chunk.document.ids[a:b])
        last = chunk.ranges[-1][1]
        if not chunk.document.text[: _char_end(chunk.document, last)].endswith("\n"):
            ids.extend(tokenizer.encode("\n"))

    if style == "repo":
        sep = tokenizer.token_id("<|file_sep|>")
        ids += [tokenizer.token_id("<|repo_name|>")] + tokenizer.encode(f"{repo}\n")
        for chunk in chunks:
            ids += [sep] + tokenizer.encode(f"{chunk.path}\n")
            add(chunk)
        ids += [sep] + tokenizer.encode(f"{path}\n")
    elif style == "plain":
        ids += doc_start_ids(tokenizer, config)
        for chunk in chunks:
            ids += tokenizer.encode(f"# {chunk.path}\n")
            add(chunk)
        ids += list(tokenizer.eos_ids[:1])
    else:
        raise ValueError(f"unknown context format {style!r}; use 'repo' or 'plain'")
    ids += list(head)
    if document is not None and document_tokens:
        pieces.append(Piece(len(ids), document, 0, document_tokens))
        ids += document.ids[:document_tokens]
    return BlockLayout(ids, pieces, len(head), document_tokens if document is not None else 0)


def _char_end(doc: Document, token: int) -> int:
    """The char offset where token `token` starts (len(text) past the last)."""
    starts = doc.tokens.starts
    return int(starts[token]) if token < len(starts) else len(doc.text)


# ---- the block's KV ------------------------------------------------------------------------


@dataclass
class ContextBlock:
    """A KV buffer whose slot i holds block token i at position i; a view attends to
    `spans()` and to its document's tokens moved by `shift` positions."""

    cache: KVCache
    ids: list[int]
    head: int
    document_tokens: int  # the document's first tokens, after its head, at the block's end
    reused_tokens: int  # copied from other documents' caches
    recomputed_tokens: int  # encoded through every layer (the wrapper tokens and the selected ones)
    check_tokens: int  # encoded through the layers up to the check layer only
    compute_tokens: float  # recomputed + check tokens weighted by the share of layers each went through
    ms: float = 0.0

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def shift(self) -> int:
        """What a document token's position grows by (the block ends with the document's head and
        first `document_tokens` tokens)."""
        return self.length - self.head - self.document_tokens

    def spans(self, end: int | None = None) -> list[Span]:
        return [Span(self.cache, 0, self.length if end is None else end)]

    @property
    def sink(self) -> tuple[KVCache, int]:
        """The block's first token: the start of every prompt with this block."""
        return (self.cache, 1)


def build_block(model: ModelRunner, layout: BlockLayout, *, recompute_ratio: float = 0.15,
                check_layer: int = 1, spare: int = 0) -> ContextBlock:
    """The block's KV: pieces copied and re-rotated, wrapper tokens encoded, and CacheBlend's
    selective recompute of `recompute_ratio` of the pieces' tokens (0: none, the copies as they
    are; 1: every token, an exact prefill of the block).

    The tokens to recompute are those whose keys and values at `check_layer` (computed for every
    block token, so layers `0..check_layer` cost a full pass) differ most from the copies;
    layer 0 can't tell (its K/V depend on the token and position only). `spare`: free slots
    after the block in its buffer."""
    assert 0.0 <= recompute_ratio <= 1.0, recompute_ratio
    started = time.perf_counter()
    length = len(layout.ids)
    cache = model.new_cache(length + spare + 1)
    reused = torch.zeros(length, dtype=torch.bool)
    for piece in layout.pieces:
        piece.document.ensure_ready(upto=piece.end)
        at = piece.at
        for span in piece.document.spans(piece.start, piece.end):
            n = span.end - span.start
            _copy_rotated(model, span, cache, at)
            reused[at: at + n] = True
            at += n
    num_reused = int(reused.sum())
    k = round(recompute_ratio * num_reused)
    num_layers = model.config.num_layers
    check = min(check_layer, num_layers - 1) if k > 0 else -1
    selected = _recompute(model.model, cache, layout.ids, reused, k, check)
    full_layers = check + 1
    compute = (length * full_layers + selected * (num_layers - full_layers)) / num_layers
    return ContextBlock(cache, list(layout.ids), layout.head, layout.document_tokens, num_reused, selected,
                        length if check >= 0 else 0, compute, 1000 * (time.perf_counter() - started))


def _copy_rotated(model: ModelRunner, span: Span, cache: KVCache, at: int) -> None:
    """Slots of `span` into `cache[at:]`, keys re-rotated to act at `at...` with no shift (a stored key
    is rotated at its slot's index; a span's shift only moves the query)."""
    n = span.end - span.start
    cache.k[:, :, :, at: at + n] = span.cache.k[:, :, :, span.start: span.end]
    cache.v[:, :, :, at: at + n] = span.cache.v[:, :, :, span.start: span.end]
    delta = at - span.start
    if delta:
        half = model.config.rotary_dim // 2
        cos, sin = model.rotary.delta_cos_sin(delta)
        move_rerotate(cache.k, cache.v, at, at + n, 0, cos[:half].contiguous(), sin[:half].contiguous(),
                      model.config.rotary_dim)


@torch.inference_mode()
def _recompute(model: Transformer, cache: KVCache, ids: list[int], reused: torch.Tensor, k: int,
               check: int) -> int:
    """Encode the block's fresh tokens (and, with `check` >= 0, every token up to that layer, then
    the `k` most deviating reused ones) layer by layer, each attending to every block slot at or
    before its position; returns how many tokens went through every layer."""
    c = model.config
    device = model.device
    length = len(ids)
    positions = torch.arange(length, device=device)
    sel = positions if check >= 0 else positions[~reused.to(device)]
    if sel.numel() == 0:
        return 0
    x = model.embed(torch.tensor([ids], device=device)[:, sel])  # [1, S, hidden]
    fused = model.fused()
    keys_all = positions[None, :]
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        h = block.input_layernorm(x)
        qkv = fused[i].qkv(h)  # [1, S, (H + 2 KVH) D]
        q, kk, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                              c.num_kv_heads * c.head_dim], -1)
        num = sel.numel()
        q = q.view(1, num, c.num_heads, c.head_dim).transpose(1, 2)  # [1, H, S, D]
        kk = kk.view(1, num, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [1, KVH, S, D]
        v = v.view(1, num, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = model.rotary.cos_sin(sel)  # [S, rd]
        q = apply_rotary(q, cos[None, None], sin[None, None], c.rotary_dim).to(cache.dtype)
        kk = apply_rotary(kk, cos[None, None], sin[None, None], c.rotary_dim).to(cache.dtype)
        v = v.to(cache.dtype)
        keep = None
        if i == check:
            # CacheBlend's KV deviation of each reused token: its copy against its recomputed K/V
            old_k, old_v = cache.k[i][:, :, sel], cache.v[i][:, :, sel]
            dev = (kk.float() - old_k.float()).pow(2).sum((0, 1, 3)) + (v.float() - old_v.float()).pow(2).sum((0, 1, 3))
            dev[~reused.to(device)] = float("inf")  # fresh tokens are always recomputed
            num_fresh = int((~reused).sum())
            keep = torch.topk(dev, num_fresh + k).indices.sort().values
        cache.k[i][:, :, sel] = kk
        cache.v[i][:, :, sel] = v
        keys, values = cache.k[i][:, :, :length], cache.v[i][:, :, :length]
        outs = []
        for lo in range(0, num, _QUERY_BLOCK):
            rows = sel[lo: lo + _QUERY_BLOCK]
            mask = keys_all <= rows[:, None]  # [q, C]: a token sees the block up to itself
            outs.append(F.scaled_dot_product_attention(q[:, :, lo: lo + _QUERY_BLOCK], keys, values,
                                                       attn_mask=mask, scale=attn.scale,
                                                       enable_gqa=c.num_groups > 1))
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, num, c.num_heads * c.head_dim)
        x = x + attn.o_proj(out.to(x.dtype))
        x = x + block.mlp(block.post_attention_layernorm(x), fused[i])
        if keep is not None:
            x, sel = x[:, keep], sel[keep]
    return int(sel.numel())
