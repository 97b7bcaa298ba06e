"""Lossless n-gram speculation on realedits: plain greedy decoding vs each drafter vs the combination.

For each target (the first --limit of the records): the document is realedits' `after` with
the target line's text after its indentation deleted, the cursor after the indentation (as in
bench/realedits.py). It is opened once (full prefill, not timed); the left-to-right and the FIM
view are built at the cursor (not timed); then, from each view's DecodeState, one after the
other, every method decodes a multi-line completion (up to --max-tokens, no line limit unless
--max-lines): so methods see the same machine state, and latency is decode time only: until
the GPU is idle again (work queued past a stop counts), and "returned after" until the
completion was the caller's.

Methods (greedy; every speculative one must give the baseline's exact output):
  plain    engine.generate.decode, one forward per token (the baseline)
  lookup   prompt lookup: the document (both sides of the cursor), other files, recent completions
  table    the STAND-style table of the model's own top-10 distributions, learnt from its own runs
  combo    both, chosen per step by expected tokens per forward cost
  tree     combo, with up to --tree-rows candidate chains verified as batch rows
  device   prompt lookup drafted and verified on the device (StaticForward.lookup_chain: graphed
           forwards only, so CUDA; --device-width tokens a verification, up to --device-steps of
           them per host round trip, two chains in flight; `device:W`, `device:W:S` or `device:W:S:F`
           (F chains in flight, 1 or 2) for others)
Each method/view pair has its own Speculator kept across targets (what a server does), so no
method learns from another's runs. References: the suffix after the cursor (left-to-right view;
the FIM prompt holds it), --workspace other files of the same repository (other open documents),
and each speculator's last 8 completions.

Identical outputs are checked token for token. In bfloat16 (the loader's default on CUDA) a
verification forward of T tokens and a one-token step round differently, so an argmax near-tie
may flip: pass --dtype float32 to check identity, bfloat16 to measure the usual serving setup.

    python bench/speculation.py --limit 30 --threads 1
    python bench/speculation.py --limit 100 --device cuda --dtype float32 --json /tmp/spec.json
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from common import iter_targets, load_records, machine, parser, sync, table, write_json
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import line_starts
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.decoding import Reference, SpecCounters, SpeculationConfig, Speculator
from editkv.engine.generate import StopRules
from editkv.engine.loading import load_model
from editkv.engine.prompting import doc_start_ids

METHODS = ("lookup", "table", "combo", "tree", "device")


def _config(method: str, args) -> SpeculationConfig:
    name, _, shape = method.partition(":")
    width, _, rest = shape.partition(":")
    steps, _, in_flight = rest.partition(":")
    drafters = {"lookup": ("lookup",), "table": ("table",), "device": ("lookup",)}.get(name, ("lookup", "table"))
    return SpeculationConfig(drafters=drafters, threshold=args.threshold, max_draft=args.max_draft,
                             max_rows=args.tree_rows if name == "tree" else 1,
                             measure_cost=args.row_cost is None, row_cost=args.row_cost or 0.0,
                             device_lookup=name == "device", device_width=int(width or args.device_width),
                             device_steps=int(steps or args.device_steps),
                             device_in_flight=int(in_flight or SpeculationConfig.device_in_flight))


def _captures(model) -> int:
    """CUDA graphs the model's static forward has captured so far."""
    return model.static.captures if model.static is not None else 0


def _cursor_text(rec: dict, target: dict) -> tuple[str, int]:
    text = rec["after"]
    start = line_starts(text)[target["line"]]
    cursor = start + len(target["prefix"])
    assert text[cursor:].startswith(target["expected"]), "target does not match the text"
    return text[:cursor] + text[cursor + len(target["expected"]):], cursor


