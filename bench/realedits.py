"""Edit-cache quality and cost on real edits: full recompute vs PIE vs the baselines.

For each realedits record and cache method: open `before` (full prefill, not timed), apply
the record's `edits` as one didChange, then for each target delete the target line's text
after its indentation (the answer must not be visible), complete at the cursor (greedy,
stop at end of line) in the left-to-right and the FIM view, compare with `expected`, and put
the line back. A request's cost is the cache repair it triggered plus the view and decode.

Methods: full (fresh prefill of the exact prompt), pie, conflict (PIE without re-rotation),
prefix_reuse (re-encode from the first changed token: llama.cpp / vLLM prefix caching);
pie_b<N> (PIE that re-encodes the stale tokens once more than N are stale: the staleness
budget sweep, e.g. --methods full,pie,pie_b1024,pie_b256,pie_b0); pie_c<N> (PIE whose views
re-encode the stale tokens among the N before the cursor); pie_u (PIE whose FIM view encodes
its suffix window again for every request, after the cursor's line: `fimSuffixCache` off, the
default); pie_k (`fimSuffixCache` on: the window kept between requests).

    python bench/realedits.py --limit 50 --model engine/default_model --device cpu
"""

from __future__ import annotations

import time
from collections import defaultdict

from common import (
    edit_similarity,
    exact_match,
    iter_targets,
    load_records,
    machine,
    next_line_start,
    parser,
    resumed_rows,
    run_or_merge,
    shard_flags,
    spread,
    sync,
    table,
    target_span,
    write_json,
)
from editkv.edit_cache.document import Document, DocumentOptions
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.tokens import is_line_local
from editkv.edit_cache.views import DRAFT_SLOTS, fill_in_middle, left_to_right
from editkv.engine.generate import StopRules, decode, prefill_prompt
from editkv.engine.loading import load_model
from editkv.engine.prompting import doc_start_ids, healed_fim_ids, healed_left_to_right_ids

METHODS = ("full", "pie", "conflict", "prefix_reuse")


def _exact(loaded, prompt, heal, rules):
    """A fresh prefill of `prompt` and a greedy decode, under the model's attention window."""
    model = loaded.runner
    cache = model.new_cache(len(prompt))
    logits, context = prefill_prompt(model, prompt, cache, sink=len(doc_start_ids(loaded.tokenizer, loaded.config)),
                                     room=rules.max_tokens + DRAFT_SLOTS)
    return decode(model, loaded.tokenizer, logits, context=context, next_position=len(prompt), rules=rules,
                  heal=heal)


def run(args) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok, cfg = loaded.tokenizer, loaded.config
    records = load_records(args.data, max_file_chars=args.max_file_chars, min_file_chars=args.min_file_chars)
    views = [v for v in args.views.split(",") if v]
    if "fim" in views and tok.fim is None:
        views.remove("fim")
    methods = [m for m in args.methods.split(",") if m]
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    line_local = is_line_local(tok)
    head = doc_start_ids(tok, cfg)
    chosen = {(id(rec), id(t)) for rec, t in spread(list(iter_targets(records)), args.subset)}
    rows, done = resumed_rows(args)  # one per (target, method, view)
    n_targets = len(rows) // (len(methods) * len(views))  # (one row per target, method and view)
    started = time.perf_counter()

    def result() -> dict:
        return {"rows": rows, "views": views, "methods": methods, "n_targets": n_targets,
                "seconds": time.perf_counter() - started, "model": loaded.source, "weights": loaded.weights,
                "machine": machine(args.device)}
    shard, shards = args.shard
    for index, rec in enumerate(records):
        if args.limit is not None and n_targets >= args.limit:
            break
        if index % shards != shard or rec["id"] in done:
            continue
        targets = [t for t in rec["targets"] if (id(rec), id(t)) in chosen]
        if args.limit:
            targets = targets[: max(0, args.limit - n_targets)]
        if not targets:
            continue
        n_targets += len(targets)
        edits = [(Range(_pos(e["range"]["start"]), _pos(e["range"]["end"])), e["text"]) for e in rec["edits"]]
        docs = {}
        for method in methods:
            if method == "full":
                continue
            doc = Document(loaded.runner, tok, rec["before"], head=head, options=_options(method, args, loaded),
                           line_local=line_local)
            doc.ensure_ready()
            for rng, text in edits:
                doc.apply_change(rng, text)
            docs[method] = doc
        text_after = rec["after"]
        for target in targets:
            cursor, end = target_span(text_after, target)
            deleted = text_after[:cursor] + text_after[end:]
            for doc in docs.values():
                doc.apply_change(Range(to_position(text_after, cursor), to_position(text_after, end)), "")
                assert doc.text == deleted
            start = cursor
            if args.typed:  # the line's first characters typed one by one, a FIM view asked at each
                typed = target["expected"][: max(0, min(args.typed, len(target["expected"]) - 1))]
                for i, ch in enumerate(typed):
                    at = to_position(deleted, start + i)
                    deleted = deleted[: start + i] + ch + deleted[start + i:]
                    for doc in docs.values():
                        doc.apply_change(Range(at, at), ch)
                        if "fim" in views and i + 1 < len(typed):  # (the last one is the request's)
                            fill_in_middle(doc, start + i + 1, suffix="next_line", max_new_tokens=rules.max_tokens)
                cursor = start + len(typed)
                target = {**target, "expected": target["expected"][len(typed):]}
            for method in methods:
                repair = _repair(loaded, docs.get(method))
                for view in views:
                    rows.append(_request(loaded, method, view, docs.get(method), deleted, cursor, rules,
                                         repair, rec, target))
            for doc in docs.values():
                # put the line back (pending until the next request repairs it)
                doc.apply_change(Range(to_position(deleted, start), to_position(deleted, cursor)),
                                 text_after[start:end])
                assert doc.text == text_after
        if args.progress:
            print(f"  {n_targets} targets, {time.perf_counter() - started:.0f}s", flush=True)
            write_json(args.json, {**result(), "partial": True})  # what a run cut short leaves
    return {**result(), "partial": False}


