"""Cross-file context from other documents' KV caches (CacheBlend) against re-prefilled context.

Data: realedits records joined with their cross-file companion (dev-crossfile.jsonl.gz: the
files each edited file imports, texts in dev-blobs.jsonl.gz). Two target sets: "xfile" (lines
using a name that only an imported file defines) and "ordinary" (the record's own realedits
targets; only records that have context files, to show nothing gets worse). For each target the
line's text after its indentation is deleted from `after`, and the model completes it (greedy,
end of line, token healing as the views do).

Every context file and the current file are open documents whose caches exist (their prefill is
not timed, as in bench/realedits.py). A request's cost is what it computes itself:

- none: the document's own view (no context);
- exact: a fresh prefill of [context block + the file's prompt], the block chosen as editkv
  chooses it (edit_cache/crossfile.py: whole small files, else the definitions the file uses,
  under --budget tokens), in the model's format (repo-level `<|file_sep|>path` for Qwen2.5-Coder,
  a path comment for the default model);
- ring: llama.vscode's ring buffer re-prefilled: chunks of the context files (a file of fewer
  than 63 lines whole, else a random 32-line window, as its pickChunk does; up to 16 chunks, round
  robin over the files, under the same budget), in llama.cpp /infill's `input_extra` layout
  (`<|repo_name|>myproject`, `<|file_sep|>{filename}` per chunk, `<|file_sep|>filename` before the
  FIM prefix; text simply prefixed for models without those tokens);
- blend_r{P}: the same block as exact, built from the other documents' caches (keys re-rotated),
  P% of its reused tokens recomputed (CacheBlend, check layer 1), then the document's own cache
  (never saw the block) and the view's fresh tokens attending to all of it;
- blend_r{P}_p{N}: as blend, the FIM view re-encoding the document's last N tokens before the
  cursor with the block (blend_r{P}: the view's default, edit_cache/views.py BLOCK_FRESH_PREFIX;
  N = 0 is the view before it; l2r views re-encode none);
- blend_r{P}[_p{N}]_s{M}: as blend, the FIM view's suffix keeping at most M cached tokens past its
  re-encoded window (those never saw the block; M = 0: the re-encoded window only);
- blendall_r{P}: as blend, but the block also takes the current document's tokens before the
  cursor's line from its cache, so P% of those are recomputed too (CacheBlend over every chunk).

Columns: tokens recomputed/req (through every layer), compute/req (token-layers / layers: the
check layer's full pass counts), context tokens in the block.

    python bench/crossfile.py --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf --subset 30 \\
        --max-file-chars 6000 --sets xfile --views l2r
    (--shard I/N runs every N-th target from the I-th; --merge a.json b.json ... prints them together)
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path

from common import (
    DEFAULT_DATA,
    edit_similarity,
    exact_match,
    load_records,
    machine,
    next_line_start,
    parser,
    run_or_merge,
    shard_flags,
    spread,
    sync,
    table,
    target_span,
    write_json,
)
from editkv.edit_cache.crossfile import block_layout, build_block, choose_chunks, context_format
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.tokens import is_line_local
from editkv.edit_cache.views import BLOCK_FRESH_PREFIX, DRAFT_SLOTS, _split_prefix, fill_in_middle, left_to_right
from editkv.engine.generate import StopRules, decode, prefill_prompt
from editkv.engine.loading import load_model
from editkv.engine.prompting import doc_start_ids, healed_fim_ids, healed_left_to_right_ids

METHODS = ("none", "exact", "ring", "blend_r0", "blend_r5", "blend_r15", "blendall_r15")
RING_CHUNK_LINES = 64  # llama.vscode's ring_chunk_size; a picked window is half of it
RING_CHUNKS = 16  # its ring_n_chunks


def load_cases(args) -> list[tuple[str, dict, dict]]:
    """(set, record, target) triples: records with context files, files under --max-file-chars."""
    companion = {}
    with gzip.open(args.crossfile, "rt", encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            if c["context"]:
                companion[c["id"]] = c
    records = [r for r in load_records(args.data, max_file_chars=args.max_file_chars) if r["id"] in companion]
    cases = []
    for rec in records:
        rec["crossfile"] = companion[rec["id"]]
        if "xfile" in args.sets:
            cases += [("xfile", rec, t) for t in companion[rec["id"]]["xfile_targets"]]
        if "ordinary" in args.sets:
            cases += [("ordinary", rec, t) for t in rec["targets"]]
    return cases


def load_blobs(path: Path, wanted: set[str]) -> dict[str, str]:
    out = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            b = json.loads(line)
            if b["blob"] in wanted:
                out[b["blob"]] = b["text"]
    return out


def _target_text(text: str, target: dict) -> tuple[str, int]:
    """(`text` with the target line's body deleted, the cursor after its indentation)."""
    cursor, end = target_span(text, target)
    return text[:cursor] + text[end:], cursor


def ring_ids(tok, cfg, sources: list[tuple[str, str]], budget: int, seed: int) -> list[int]:
    """llama.vscode's ring buffer of the context files under `budget` tokens, in llama.cpp's
    /infill layout, ending with the document start (ids)."""
    rng = random.Random(seed)
    windows = []
    for path, text in sources:
        lines = text.split("\n")
        if len(lines) + 1 < RING_CHUNK_LINES:
            windows.append([(path, 0, len(lines))])
            continue
        half = RING_CHUNK_LINES // 2
        starts = list(range(0, max(1, len(lines) - half + 1)))
        rng.shuffle(starts)
        windows.append([(path, s, min(s + half, len(lines))) for s in starts])
    chunks, left = [], budget
    rep, sep = tok.token_id("<|repo_name|>"), tok.token_id("<|file_sep|>")
    repo = rep is not None and sep is not None
    taken: list[set] = [set() for _ in windows]
    while len(chunks) < RING_CHUNKS and any(windows):
        progressed = False
        for i, options in enumerate(windows):
            while options:
                path, a, b = options.pop(0)
                if any(abs(a - x) < RING_CHUNK_LINES // 4 for x in taken[i]):
                    continue  # near-duplicate window (llama.vscode evicts similar chunks)
                text = "\n".join(dict(sources)[path].split("\n")[a:b]) + "\n"
                ids = ([sep] + tok.encode(f"{path}\n") if repo else []) + tok.encode(text)
                if len(ids) <= left and len(chunks) < RING_CHUNKS:
                    chunks.append(ids)
                    taken[i].add(a)
                    left -= len(ids)
                    progressed = True
                break
        if not progressed:
            break
    head = doc_start_ids(tok, cfg)
    if repo:
        return [rep] + tok.encode("myproject\n") + [i for c in chunks for i in c] + [sep] + \
            tok.encode("filename\n") + head
    return [i for c in chunks for i in c] + head


def run(args) -> dict:
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:  # before the model loads: a misspelt method fails here, not as `none`
        if method not in ("none", "exact", "ring"):
            _blend_method(method)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok, cfg = loaded.runner, loaded.tokenizer, loaded.config
    head = doc_start_ids(tok, cfg)
    line_local = is_line_local(tok)
    views = [v for v in args.views.split(",") if v]
    if "fim" in views and tok.fim is None:
        views.remove("fim")
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    cases = spread(load_cases(args), args.subset)
    shard, shards = args.shard
    cases = cases[shard::shards][: args.limit]
    wanted = {c["blob"] for _, rec, _ in cases for c in rec["crossfile"]["context"]}
    blobs = load_blobs(args.blobs, wanted)
    style = context_format(tok)
    rows = []
    started = time.perf_counter()
    open_docs: dict[str, Document] = {}  # context files, kept open across targets (their caches)
    options = DocumentOptions().tuned(loaded.cache)

    def result() -> dict:
        return {"rows": rows, "views": views, "methods": methods, "n_targets": len(cases), "style": style,
                "budget": args.budget, "seconds": time.perf_counter() - started, "model": loaded.source,
                "machine": machine(args.device)}

    for n, (tset, rec, target) in enumerate(cases):
        deleted, cursor = _target_text(rec["after"], target)
        sources = []
        for c in rec["crossfile"]["context"]:
            text = blobs[c["blob"]]
            if args.max_context_chars and len(text) > args.max_context_chars:
                continue
            if c["blob"] not in open_docs:
                open_docs[c["blob"]] = Document(model, tok, text, head=head, options=options, line_local=line_local)
            sources.append((c["path"], open_docs[c["blob"]]))
        doc = Document(model, tok, deleted, head=head, options=options, line_local=line_local)
        doc.ensure_ready()
        chunks = choose_chunks(deleted, sources, args.budget)
        for ch in chunks:  # the open documents' caches exist before the request
            ch.document.ensure_ready(upto=ch.ranges[-1][1])
        layout = block_layout(tok, cfg, chunks, head, path=rec["path"], repo=rec["repo"].split("/")[-1],
                              style=style)
        ring = ring_ids(tok, cfg, [(p, d.text) for p, d in sources], args.budget, seed=n) \
            if "ring" in methods else None
        for view in views:
            for method in methods:
                row = _request(loaded, method, view, doc, deleted, cursor, rules, layout, ring, chunks, style, rec)
                rows.append({"set": tset, "id": rec["id"], "view": view, "method": method,
                             "expected": target["expected"], "em": exact_match(row["pred"], target["expected"]),
                             "es": edit_similarity(row["pred"], target["expected"]),
                             "context_files": len(sources), "file_chars": len(deleted), **row})
        if len(open_docs) > args.keep_open:  # bound memory: the oldest documents close
            for key in list(open_docs)[: len(open_docs) - args.keep_open]:
                del open_docs[key]
        if args.progress:
            print(f"  {n + 1}/{len(cases)} targets, {time.perf_counter() - started:.0f}s", flush=True)
            write_json(args.json, {**result(), "partial": True})
    return result()


def _exact(loaded, prompt, heal, rules, view):
    """A fresh prefill of `prompt` and a greedy decode (under the model's attention window)."""
    model = loaded.runner
    cache = model.new_cache(len(prompt))
    logits, context = prefill_prompt(model, prompt, cache, sink=1, room=rules.max_tokens + DRAFT_SLOTS)
    return decode(model, loaded.tokenizer, logits, context=context, next_position=len(prompt), rules=rules,
                  heal=heal)


def _blend_method(method: str) -> tuple[float, int, int | None]:
    """`blend_r15` -> (0.15, BLOCK_FRESH_PREFIX: the view's default of re-encoded prefix tokens in
    FIM, None: the whole cached suffix); `blend_r15_p0` -> (0.15, 0, None); `blend_r15_s0` ->
    (0.15, BLOCK_FRESH_PREFIX, 0)."""
    m = re.fullmatch(r"blend(?:all)?_r(\d+)(?:_p(\d+))?(?:_s(\d+))?", method)
    if m is None:
        raise SystemExit(f"unknown method {method!r}: none, exact, ring, blend_r<P>[_p<N>][_s<M>] or "
                         "blendall_r<P>[_p<N>][_s<M>]")
    return (int(m.group(1)) / 100, BLOCK_FRESH_PREFIX if m.group(2) is None else int(m.group(2)),
            None if m.group(3) is None else int(m.group(3)))


def _request(loaded, method, view, doc, deleted, cursor, rules, layout, ring, chunks, style, rec) -> dict:
    """One timed completion: {pred, recomputed, compute, context_tokens, ms}."""
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    h = doc.h
    sync(loaded.device)
    t0 = time.perf_counter()
    block = None
    fresh_prefix, cached_suffix = BLOCK_FRESH_PREFIX, None  # (with a block only)
    context_tokens = 0
    if method in ("exact", "ring"):
        if view == "fim":
            prompt, heal = healed_fim_ids(tok, cfg, deleted[:cursor], deleted[next_line_start(deleted, cursor):],
                                          room=rules.max_tokens + DRAFT_SLOTS)
        else:
            prompt, heal = healed_left_to_right_ids(tok, cfg, deleted[:cursor])
        front = layout.ids if method == "exact" else ring
        assert front[len(front) - h:] == prompt[:h]
        prompt = front + prompt[h:]
        out = _exact(loaded, prompt, heal, rules, view)
        recomputed = compute = len(prompt)
        context_tokens = len(front) - h
    else:
        if method.startswith("blend"):
            ratio, fresh_prefix, cached_suffix = _blend_method(method)
            blk_layout = layout
            if method.startswith("blendall"):
                t, _ = _split_prefix(doc, cursor)
                blk_layout = block_layout(tok, cfg, chunks, doc.head, path=rec["path"],
                                          repo=rec["repo"].split("/")[-1], style=style, document=doc,
                                          document_tokens=t)
            block = build_block(model, blk_layout, recompute_ratio=ratio, spare=0)
            context_tokens = layout.reused_tokens
        if view == "fim":
            v = fill_in_middle(doc, cursor, suffix="next_line", max_new_tokens=rules.max_tokens, block=block,
                               block_fresh_prefix=fresh_prefix, block_cached_suffix=cached_suffix)
        else:
            v = left_to_right(doc, cursor, max_new_tokens=rules.max_tokens, block=block)
        out = v.decode(rules=rules)
        recomputed = v.encoded_tokens + (block.recomputed_tokens if block else 0)
        compute = v.encoded_tokens + (block.compute_tokens if block else 0)
    sync(loaded.device)
    return {"pred": out.text, "recomputed": recomputed, "compute": compute, "context_tokens": context_tokens,
            "ms": 1000 * (time.perf_counter() - t0), "decode_tokens": len(out.ids)}


def summarize(result: dict) -> str:
    groups = defaultdict(list)
    for r in result["rows"]:
        groups[(r["set"], r["view"], r["method"])].append(r)
    out = []
    for tset in sorted({r["set"] for r in result["rows"]}):
        for view in result["views"]:
            def em(method, tset=tset, view=view):
                g = groups.get((tset, view, method), [])
                return 100 * sum(r["em"] for r in g) / len(g) if g else None
            base, exact = em("none"), em("exact")
            ex_rows = groups.get((tset, view, "exact"), [])
            ex_tok = sum(r["recomputed"] for r in ex_rows) / len(ex_rows) if ex_rows else None
            lines = []
            for method in result["methods"]:
                g = groups.get((tset, view, method), [])
                if not g:
                    continue
                e = em(method)
                tok_req = sum(r["recomputed"] for r in g) / len(g)
                ms = sorted(r["ms"] for r in g)
                lines.append([method, len(g), e, "-" if base is None else e - base, "-" if exact is None else e - exact,
                              100 * sum(r["es"] for r in g) / len(g), tok_req,
                              sum(r["compute"] for r in g) / len(g),
                              f"{100 * tok_req / ex_tok:.1f}%" if ex_tok else "-",
                              sum(r["context_tokens"] for r in g) / len(g), sum(ms) / len(ms), ms[len(ms) // 2]])
            out.append(table(["method", "n", "EM", "EM - none", "EM - exact", "ES", "tokens recomputed/req",
                              "compute/req", "vs exact", "context tokens", "ms/req mean", "ms/req p50"], lines,
                             title=f"### {tset} targets, {view} view"))
    return "\n".join(out)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    shared = DEFAULT_DATA.parent
    p.add_argument("--crossfile", type=Path, default=shared / "dev-crossfile.jsonl.gz")
    p.add_argument("--blobs", type=Path, default=shared / "dev-blobs.jsonl.gz")
    p.add_argument("--sets", default="xfile,ordinary", help="comma list of xfile, ordinary")
    p.add_argument("--views", default="l2r,fim", help="comma list of l2r, fim")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of none, exact, ring, blend_r<P>[_p<N>][_s<M>], blendall_r<P>[_p<N>][_s<M>] "
                        "(P: percent recomputed; N: the document's tokens before the cursor a FIM view re-encodes; "
                        "M: its cached suffix tokens kept)")
    p.add_argument("--budget", type=int, default=1024, help="context tokens per request")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--subset", type=int, default=None, help="N targets spread evenly over the data")
    p.add_argument("--max-file-chars", type=int, default=None, help="skip records with larger files")
    p.add_argument("--max-context-chars", type=int, default=None, help="leave out context files larger than this")
    p.add_argument("--keep-open", type=int, default=24, help="context documents kept open (their caches)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    shard_flags(p)
    args = p.parse_args()
    run_or_merge(args, run, summarize, lambda r: (
        f"crossfile: {r['n_targets']} targets, model {r['model']}, {r['machine']}, "
        f"format {r['style']}, budget {r['budget']}, {r['seconds']:.0f}s"))


if __name__ == "__main__":
    main()
