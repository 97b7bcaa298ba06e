"""Keystroke-to-suggestion latency: editkv (PIE + static-shape CUDA-graph decode) vs
transformers.

For each model and context length a document of that many tokens is opened (realedits files,
one record's file first, the others after it) and a workload is replayed on it: single-
character insertions at random positions, and realedits records' edits followed by a
completion at a target line (its text deleted, as bench/realedits.py does). Each keystroke
is timed from the edit to a 16-token suggestion through our path: apply the change (windowed
re-tokenization), PIE repair, the fill-in-the-middle view over the whole document, then
greedy decoding (engine.generate.decode, which runs its greedy steps as device-side chains of
graphed forwards); on the GPU every small forward of that path replays a CUDA graph
(engine/static_decode.py). Reported, p50/p95: repair time, time to the first suggestion
token, time to the full 16-token suggestion.

Baselines in the same run, on the same prompts (the FIM prompt of the full current text):
transformers' AutoModelForCausalLM.generate with its default cache, greedy, exactly 16 new
tokens, plus tokenizing the text; and the same with prompt lookup decoding. Also measured:
a full prefill (ours, chunked; and transformers'), so that repair can be read as a fraction
of it; decode ms/token in steady state, eager (our span forward), graphed step by step and
graphed in chains, against the
memory roofline (weight bytes plus the view's KV bytes read per step / measured device copy
bandwidth).

Models: the embedded default model and random-weight checkpoints with the exact shapes of
Qwen2.5-Coder-1.5B, DeepSeek-Coder-1.3B and Qwen2.5-Coder-7B (speed does not depend on the
weights' values; they all use our tokenizer, whose ids fit every vocabulary).

    python bench/latency_gpu.py --device cuda --models qwen-1.5b --contexts 8192 --json out.json
    python bench/latency_gpu.py --device cpu --models default --contexts 512 --events 2   # smoke test
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from common import load_records, machine, parser, sync, table, target_span, write_json
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import Range, to_position
from editkv.edit_cache.views import fill_in_middle
from editkv.engine.generate import StopRules
from editkv.engine.model import Span
from editkv.engine.prompting import doc_start_ids
from model_shapes import SHAPES, bench_models

NEW_TOKENS = 16
INSERTS = ["x", "_", "a", "(", " ", "1", "e", "."]


def _args():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,qwen-1.5b,deepseek-1.3b,qwen-7b",
                   help=f"comma list of: default, {', '.join(SHAPES)}")
    p.add_argument("--contexts", default="2048,8192,16384", help="document lengths in tokens")
    p.add_argument("--events", type=int, default=12, help="keystrokes per (model, context), half of each kind")
    p.add_argument("--baseline-events", type=int, default=3, help="of those, how many transformers also runs")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _weight_bytes(model) -> int:
    """Bytes a decode step reads from weights: every parameter once, the input embedding as one row."""
    seen = {}
    for name, p in model.named_parameters():
        seen[p.data_ptr()] = (name, p)
    total = 0
    tied = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    for name, p in seen.values():
        if name.startswith("embed_tokens") and not tied:
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def _copy_bandwidth(device) -> float:
    """Device copy bandwidth in bytes/s (read + write), from 1 GiB copies."""
    if not str(device).startswith("cuda"):
        src = torch.empty(64 << 20, dtype=torch.uint8)
    else:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * reps / (time.perf_counter() - t)


# ---- the workload ---------------------------------------------------------------------------


def _document_text(records, tokenizer, first: dict, tokens: int) -> str:
    """`first`'s `before` then other files until about `tokens` tokens."""
    parts = [first["before"]]
    count = len(tokenizer.encode(first["before"]))
    for rec in records:
        if count >= tokens:
            break
        if rec is first:
            continue
        piece = "\n\n" + rec["after"]
        parts.append(piece)
        count += len(tokenizer.encode(piece))
    text = "".join(parts)
    ids = tokenizer.encode(text)
    if len(ids) > tokens:  # cut at a line end near the wanted length
        cut = len(tokenizer.decode(ids[:tokens]))
        text = text[: text.rfind("\n", 0, cut) + 1]
    return text


