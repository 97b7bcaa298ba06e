"""Full prefill (opening a file): editkv's vs transformers' on the same tokens, and the compute floor.

For each model and document size, a document of that many tokens (realedits files one after
the other, or Python sources of the installed torch when `--data` is missing; the document
start token first) is encoded into a fresh cache the way a file open, an eviction or a full
refresh encodes it: engine.generate.prefill with the device's default chunking, under the
model's attention window with the document start as its sink. Baseline, same run, same ids,
same dtype and device (and thread count on the CPU): transformers' AutoModelForCausalLM
forward (its default attention, SDPA) with the logits of the last token only. Reps alternate
ours and theirs; medians are reported, and the best run of each (on a shared CPU the spread is
wide). "file open" is one run of the whole served path, edit_cache's Document from no cache
to ready (its head encoded on its own first, which on a GPU captures a CUDA graph).

Compute floor: the work of an exact prefill, 2 x the weights each token multiplies (the head
for one token) + causal attention (4 x T(T+1)/2 x heads x head_dim per layer), at the device's
measured dense GEMM rate (bf16 8192^3 on CUDA, fp32 2048^3 on the CPU). Documents longer than
a model's context are windowed on our side (no query attends further back than the context),
so there our attention does less than the floor counts; transformers attends to everything.

"logit check": max |our last logits - transformers'| / max |transformers'| after an untimed
prefill with logits, where the document fits the context (elsewhere the two compute different
things by design).

Models: the embedded default model; random-weight checkpoints with the exact shapes of
Qwen2.5-Coder-1.5B, DeepSeek-Coder-1.3B and Qwen2.5-Coder-7B (bench/latency_gpu.py's); and
`--model PATH` (a folder with real weights, or a .gguf), which replaces the list unless
`--models` names it too as "model".

    python bench/prefill.py --device cuda --json prefill.json
    python bench/prefill.py --device cpu --models default --sizes 15000 --threads 2
    python bench/prefill.py --device cuda --sweep --json sweep.json   # segment-attention configs
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import torch
from common import load_records, machine, parser, sync, table, write_json
from editkv.edit_cache.document import Document
from editkv.engine.generate import prefill
from editkv.engine.prompting import doc_start_ids
from model_shapes import SHAPES, bench_models

SIZES = "2048,8192,16384,32768"


def _args():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None,
                   help=f"comma list of: default, {', '.join(SHAPES)}, model (--model); default: all shapes, "
                        "or only --model when given")
    p.add_argument("--sizes", default=SIZES, help="document lengths in tokens (head included)")
    p.add_argument("--reps", type=int, default=3, help="timed runs of each side (after one warm-up)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (both sides)")
    p.add_argument("--sweep", action="store_true", help="time segment-attention kernel configs instead (CUDA)")
    p.add_argument("--profile", type=Path, default=None,
                   help="write a torch.profiler table of one of our prefills per row to this file")
    return p.parse_args()


def _corpus(args) -> str:
    """Code to cut documents from: realedits files, or the installed torch's Python sources."""
    if args.data.is_file():
        return "\n\n".join(rec["after"] for rec in load_records(args.data, args.limit))
    files = sorted((Path(torch.__file__).parent / "nn").rglob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files[: args.limit or len(files)])


def _text(corpus_ids, tokenizer, tokens: int) -> str:
    """About `tokens` tokens of the corpus, cut at a line end."""
    if len(corpus_ids) < tokens:
        raise SystemExit(f"the corpus holds {len(corpus_ids)} tokens, fewer than {tokens}; pass more --data")
    text = tokenizer.decode(corpus_ids[:tokens])
    return text[: text.rfind("\n") + 1]


# ---- work and the floor -------------------------------------------------------------------


def _flops(config, tokens: int) -> float:
    """Multiply-adds x 2 of an exact prefill of `tokens` tokens, logits of the last one only."""
    c = config
    per_layer = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v, o
    per_layer += 3 * c.hidden_size * c.intermediate_size  # gate, up, down
    linear = 2 * tokens * per_layer * c.num_layers + 2 * c.hidden_size * c.vocab_size
    attention = 4 * c.head_dim * c.num_heads * tokens * (tokens + 1) / 2 * c.num_layers
    return linear + attention


def _gemm_rate(device, dtype) -> float:
    """Dense GEMM FLOP/s: the best of a few square matmuls (bf16 8192^3 on CUDA, 2048^3 on the CPU)."""
    n = 8192 if str(device).startswith("cuda") else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---- the two sides ------------------------------------------------------------------------


