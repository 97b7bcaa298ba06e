"""Next-line quality of the embedded default model vs an n-gram baseline vs other models.

Each target: the document is `after` with the target line's text after its indentation
removed, the cursor after the indentation; the expected line is never visible. Methods,
side by side in one run:
  ngram     greedy token n-gram: the longest context seen in the file itself (prefix and
            suffix of the cursor) or in the training corpus (the n-gram table shipped with
            the default model), the file winning ties;
  <model>   greedy decoding, left-to-right and FIM contexts, for each `--model`/`--extra-model`.
Also bits per byte of each model on whole `after` files.

    python bench/default_model.py --subset 100 --extra-model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    edit_similarity,
    exact_match,
    iter_targets,
    load_records,
    machine,
    parser,
    spread,
    sync,
    table,
    write_json,
)
from editkv.edit_cache.positions import line_starts
from editkv.engine.generate import StopRules, decode, prefill
from editkv.engine.healing import healer_for
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.model import Span
from editkv.engine.ngram import NgramTable
from editkv.engine.prompting import doc_start_ids, fim_layout, split_fim_prefix

NGRAM_FILE = "ngram.npz"


def build_cases(records, subset: int | None, limit: int | None, offset: int = 0):
    """(record, target, text before the cursor, text from the next line on) for the chosen targets."""
    pairs = spread(list(iter_targets(records)), subset, offset)  # spread evenly over the repos
    if limit is not None:
        pairs = pairs[:limit]
    cases = []
    for rec, target in pairs:
        text = rec["after"]
        starts = line_starts(text)  # LSP lines, as the targets count them
        start = starts[target["line"]]
        cursor = start + len(target["prefix"])
        next_line = starts[target["line"] + 1] if target["line"] + 1 < len(starts) else len(text)
        cases.append((rec, target, text[:cursor], text[next_line:]))
    return cases


def build_prompt(tok, cfg, prefix: str, suffix: str, view: str, max_prefix: int, max_suffix: int):
    """(prompt ids, healed bytes): the prefix's last max_prefix tokens, the suffix's first max_suffix."""
    head = doc_start_ids(tok, cfg)
    if view == "l2r":
        pre, heal = healer_for(tok).split(tok.encode(prefix)[-max_prefix:])
        return head + pre, heal
    pre, heal = split_fim_prefix(tok, tok.encode(prefix)[-max_prefix:])  # healed only with a prefix tail
    return fim_layout(tok, cfg, pre, tok.encode(suffix)[:max_suffix]), heal


def model_predictions(loaded, cases, view, args) -> list[tuple[str, float]]:
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    out = []
    for _rec, _target, prefix, suffix in cases:
        prompt, heal = build_prompt(tok, cfg, prefix, suffix, view, args.max_prefix_tokens, args.max_suffix_tokens)
        sync(loaded.device)
        t0 = time.perf_counter()
        cache = model.new_cache(len(prompt))
        logits = prefill(model, prompt, cache)
        result = decode(model, tok, logits, context=[Span(cache, 0, len(prompt))], next_position=len(prompt),
                        rules=rules, heal=heal)
        sync(loaded.device)
        out.append((result.text, 1000 * (time.perf_counter() - t0)))
    return out


def ngram_predictions(tok, corpus: NgramTable | None, cases, args) -> list[tuple[str, float]]:
    """Greedy n-gram completion with the same token healing as the models get."""
    healer = healer_for(tok)
    out = []
    for _rec, _target, prefix, suffix in cases:
        t0 = time.perf_counter()
        context, remaining = healer.split(tok.encode(prefix))
        heal = remaining
        file_tokens = np.array(context + tok.encode(suffix))
        local = NgramTable.build(file_tokens, max_order=5, top_k=16) if len(file_tokens) > 1 else None
        generated: list[int] = []
        for _ in range(args.max_tokens):
            best = _ngram_next(context + generated, (local, corpus), healer, remaining)
            if best is None or tok.is_special(best):
                break
            generated.append(best)
            if remaining:
                remaining = healer.advance(remaining, best)
            if "\n" in tok.decode(generated)[len(heal):]:
                break
        text = tok.decode(generated)
        text = text[len(heal.decode()):] if text.startswith(heal.decode()) else text
        out.append((text.split("\n", 1)[0], 1000 * (time.perf_counter() - t0)))
    return out


def _ngram_next(seq, tables, healer, remaining: bytes) -> int | None:
    """Most frequent next token after the longest context any table has seen (file table first),
    among the tokens that agree with the healed bytes still to spell out."""
    allowed = set(healer.allowed(remaining)) if remaining else None
    longest = max((t.max_order - 1 for t in tables if t is not None), default=0)
    for c in range(min(longest, len(seq)), 0, -1):
        for source in tables:
            if source is None or c >= source.max_order:
                continue
            ids, _ = source.lookup(seq, c)
            for i in ids.tolist():
                if allowed is None or i in allowed:
                    return int(i)
    return None


def bits_per_byte(loaded, records, max_tokens: int) -> float:
    """Cross-entropy of whole files (first `max_tokens` tokens), in bits per UTF-8 byte."""
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    head = doc_start_ids(tok, cfg)
    total_bits, total_bytes = 0.0, 0
    for rec in records:
        ids = tok.encode(rec["after"])[:max_tokens]
        seq = head + ids if head else ids
        cache = model.new_cache(len(seq))
        logits = prefill(model, seq, cache, logits="all")[0]
        start = len(head) if head else 1
        logp = torch.log_softmax(logits[start - 1 : len(seq) - 1].float(), -1)
        target = torch.tensor(seq[start:], device=logp.device)
        total_bits += float(-logp.gather(1, target[:, None]).sum()) / math.log(2)
        total_bytes += len(tok.decode(seq[start:]).encode("utf-8"))
    return total_bits / max(total_bytes, 1)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--extra-model", action="append", default=[], help="more models to compare (repeatable)")
    p.add_argument("--ngram", type=Path, default=None, help=f"corpus n-gram table (default: <model>/{NGRAM_FILE})")
    p.add_argument("--subset", type=int, default=None, help="a fixed subset of N targets spread over the data")
    p.add_argument("--views", default="l2r,fim")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-prefix-tokens", type=int, default=3000)
    p.add_argument("--max-suffix-tokens", type=int, default=512)
    p.add_argument("--bpb-files", type=int, default=50, help="files for bits per byte (0 = skip)")
    p.add_argument("--bpb-tokens", type=int, default=2048)
    args = p.parse_args()
    records = load_records(args.data)
    cases = build_cases(records, args.subset, args.limit)
    print(f"default_model bench: {len(cases)} targets, {machine(args.device)}", flush=True)
    results = {}
    main_model = args.model or str(DEFAULT_MODEL_DIR)
    ngram_path = args.ngram or Path(main_model) / NGRAM_FILE
    corpus = NgramTable.load(ngram_path) if ngram_path.is_file() else None
    bpb = {}
    tok0 = None
    for spec in [main_model, *args.extra_model]:
        loaded = load_model(spec, device=args.device)
        tok0 = tok0 or loaded.tokenizer
        name = Path(spec).name
        for view in args.views.split(","):
            if view == "fim" and loaded.tokenizer.fim is None:
                continue
            results[f"{name} ({view})"] = model_predictions(loaded, cases, view, args)
            print(f"  {name} {view} done", flush=True)
        if args.bpb_files:
            bpb[name] = bits_per_byte(loaded, records[: args.bpb_files], args.bpb_tokens)
        del loaded
    results[f"ngram ({'corpus+file' if corpus else 'file only'})"] = ngram_predictions(tok0, corpus, cases, args)
    rows, payload = [], {}
    ngram_key = [k for k in results if k.startswith("ngram")][0]
    ngram_em = 100 * np.mean([exact_match(t, c[1]["expected"]) for (t, _), c in zip(results[ngram_key], cases,
                                                                                      strict=True)])
    for method, preds in results.items():
        em = 100 * np.mean([exact_match(t, c[1]["expected"]) for (t, _), c in zip(preds, cases, strict=True)])
        es = 100 * np.mean([edit_similarity(t, c[1]["expected"]) for (t, _), c in zip(preds, cases, strict=True)])
        ms = np.mean([m for _, m in preds])
        rows.append([method, len(preds), em, f"{em / ngram_em:.2f}x" if ngram_em else "-", es, ms])
        payload[method] = {"em": em, "es": es, "ms": ms, "preds": [t for t, _ in preds]}
    print(table(["method", "targets", "EM", "EM vs ngram", "ES", "ms/target"], rows))
    if bpb:
        print(table(["model", f"bits/byte ({args.bpb_files} files, first {args.bpb_tokens} tokens)"],
                    [[k, v] for k, v in bpb.items()]))
    write_json(args.json, {"results": payload, "bits_per_byte": bpb, "targets": len(cases),
                           "ids": [c[0]["id"] + f":{c[1]['line']}" for c in cases], "machine": machine(args.device)})


if __name__ == "__main__":
    main()
