"""Prompt layouts side by side: which FIM / left-to-right token layout a model completes best.

Exact prompts only (a fresh prefill per layout; no edit cache), on realedits targets: the
target line's text after its indentation is deleted and the model completes it (greedy, end
of line, token healing), as bench/realedits.py's full-recompute rows do. Layouts that share
their start share one prefill of it.

Layouts (Qwen2.5-Coder's own formats; llama.cpp's `/infill` builds the "cpp" one). Left-to-right
layouts heal the prompt's last token (engine/healing.py); FIM layouts do not, unless named _heal:
- l2r_pre: `<|fim_prefix|> prefix` (editkv's left-to-right view: the document starts with <PRE>)
- l2r_raw: `prefix`; l2r_repo: `<|repo_name|>R\\n<|file_sep|>P\\n prefix` (repo-level completion)
- fim_next: `<PRE> prefix <SUF> next lines <MID>` (the suffix starts at the next line, as the
  server's default); fim_next_heal: the same with the prefix's last token healed (editkv before
  issue 22); fim_rest: the suffix starts at the cursor (rest of the line, then the next lines)
- fim_repo_next / fim_repo_rest: the same after `<|repo_name|>R\\n<|file_sep|>P\\n`
- fim_cpp_rest: llama.cpp's header, `<|repo_name|>myproject\\n<|file_sep|>filename\\n`, rest of line

Columns: EM/ES of the line, empty (the model ended the line at once), "copies suffix" (the line
is one of the next 3 non-blank lines after the cursor's: the model wrote the suffix's start instead
of the middle), mean prompt tokens.

    python bench/fim_prompts.py --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf --subset 30 \\
        --max-file-chars 6000
    (--shard I/N runs every N-th target from the I-th; --merge a.json b.json ... prints them together)
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from common import (
    edit_similarity,
    exact_match,
    iter_targets,
    load_records,
    machine,
    parser,
    run_or_merge,
    shard_flags,
    spread,
    table,
    write_json,
)
from editkv.edit_cache.positions import line_starts
from editkv.engine.generate import StopRules, decode, prefill
from editkv.engine.healing import healer_for
from editkv.engine.loading import load_model
from editkv.engine.model import Span

LAYOUTS = ("l2r_pre", "l2r_raw", "l2r_repo", "fim_next_heal", "fim_next", "fim_rest", "fim_repo_next",
           "fim_repo_rest", "fim_cpp_rest")


def _heads(tok, rec) -> dict[str, list[int]]:
    """The ids before the prefix of each group of layouts (those sharing a prefill)."""
    fim = tok.fim
    repo = tok.encode(f"{rec['repo'].split('/')[-1]}\n") if fim else []
    path = tok.encode(f"{rec['path']}\n")
    rep, sep = tok.token_id("<|repo_name|>"), tok.token_id("<|file_sep|>")
    heads = {"raw": []}
    if fim is not None:
        heads["pre"] = [fim.prefix]
        if rep is not None and sep is not None:
            heads["repo"] = [rep] + repo + [sep] + path
            heads["repo_pre"] = heads["repo"] + [fim.prefix]
            heads["cpp_pre"] = [rep] + tok.encode("myproject\n") + [sep] + tok.encode("filename\n") + [fim.prefix]
    return heads


# layout -> (head group, suffix policy or None for left-to-right, healed)
_PLAN = {"l2r_pre": ("pre", None, True), "l2r_raw": ("raw", None, True), "l2r_repo": ("repo", None, True),
         "fim_next_heal": ("pre", "next", True), "fim_next": ("pre", "next", False),
         "fim_rest": ("pre", "rest", False), "fim_repo_next": ("repo_pre", "next", False),
         "fim_repo_rest": ("repo_pre", "rest", False), "fim_cpp_rest": ("cpp_pre", "rest", False)}


def run(args) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.runner, loaded.tokenizer
    healer = healer_for(tok)
    layouts = [x for x in args.layouts.split(",") if x]
    records = load_records(args.data, max_file_chars=args.max_file_chars)
    shard, shards = args.shard
    pairs = spread(list(iter_targets(records)), args.subset)[shard::shards][: args.limit]
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    rows = []
    started = time.perf_counter()
    for n, (rec, target) in enumerate(pairs):
        text = rec["after"]
        starts = line_starts(text)
        line_start = starts[target["line"]]
        line_end = starts[target["line"] + 1] if target["line"] + 1 < len(starts) else len(text)
        body_end = line_start + len(text[line_start:line_end].rstrip("\r\n"))
        cursor = line_start + len(target["prefix"])
        deleted = text[:cursor] + text[body_end:]
        rest = deleted[cursor:]
        nl = min((i for i in (rest.find("\r\n"), rest.find("\n"), rest.find("\r")) if i >= 0), default=-1)
        next_line = "" if nl < 0 else rest[nl + (2 if rest.startswith("\r\n", nl) else 1):]
        following = [line.strip() for line in next_line.splitlines() if line.strip()][:3]
        whole_prefix = tok.encode(deleted[:cursor])
        prefix_ids, heal = healer.split(whole_prefix)
        unhealed = whole_prefix[len(prefix_ids):]  # the healed token, kept by unhealed layouts
        heads = _heads(tok, rec)
        suffixes = {"next": tok.encode(next_line)[: args.max_suffix_tokens],
                    "rest": tok.encode(rest)[: args.max_suffix_tokens]}
        by_group = defaultdict(list)
        for layout in layouts:
            group, policy, healed = _PLAN[layout]
            if group in heads:
                by_group[group].append((layout, policy, healed))
        for group, members in by_group.items():
            shared = heads[group] + prefix_ids
            longest = max(len(suffixes[p]) + 3 if p else 0 for _, p, _ in members)
            cache = model.new_cache(len(shared) + longest)
            with torch.inference_mode():
                last = prefill(model, shared, cache)
                for layout, policy, healed in members:
                    t0 = time.perf_counter()
                    if policy is None:
                        logits, end = last, len(shared)
                    else:
                        tail = ([] if healed else unhealed) + [tok.fim.suffix] + suffixes[policy] + [tok.fim.middle]
                        logits = model(torch.tensor([tail], device=model.device),
                                       torch.arange(len(shared), len(shared) + len(tail), device=model.device),
                                       write=cache, write_at=len(shared), context=[Span(cache, 0, len(shared))],
                                       logits="last")
                        end = len(shared) + len(tail)
                    out = decode(model, tok, logits, context=[Span(cache, 0, end)], next_position=end,
                                 rules=rules, heal=heal if healed else b"")
                    rows.append({"id": rec["id"], "kind": rec["kind"], "where": target["where"], "layout": layout,
                                 "pred": out.text, "expected": target["expected"],
                                 "em": exact_match(out.text, target["expected"]),
                                 "es": edit_similarity(out.text, target["expected"]),
                                 "empty": not out.text.strip(), "prompt_tokens": end, "chars": len(text),
                                 "copies_suffix": bool(out.text.strip()) and out.text.strip() in following,
                                 "decode_tokens": len(out.ids), "ms": 1000 * (time.perf_counter() - t0)})
        if args.progress:
            print(f"  {n + 1}/{len(pairs)} targets, {time.perf_counter() - started:.0f}s", flush=True)
            write_json(args.json, {"rows": rows, "layouts": layouts, "partial": True})
    return {"rows": rows, "layouts": layouts, "n_targets": len(pairs), "model": loaded.source,
            "machine": machine(args.device), "seconds": time.perf_counter() - started}


def summarize(result: dict) -> str:
    groups = defaultdict(list)
    for r in result["rows"]:
        groups[r["layout"]].append(r)
    result = {"layouts": list(groups), **result}
    base = groups.get("fim_next") or groups.get(result["layouts"][0])
    base_em = 100 * sum(r["em"] for r in base) / max(len(base), 1)
    lines = []
    for layout in result["layouts"]:
        g = groups.get(layout)
        if not g:
            continue
        em = 100 * sum(r["em"] for r in g) / len(g)
        lines.append([layout, len(g), em, em - base_em, 100 * sum(r["es"] for r in g) / len(g),
                      100 * sum(r["empty"] for r in g) / len(g),
                      100 * sum(r.get("copies_suffix", False) for r in g) / len(g),
                      sum(r["prompt_tokens"] for r in g) / len(g)])
    out = [table(["layout", "n", "EM", "EM - fim_next", "ES", "empty %", "copies suffix %", "prompt tokens"],
                 lines)]
    sizes = [("<= 6,000 chars", 0, 6000), ("6,001-16,000", 6001, 16000), ("> 16,000", 16001, 1 << 62)]
    rows = []
    for layout in result["layouts"]:
        line = [layout]
        for _, lo, hi in sizes:
            g = [r for r in groups.get(layout, []) if lo <= r.get("chars", 0) <= hi]
            line.append(f"{100 * sum(r['em'] for r in g) / len(g):.1f} ({len(g)})" if g else "-")
        rows.append(line)
    out.append(table(["EM by file size (n)"] + [name for name, _, _ in sizes], rows))
    return "\n".join(out)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of " + ", ".join(LAYOUTS))
    p.add_argument("--subset", type=int, default=None, help="N targets spread evenly over the data")
    p.add_argument("--max-file-chars", type=int, default=None, help="skip records with larger files")
    p.add_argument("--max-suffix-tokens", type=int, default=100_000, help="cut FIM suffixes to this many tokens")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    shard_flags(p)
    args = p.parse_args()
    run_or_merge(args, run, summarize, lambda r: (
        f"fim_prompts: {r['n_targets']} targets, model {r['model']}, {r['machine']}, {r['seconds']:.0f}s"))


if __name__ == "__main__":
    main()