def _options(method: str, args, loaded) -> DocumentOptions:
    """Cache options of a method, with the model's tuned ones unless the command line sets them;
    "pie_b<N>": PIE that refreshes once more than N tokens are stale; "pie_c<N>": PIE whose views
    re-encode the stale tokens among the N before the cursor."""
    given = {"fim_fresh_suffix": args.fim_fresh_suffix, "refresh_near_cursor": args.refresh_near_cursor}
    mode, extra = method, {}
    if method.startswith("pie_b"):
        mode, extra = "pie", {"stale_budget": int(method[5:])}
    elif method.startswith("pie_c"):
        mode, given = "pie", {**given, "refresh_near_cursor": int(method[5:])}
    elif method == "pie_u":  # the FIM view's suffix window re-encoded after the cursor's line every request
        mode, extra = "pie", {"fim_suffix_cache": False}
    elif method == "pie_k":  # the FIM view's suffix window kept between requests (fimSuffixCache on)
        mode, extra = "pie", {"fim_suffix_cache": True}
    return DocumentOptions(mode=mode, refresh_window=args.refresh_window, **extra).tuned(loaded.cache, **given)


def _pos(p):
    from editkv.edit_cache.positions import Position

    return Position(p["line"], p["character"])


def _repair(loaded, doc) -> tuple[float, int]:
    """Apply the pending edits of a cached document: (ms, tokens encoded); (0, 0) for full."""
    if doc is None:
        return 0.0, 0
    sync(loaded.device)
    t0 = time.perf_counter()
    before = doc.stats.tokens_encoded
    doc.ensure_ready()
    sync(loaded.device)
    return 1000 * (time.perf_counter() - t0), doc.stats.tokens_encoded - before


def _request(loaded, method, view, doc, deleted, cursor, rules, repair, rec, target):
    """One timed completion (after its share of the repair); returns a result row."""
    tok, cfg = loaded.tokenizer, loaded.config
    device = loaded.device
    sync(device)
    t0 = time.perf_counter()
    if method == "full":
        if view == "fim":
            prompt, heal = healed_fim_ids(tok, cfg, deleted[:cursor], deleted[next_line_start(deleted, cursor):],
                                          room=rules.max_tokens + DRAFT_SLOTS)
        else:
            prompt, heal = healed_left_to_right_ids(tok, cfg, deleted[:cursor])
        out = _exact(loaded, prompt, heal, rules)
        recomputed = len(prompt)
    else:
        before = doc.stats.tokens_encoded  # a view's refresh near the cursor
        if view == "fim":
            v = fill_in_middle(doc, cursor, suffix="next_line", max_new_tokens=rules.max_tokens)
        else:
            v = left_to_right(doc, cursor, max_new_tokens=rules.max_tokens)
        out = v.decode(rules=rules)
        recomputed = repair[1] + v.encoded_tokens + doc.stats.tokens_encoded - before
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) + repair[0]
    pred = out.text
    return {"id": rec["id"], "kind": rec["kind"], "where": target["where"], "method": method, "view": view,
            "pred": pred, "expected": target["expected"], "em": exact_match(pred, target["expected"]),
            "es": edit_similarity(pred, target["expected"]), "recomputed": recomputed, "ms": ms,
            "repair_ms": repair[0], "decode_tokens": len(out.ids)}