def _workspace(records: list[dict], rec: dict, n: int, tokenizer, cache: dict) -> list[Reference]:
    """Up to n other files of the record's repository (never another version of the same path)."""
    out, paths = [], {rec["path"]}
    for other in records:
        if len(out) >= n:
            break
        if other["repo"] != rec["repo"] or other["path"] in paths:
            continue
        paths.add(other["path"])
        if other["id"] not in cache:
            cache[other["id"]] = tokenizer.encode(other["after"])
        out.append(Reference.of("workspace", cache[other["id"]]))
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.runner, loaded.tokenizer
    device = loaded.device
    head = doc_start_ids(tok, loaded.config)
    records = load_records(args.data, max_file_chars=args.max_file_chars)
    views = [v for v in args.views.split(",") if v]
    if "fim" in views and tok.fim is None:
        views.remove("fim")
    methods = [m for m in args.methods.split(",") if m]
    if model.static is None:  # the device method needs graphed forwards (it would be lookup's host path)
        methods = [m for m in methods if not m.startswith("device")]
    rules = StopRules(max_tokens=args.max_tokens, max_lines=args.max_lines)
    speculators = {(m, v): Speculator(_config(m, args)) for m in methods for v in views}
    ws_cache: dict = {}
    rows = []
    started = time.perf_counter()
    warm = True
    for n_done, (rec, target) in enumerate(iter_targets(records, args.limit)):
        text, cursor = _cursor_text(rec, target)
        doc = Document(model, tok, text, head=head)
        doc.ensure_ready()
        workspace = _workspace(records, rec, args.workspace, tok, ws_cache)
        for view_name in views:
            capacity = args.max_tokens + args.max_draft + 2
            if view_name == "fim":
                view = fill_in_middle(doc, cursor, suffix="next_line", max_new_tokens=capacity)
                refs = list(workspace)
            else:
                view = left_to_right(doc, cursor, max_new_tokens=capacity)
                suffix = doc.ids[doc.tokens.first_token_at_or_after(cursor):]
                refs = [Reference.of("suffix", suffix), *workspace]
            if warm:  # first calls pay for allocator / kernel warm-up: not measured
                view.decode(rules=rules)
                Speculator(_config("combo", args)).decode(view.state(), rules=rules, references=refs)
                warm = False
            elif model.static is not None:
                # each document's first decode captures its graphs (the one-token step): not
                # measured, or whichever method ran first would pay for all of them
                view.decode(rules=rules)
            for method in methods:
                if method.startswith("device"):  # its verification graphs, by a throwaway speculator
                    # (the measured one must not learn this target's completion)
                    Speculator(_config(method, args)).decode(view.state(), rules=rules)
            captured = _captures(model)
            sync(device)
            t0 = time.perf_counter()
            plain = view.decode(rules=rules)
            returned = 1000 * (time.perf_counter() - t0)
            sync(device)
            base = {"target": n_done, "id": rec["id"], "view": view_name, "healed": bool(view.heal),
                    "prompt_tokens": len(view.prompt_ids)}
            rows.append({**base, "method": "plain", "ms": 1000 * (time.perf_counter() - t0), "ms_returned": returned,
                         "tokens": len(plain.ids), "forwards": plain.stats.forwards, "identical": True,
                         "captures": _captures(model) - captured,
                         "counters": {}})
            for method in methods:
                captured = _captures(model)
                sync(device)
                t0 = time.perf_counter()
                out = speculators[(method, view_name)].decode(view.state(), rules=rules, references=refs)
                returned = 1000 * (time.perf_counter() - t0)  # the completion is the caller's from here
                sync(device)  # work still queued (a chain in flight past a stop) counts too
                ms = 1000 * (time.perf_counter() - t0)
                captured = _captures(model) - captured
                c = SpecCounters.read(out.stats.extra)
                same = (out.ids, out.text, out.stop_reason) == (plain.ids, plain.text, plain.stop_reason)
                rows.append({**base, "method": method, "ms": ms, "ms_returned": returned, "tokens": len(out.ids),
                             "captures": captured,
                             "forwards": out.stats.forwards, "identical": same,
                             "counters": {"drafted": c.drafted, "accepted": c.accepted, "bonus": c.bonus,
                                          "rows": c.rows, "chained": c.chained, "by_source": c.by_source}})
        if args.progress:
            print(f"  {n_done + 1} targets, {time.perf_counter() - started:.0f}s", flush=True)
    return {"rows": rows, "views": views, "methods": ["plain", *methods], "model": loaded.source,
            "machine": machine(args.device), "dtype": str(model.dtype), "seconds": time.perf_counter() - started,
            "n_targets": len({r["target"] for r in rows}), "settings": vars(args) | {"data": str(args.data),
                                                                                     "json": str(args.json)}}