def _ours_ms(model, ids: list[int], head: int, device) -> float:
    """A fresh cache, then the whole prefill under the model's window (the head as its sink)."""
    sync(device)
    t = time.perf_counter()
    cache = model.new_cache(len(ids))
    prefill(model, ids, cache, logits="none", window=model.config.max_position_embeddings, sink=(cache, head))
    sync(device)
    return 1000 * (time.perf_counter() - t)


def _file_open_ms(doc: Document, device) -> float:
    doc.drop_kv()
    sync(device)
    t = time.perf_counter()
    doc.ensure_ready()
    sync(device)
    return 1000 * (time.perf_counter() - t)


def _theirs_ms(hf, ids: torch.Tensor, device) -> float:
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        hf(ids, logits_to_keep=1)
    sync(device)
    return 1000 * (time.perf_counter() - t)


def _logit_check(doc: Document, hf, ids: torch.Tensor) -> float | None:
    """max |ours - theirs| / max |theirs| of the last token's logits (None when windowed)."""
    model = doc.model
    if ids.shape[1] > model.config.max_position_embeddings:
        return None
    cache = model.new_cache(ids.shape[1])
    ours = prefill(model, ids[0].tolist(), cache, window=model.config.max_position_embeddings,
                   sink=(cache, len(doc.head)))
    with torch.inference_mode():
        theirs = hf(ids, logits_to_keep=1).logits[:, -1].float()
    del cache
    return float((ours - theirs).abs().max() / theirs.abs().max())


def run(args) -> dict:
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.models or ("model" if args.model else f"default,{','.join(SHAPES)}")).split(",")
    if "model" in names and not args.model:
        raise SystemExit("--models names 'model' but no --model PATH was given")
    sizes = [int(s) for s in args.sizes.split(",")]
    results, text, encoded = [], _corpus(args), {}
    rate = None
    for name, model, hf, tokenizer in bench_models(names, args.model, device, args.dtype):
        if rate is None:
            rate = _gemm_rate(device, model.dtype)
        if id(tokenizer) not in encoded:
            encoded[id(tokenizer)] = tokenizer.encode(text)
        corpus = encoded[id(tokenizer)]
        head = doc_start_ids(tokenizer, model.config)
        for size in sizes:
            doc = Document(model, tokenizer, _text(corpus, tokenizer, size - len(head)), head=head)
            ids = torch.tensor([doc.head + doc.ids], device=device)
            tokens = ids.shape[1]
            id_list = doc.head + doc.ids
            try:
                _ours_ms(model, id_list, len(doc.head), device), _theirs_ms(hf, ids, device)  # warm-up
                ours, theirs = [], []
                for _ in range(args.reps):
                    ours.append(_ours_ms(model, id_list, len(doc.head), device))
                    theirs.append(_theirs_ms(hf, ids, device))
                _file_open_ms(doc, device)  # warm-up (graph captures of a new buffer happen in each)
                file_open = _file_open_ms(doc, device)
                check = _logit_check(doc, hf, ids)
            except torch.OutOfMemoryError as err:
                print(f"  {name} @ {tokens}: out of memory ({err}); skipped", flush=True)
                doc.drop_kv()
                torch.cuda.empty_cache()
                continue
            if args.profile is not None:
                _profile(model, id_list, len(doc.head), device, args.profile, f"{name} @ {tokens}")
            floor = 1000 * _flops(model.config, tokens) / rate
            row = {"model": name, "tokens": tokens, "context": model.config.max_position_embeddings,
                   "ours_ms": statistics.median(ours), "transformers_ms": statistics.median(theirs),
                   "ours_all_ms": ours, "transformers_all_ms": theirs, "floor_ms": floor, "logit_check": check,
                   "file_open_ms": file_open}
            row["ratio"] = row["ours_ms"] / row["transformers_ms"]
            results.append(row)
            print(f"  {name} @ {tokens}: ours {row['ours_ms']:.1f} ms, transformers {row['transformers_ms']:.1f} ms "
                  f"({row['ratio']:.2f}x), floor {floor:.1f} ms ({100 * floor / row['ours_ms']:.0f}% of it)",
                  flush=True)
            doc.drop_kv()
            del doc
    return {"results": results, "gemm_tflops": (rate or 0) / 1e12, "machine": machine(device),
            "threads": torch.get_num_threads()}