def summarize(result: dict) -> str:
    rows = result["rows"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["view"], r["method"])].append(r)
    out = []
    for view in result["views"]:
        full = groups.get((view, "full"), [])
        full_em = 100 * sum(r["em"] for r in full) / max(len(full), 1)
        full_tok = sum(r["recomputed"] for r in full) / max(len(full), 1)
        prefix = groups.get((view, "prefix_reuse"), [])
        prefix_tok = sum(r["recomputed"] for r in prefix) / max(len(prefix), 1) if prefix else None
        table_rows = []
        for method in result["methods"]:
            g = groups[(view, method)]
            if not g:
                continue
            em = 100 * sum(r["em"] for r in g) / len(g)
            es = 100 * sum(r["es"] for r in g) / len(g)
            tok = sum(r["recomputed"] for r in g) / len(g)
            ms = sorted(r["ms"] for r in g)
            table_rows.append([method, len(g), em, em - full_em, es, tok,
                               f"{100 * tok / prefix_tok:.1f}%" if prefix_tok else "-",
                               f"{100 * tok / full_tok:.1f}%" if full else "-",
                               sum(ms) / len(ms), ms[len(ms) // 2]])
        out.append(table(["method", "n", "EM", "EM - full", "ES", "tokens recomputed/req",
                          "vs prefix_reuse", "vs full", "ms/req mean", "ms/req p50"], table_rows,
                         title=f"### {view} view"))
        for field in ("kind", "where"):
            values = sorted({r[field] for r in rows})
            trows = []
            for method in result["methods"]:
                line = [method]
                for value in values:
                    g = [r for r in groups[(view, method)] if r[field] == value]
                    line.append(f"{100 * sum(r['em'] for r in g) / max(len(g), 1):.1f}" if g else "-")
                trows.append(line)
            ns = {value: sum(1 for r in groups[(view, result['methods'][0])] if r[field] == value)
                  for value in values}
            out.append(table([f"EM by {field}"] + [f"{v} (n={ns[v]})" for v in values], trows))
    return "\n".join(out)


def merge(results: list[dict]) -> dict:
    """One result from the --json output of shards of one run (same views and methods)."""
    first = results[0]
    for r in results[1:]:
        if (r["views"], r["methods"]) != (first["views"], first["methods"]):
            raise SystemExit("--merge: the runs differ in views or methods")
    return {**first, "rows": [row for r in results for row in r["rows"]],
            "n_targets": sum(r["n_targets"] for r in results), "seconds": max(r["seconds"] for r in results)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--views", default="l2r,fim", help="comma list of l2r, fim")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS) + ", pie_b<N>")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--subset", type=int, default=None,
                   help="a fixed subset of N targets spread evenly over the (size-filtered) data")
    p.add_argument("--max-file-chars", type=int, default=None, help="skip records with larger files")
    p.add_argument("--min-file-chars", type=int, default=None,
                   help="only records with larger files (those beyond a small model's context)")
    p.add_argument("--refresh-window", type=int, default=0, help="PIE: tokens re-encoded after each edit")
    p.add_argument("--fim-fresh-suffix", type=int, default=None,
                   help="FIM views: re-encode this many of the suffix's first cached tokens after <SUF> "
                        "(default: the model's recommendation, as the server does)")
    p.add_argument("--refresh-near-cursor", type=int, default=None,
                   help="views: re-encode the stale tokens among this many before the cursor (default: the model's)")
    shard_flags(p, unit="record", resume=True)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--typed", type=int, default=0,
                   help="type the target line's first N characters (one change and FIM view each) and "
                        "complete the rest: FIM views reuse their suffix window while typing")
    args = p.parse_args()
    run_or_merge(args, run, summarize, lambda r: (
        f"realedits: {r['n_targets']} targets, model {r['model']}, {r['machine']}, {r['seconds']:.0f}s"), merge)

if __name__ == "__main__":
    main()