def summarize(result: dict) -> str:
    groups = defaultdict(list)
    for r in result["rows"]:
        groups[(r["view"], r["method"])].append(r)
        groups[("all", r["method"])].append(r)
    out = []
    for view in [*result["views"], "all"] if len(result["views"]) > 1 else result["views"]:
        base = groups[(view, "plain")]
        base_ms = sum(r["ms"] for r in base)
        trows = []
        for method in result["methods"]:
            g = groups[(view, method)]
            if not g:
                continue
            ms = [r["ms"] for r in g]
            tokens = sum(r["tokens"] for r in g)
            forwards = sum(r["forwards"] for r in g)
            drafted = sum(r["counters"].get("drafted", 0) for r in g)
            accepted = sum(r["counters"].get("accepted", 0) for r in g)
            trows.append([method, len(g), f"{sum(r['identical'] for r in g)}/{len(g)}",
                          statistics.mean(ms), statistics.mean(r.get("ms_returned", r["ms"]) for r in g),
                          statistics.median(ms), 1000 * tokens / sum(ms),
                          f"{base_ms / sum(ms):.2f}x", forwards / len(g), tokens / max(forwards, 1),
                          drafted / max(forwards, 1),
                          f"{100 * accepted / drafted:.0f}%" if drafted else "-",
                          sum(r.get("captures", 0) for r in g)])
        out.append(table(["method", "n", "identical", "ms/req mean", "returned after (mean)", "ms/req p50", "tokens/s",
                          "speedup vs plain", "forwards/req", "tokens/forward", "drafted/forward",
                          "accepted/drafted", "graph captures timed"], trows,
                         title=f"### {view} view" if view != "all" else "### both views"))
    by_source = defaultdict(lambda: [0, 0])
    for r in result["rows"]:
        for source, (d, a) in r["counters"].get("by_source", {}).items():
            by_source[(r["method"], source)][0] += d
            by_source[(r["method"], source)][1] += a
    srows = [[m, s, d, a, f"{100 * a / d:.0f}%" if d else "-"] for (m, s), (d, a) in sorted(by_source.items())]
    out.append(table(["method", "draft source", "drafted", "accepted", "accepted/drafted"], srows,
                     title="### acceptance by draft source (both views)"))
    return "\n".join(out)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--views", default="l2r,fim", help="comma list of l2r, fim")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-lines", type=int, default=None, help="stop after N line ends (default: no limit)")
    p.add_argument("--threshold", type=float, default=SpeculationConfig.threshold,
                   help="SpecDec++ h (default: %(default)s)")
    p.add_argument("--max-draft", type=int, default=16)
    p.add_argument("--tree-rows", type=int, default=3, help="rows of the tree method")
    p.add_argument("--device-width", type=int, default=SpeculationConfig.device_width,
                   help="tokens a device-side verification checks (2, 4, 8, 16)")
    p.add_argument("--device-steps", type=int, default=SpeculationConfig.device_steps,
                   help="device-side verifications per host round trip (1-16)")
    p.add_argument("--row-cost", type=float, default=None,
                   help="plan with a fixed cost model (drafted tokens free, this per extra row) instead of "
                        "measured forward times: what a GPU looks like")
    p.add_argument("--workspace", type=int, default=2, help="other files of the repo used as references")
    p.add_argument("--max-file-chars", type=int, default=20000, help="skip records with larger files")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 (default: the loader's for the device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    result = run(args)
    print(f"speculation: {result['n_targets']} targets x {len(result['views'])} views, max {args.max_tokens} "
          f"tokens, model {result['model']} ({result['dtype']}), {result['machine']}, {result['seconds']:.0f}s")
    print(summarize(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