def _events(doc_text: str, record: dict, rng: random.Random, count: int):
    """Keystrokes, alternating kinds: (kind, [(range, new text)], cursor offset, text after).

    Insertions land at random places after the record's file (the document's first part);
    a realedits event replays the record's edits and deletes one target line's text, and is
    followed by an untimed "restore" that puts `before` back, so every event starts alike.
    """
    text = doc_text
    before = record["before"]
    assert text.startswith(before)
    targets = record["targets"]
    for i in range(count):
        if i % 2 == 0:
            at = rng.randrange(len(before), len(text) + 1)
            new = rng.choice(INSERTS)
            pos = to_position(text, at)
            text = text[:at] + new + text[at:]
            yield "insert", [(Range(pos, pos), new)], at + len(new), text
        else:
            target = targets[(i // 2) % len(targets)]
            rest = text[len(before):]
            after = record["after"] + rest
            changes = [(_range(e), e["text"]) for e in record["edits"]]
            cursor, end = target_span(after, target)
            deleted = after[:cursor] + after[end:]
            changes.append((Range(to_position(after, cursor), to_position(after, end)), ""))
            yield "realedit", changes, cursor, deleted
            head = len(deleted) - len(rest)
            yield "restore", [(Range(to_position(deleted, 0), to_position(deleted, head)), before)], None, text


def _range(e):
    from editkv.edit_cache.positions import Position

    s, t = e["range"]["start"], e["range"]["end"]
    return Range(Position(s["line"], s["character"]), Position(t["line"], t["character"]))


# ---- our path and the baselines -----------------------------------------------------------


def _decode(view, steps: int, device) -> list[int]:
    """Greedy tokens after the view's first, one forward each, no stop rules (random weights
    would stop anywhere): engine.generate.decode's step-by-step loop, without its stop checks
    (the comparison row for chained decoding)."""
    model = view.document.model
    token = int(view.first_logits[0].argmax())
    ids = [token]
    used = view.scratch_used
    for step in range(steps):
        logits = model(torch.tensor([[token]], device=device), torch.tensor([view.next_position + step], device=device),
                       write=view.scratch, write_at=used + step,
                       context=[*view.context, Span(view.scratch, 0, used + step)], logits="last")
        token = int(logits[0].argmax())
        ids.append(token)
    return ids


def _ours(doc: Document, changes, cursor: int, device) -> dict:
    """One keystroke through our path; times in ms."""
    sync(device)
    t0 = time.perf_counter()
    for rng, new in changes:
        doc.apply_change(rng, new)
    doc.ensure_ready()
    sync(device)
    t1 = time.perf_counter()
    view = fill_in_middle(doc, cursor, max_new_tokens=NEW_TOKENS)
    int(view.first_logits[0].argmax())
    t2 = time.perf_counter()
    # the served path: engine.generate.decode, whose greedy steps run as device-side chains
    ids = view.decode(rules=StopRules(max_tokens=NEW_TOKENS, max_lines=None, ignore_eos=True)).ids
    t3 = time.perf_counter()
    return {"repair_ms": 1000 * (t1 - t0), "ttft_ms": 1000 * (t2 - t0), "total_ms": 1000 * (t3 - t0),
            "decode_ms": 1000 * (t3 - t2), "prompt": view.prompt_ids, "ids": ids, "cursor": cursor}


def _warm(doc: Document, device) -> None:
    """Capture the graphs a keystroke on this document replays (every width, with the last row's
    logits (views) and without logits (repairs), one bucket)."""
    model = doc.model
    if model.static is None:
        return
    used = doc.h + len(doc.ids)
    # the widest scratch first: growing the buffer later would leave the graphs captured here
    # on the old one
    doc.scratch_window(model.static.max_width + 1)
    width = 1
    while width <= model.static.max_width:
        scratch = doc.scratch_window(width + 1)
        for rows in ("last", "none"):
            model(torch.zeros(1, width, dtype=torch.long, device=device),
                  torch.arange(used, used + width, device=device),
                  write=scratch, write_at=0, context=[Span(doc.cache, 0, used)], logits=rows)
        width *= 2
    if model.static.chain_steps:  # the decode chains' own small ops (their forwards replay width 1)
        model.static.chain(0, used, doc.scratch_window(2), 0, [Span(doc.cache, 0, used)], 1)
    sync(device)


def _transformers(hf, tokenizer, doc_text: str, prompt: list[int], device, lookup: bool) -> tuple[float, list[int]]:
    """Tokenize the full text, then generate exactly 16 greedy tokens with transformers; ms, ids."""
    sync(device)
    t0 = time.perf_counter()
    tokenizer.encode(doc_text)  # what a recompute-from-text server pays first
    ids = torch.tensor([prompt], device=device)
    extra = {"prompt_lookup_num_tokens": 10} if lookup else {}
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **extra)
    sync(device)
    return 1000 * (time.perf_counter() - t0), out[0, len(prompt):].tolist()


def _ms_per_token(view, steps: int, device, graphs: bool, chained: bool = False) -> float:
    """Steady-state decode ms/token on a view: the eager span forward, graphed steps one by
    one, or engine.generate.decode's device-side chains of graphed steps."""
    model = view.document.model
    static = model.use_graphs(model.static if graphs else None)

    def run(n):
        if not chained:
            _decode(view, n, device)
            return n
        return view.decode(rules=StopRules(max_tokens=n + 1, max_lines=None, ignore_eos=True)).stats.forwards

    try:
        run(steps)
        sync(device)
        t = time.perf_counter()
        forwards = run(steps)
        sync(device)
        return 1000 * (time.perf_counter() - t) / max(forwards, 1)
    finally:
        model.use_graphs(static)


def _prefill_ms(doc: Document, hf, device, reps: int = 3) -> tuple[float, float]:
    """(ours, transformers') median full-prefill time of the document's current text."""
    ours, theirs = [], []
    ids = torch.tensor([doc.head + doc.ids], device=device)
    for _ in range(reps):
        doc.drop_kv()
        sync(device)
        t = time.perf_counter()
        doc.ensure_ready()
        sync(device)
        ours.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.inference_mode():
            hf(ids, logits_to_keep=1)
        sync(device)
        theirs.append(1000 * (time.perf_counter() - t))
    return statistics.median(ours), statistics.median(theirs)


def _pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(args) -> dict:
    device = args.device
    records = load_records(args.data)
    rng = random.Random(args.seed)
    bandwidth = _copy_bandwidth(device)
    results = []
    for name, model, hf, tokenizer in bench_models(args.models.split(","), args.model, device, args.dtype):
        config = model.config
        weight_bytes = _weight_bytes(model.model)
        head = doc_start_ids(tokenizer, config)
        for context in (int(c) for c in args.contexts.split(",")):
            candidates = [r for r in records[: args.limit or len(records)]
                          if r["targets"] and r["edits"] and len(r["before"]) < 3 * context]
            record = candidates[rng.randrange(len(candidates))]
            text = _document_text(records, tokenizer, record, context)
            doc = Document(model, tokenizer, text, head=head)
            doc.ensure_ready()
            tokens = len(doc.head) + len(doc.ids)
            prefill_ours, prefill_hf = _prefill_ms(doc, hf, device)
            # capture the graphs a keystroke replays before anything is timed
            _warm(doc, device)
            _ours(doc, [(Range(to_position(doc.text, len(record["before"])),
                               to_position(doc.text, len(record["before"]))), "\n")], len(record["before"]) + 1, device)
            rows = []
            baseline, lookup = [], []
            for kind, changes, cursor, new_text in _events(doc.text, record, rng, args.events):
                if cursor is None:  # restore step: not a keystroke we time
                    for r, new in changes:
                        doc.apply_change(r, new)
                    doc.ensure_ready()
                    continue
                row = _ours(doc, changes, cursor, device)
                assert doc.text == new_text
                row["kind"] = kind
                if len(baseline) < args.baseline_events:
                    ms, ids = _transformers(hf, tokenizer, doc.text, row["prompt"], device, lookup=False)
                    baseline.append(ms)
                    row["same_as_transformers"] = ids == row["ids"]
                    lookup.append(_transformers(hf, tokenizer, doc.text, row["prompt"], device, lookup=True)[0])
                rows.append(row)
            # a fresh view (restore steps may have repaired the document since the last keystroke)
            view = fill_in_middle(doc, min(rows[-1]["cursor"], len(doc.text)), max_new_tokens=NEW_TOKENS)
            eager = _ms_per_token(view, 15, device, graphs=False)
            graphed = _ms_per_token(view, 15, device, graphs=True)
            chained = graphed if model.static is None else _ms_per_token(view, 15, device, graphs=True, chained=True)
            kv_slot_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * model.dtype.itemsize
            # the attention kernel reads the view's slots only (blocks nobody sees are skipped)
            step_bytes = weight_bytes + len(view.prompt_ids) * kv_slot_bytes
            roofline_ms = 1000 * step_bytes / bandwidth
            result = {
                "model": name, "context": tokens, "events": len(rows),
                "repair_p50": _pct([r["repair_ms"] for r in rows], 50),
                "repair_p95": _pct([r["repair_ms"] for r in rows], 95),
                "ttft_p50": _pct([r["ttft_ms"] for r in rows], 50),
                "ttft_p95": _pct([r["ttft_ms"] for r in rows], 95),
                "total_p50": _pct([r["total_ms"] for r in rows], 50),
                "total_p95": _pct([r["total_ms"] for r in rows], 95),
                "transformers_p50": _pct(baseline, 50), "transformers_lookup_p50": _pct(lookup, 50),
                "prefill_ours_ms": prefill_ours, "prefill_transformers_ms": prefill_hf,
                "decode_eager_ms": eager, "decode_graph_ms": graphed, "decode_chained_ms": chained,
                "roofline_ms": roofline_ms, "roofline_fraction": roofline_ms / min(graphed, chained),
                "suggestion_tokens_min": min(len(r["ids"]) for r in rows),
                "same_16_tokens_as_transformers": sum(r.get("same_as_transformers", False) for r in rows),
                "captures": model.static.captures if model.static is not None else 0,
                "replays": model.static.replays if model.static is not None else 0,
            }
            result["speedup"] = result["transformers_p50"] / result["total_p50"]
            result["repair_vs_prefill"] = result["repair_p50"] / min(prefill_ours, prefill_hf)
            results.append(result)
            print(f"  {name} @ {tokens}: total p50 {result['total_p50']:.1f} ms, transformers "
                  f"{result['transformers_p50']:.0f} ms, decode {graphed:.2f} / chained {chained:.2f} ms/token "
                  f"({100 * result['roofline_fraction']:.0f}% of roofline)", flush=True)
            del doc, rows, view
    return {"results": results, "bandwidth_GBps": bandwidth / 1e9, "machine": machine(device)}


def main() -> None:
    args = _args()
    out = run(args)
    rows = [[r["model"], r["context"], r["repair_p50"], r["repair_p95"], r["ttft_p50"], r["ttft_p95"],
             r["total_p50"], r["total_p95"], r["transformers_p50"], r["transformers_lookup_p50"],
             f"{r['speedup']:.1f}x"] for r in out["results"]]
    print(table(["model", "tokens", "repair p50", "p95", "first token p50", "p95", "16 tokens p50", "p95",
                 "transformers p50", "+prompt lookup p50", "speedup"], rows,
                title=f"Keystroke to suggestion, ms ({out['machine']})"))
    rows = [[r["model"], r["context"], r["prefill_ours_ms"], r["prefill_transformers_ms"],
             f"{100 * r['repair_vs_prefill']:.1f}%", r["decode_eager_ms"], r["decode_graph_ms"],
             r["decode_chained_ms"], r["roofline_ms"], f"{100 * r['roofline_fraction']:.0f}%"] for r in out["results"]]
    print(table(["model", "tokens", "prefill ours", "prefill transformers", "repair / prefill",
                 "decode eager ms/tok", "graphed steps ms/tok", "graphed chains ms/tok", "roofline ms/tok",
                 "of roofline"], rows,
                title=f"Prefill, repair and decode (copy bandwidth {out['bandwidth_GBps']:.0f} GB/s)"))
    write_json(args.json, {k: v for k, v in out.items()})


if __name__ == "__main__":
    main()