def _profile(model, ids: list[int], head: int, device, path: Path, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        _ours_ms(model, ids, head, device)
    key = "cuda_time_total" if str(device).startswith("cuda") else "self_cpu_time_total"
    with path.open("a") as f:
        f.write(f"\n## {title}\n{prof.key_averages().table(sort_by=key, row_limit=25)}\n")


# ---- kernel configs -----------------------------------------------------------------------


def sweep(args) -> dict:
    """Segment attention of a T-token chunk after T cached keys, per kernel config, and SDPA's
    causal attention of T tokens (a first chunk), each as TFLOP/s of the work it does."""
    import torch.nn.functional as F
    from editkv.kernels.segment_attention import Segment, segment_attention_triton

    device, dtype = args.device, torch.bfloat16
    shapes = {"qwen-1.5b": (12, 2, 128), "qwen-7b": (28, 4, 128), "deepseek-1.3b": (16, 16, 128),
              "default": (8, 4, 64)}
    configs = [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
               if m % n == 0]
    rows = []
    for name, (heads, kv_heads, head_dim) in shapes.items():
        for tokens in (4096, 8192):
            context = tokens
            q = torch.randn(1, heads, 1, tokens, head_dim, device=device, dtype=dtype)
            keys, values = (torch.randn(1, kv_heads, context + tokens, head_dim, device=device, dtype=dtype)
                            for _ in range(2))
            segments = [Segment(0, context), Segment(context, context + tokens, causal=True)]
            flops = 4 * head_dim * heads * tokens * (context + (tokens + 1) / 2)
            for config in configs:
                try:
                    ms = _time_ms(partial(segment_attention_triton, q, keys, values, segments, head_dim**-0.5,
                                          config=config), device)
                except Exception as err:  # a config that does not fit the shared memory
                    print(f"  {name} T={tokens} {config}: {type(err).__name__}", flush=True)
                    continue
                rows.append({"shape": name, "tokens": tokens, "config": list(config), "ms": ms,
                             "tflops": flops / ms / 1e9})
            # SDPA (flash) over T queries and T keys, causal: the first chunk's attention
            qs = q[:, :, 0]
            ks, vs = keys[:, :, :tokens], values[:, :, :tokens]
            ms = _time_ms(partial(F.scaled_dot_product_attention, qs, ks, vs, is_causal=True,
                                  enable_gqa=heads != kv_heads), device)
            sdpa_flops = 4 * head_dim * heads * tokens * (tokens + 1) / 2
            rows.append({"shape": name, "tokens": tokens, "config": "sdpa causal (T keys)", "ms": ms,
                         "tflops": sdpa_flops / ms / 1e9})
            tried = [r for r in rows if r["shape"] == name and r["tokens"] == tokens and isinstance(r["config"], list)]
            if tried:
                best = max(tried, key=lambda r: r["tflops"])
                print(f"  {name} T={tokens}: best {best['config']} {best['tflops']:.0f} TFLOP/s, "
                      f"SDPA causal {sdpa_flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    return {"sweep": rows, "machine": machine(device)}


def _time_ms(call, device, reps: int = 10) -> float:
    call()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        call()
    sync(device)
    return 1000 * (time.perf_counter() - t) / reps


def main() -> None:
    args = _args()
    if args.sweep:
        out = sweep(args)
        rows = [[r["shape"], r["tokens"], r["config"], r["ms"], r["tflops"]] for r in out["sweep"]]
        print(table(["shape", "tokens", "config (BLOCK_M, BLOCK_N, warps, stages)", "ms", "TFLOP/s"], rows,
                    title=f"Segment attention configs ({out['machine']})"))
        write_json(args.json, out)
        return
    out = run(args)
    rows = []
    for r in out["results"]:
        check = "windowed" if r["logit_check"] is None else f"{r['logit_check']:.1e}"
        best = min(r["ours_all_ms"]) / min(r["transformers_all_ms"])
        rows.append([r["model"], r["tokens"], r["ours_ms"], r["transformers_ms"], f"{r['ratio']:.2f}x", f"{best:.2f}x",
                     r["floor_ms"], f"{100 * r['floor_ms'] / r['ours_ms']:.0f}%",
                     f"{100 * r['floor_ms'] / r['transformers_ms']:.0f}%", r["file_open_ms"], check])
    print(table(["model", "tokens", "ours ms", "transformers ms", "ours / transformers", "best / best", "floor ms",
                 "ours of floor", "transformers of floor", "file open ms", "logit check"], rows,
                title=f"Full prefill ({out['machine']}; dense GEMM {out['gemm_tflops']:.1f} TFLOP/s)"))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
