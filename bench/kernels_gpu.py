"""What each Triton kernel gains over its torch definition, at the shapes a decode step uses.

Issue 9 asks for every kernel to earn its place: measured against the torch code it replaces,
on the GPU, at real shapes. For each kernel and shape this times the torch reference (the
`*_ref` function the tests compare against, which is also what the eager path computes) and
the kernel, both replayed from a CUDA graph (the served path replays graphs, so launch costs
from Python would only flatter the kernels), over several copies of the inputs so that data a
real step would find cold is not served from L2.

Shapes: Qwen2.5-Coder-1.5B's (hidden 1536, MLP 8960, 12 query / 2 KV heads of 128, vocab
151,936, 28 layers) by default; `--shape default` for the embedded model. One token (a decode
step) and 16 (a speculative verification); attention over 2k/9k/17k cached keys with the FIM
view's shifted suffix; the PIE repair's move + re-rotation of an 8k-slot suffix; the logit
summary over one and 16 rows; the device-side speculation's prompt lookup and verdict.

    python bench/kernels_gpu.py --device cuda --json kernels.json
"""

from __future__ import annotations

from functools import partial

import torch
from common import machine, parser, table, write_json
from editkv.engine.calibrate import entropy
from editkv.engine.static_decode import SOURCE
from editkv.kernels.fused import (
    add_rms_norm_ref,
    add_rms_norm_triton,
    rope_write_ref,
    rope_write_triton,
    silu_mul_ref,
    silu_mul_triton,
)
from editkv.kernels.logit_summary import logit_summary_ref, logit_summary_triton
from editkv.kernels.lookup_draft import MAX_MATCH, accept_ref, accept_triton, draft_ref, draft_triton
from editkv.kernels.rerotate import move_rerotate_ref, move_rerotate_triton
from editkv.kernels.span_attention import span_attention_ref, span_attention_triton

SHAPES = {  # hidden, intermediate, heads, kv heads, head dim, vocab, layers
    "qwen-1.5b": (1536, 8960, 12, 2, 128, 151936, 28),
    "default": (512, 1152, 8, 4, 64, 15360, 6),
}
COPIES = 8  # distinct inputs per timed graph: a step's layers each read their own data


def _graph_us(calls, device, replays: int = 20) -> float:
    """Mean microseconds per call of `calls` (closures), captured in one graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles, allocations
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * len(calls))


def _cases(shape: str, device, dtype):
    hidden, inter, heads, kv_heads, dim, vocab, layers = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dt=dtype):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dt)

    for tokens in (1, 16):
        xs = [randn(1, tokens, hidden) for _ in range(COPIES)]
        ds = [randn(1, tokens, hidden) for _ in range(COPIES)]
        w = randn(hidden)
        yield ("add + RMSNorm", f"{tokens} x {hidden}",
               [partial(add_rms_norm_ref, xs[i], ds[i], w, 1e-6) for i in range(COPIES)],
               [partial(add_rms_norm_triton, xs[i], ds[i], w, 1e-6) for i in range(COPIES)])
        gus = [randn(1, tokens, 2 * inter) for _ in range(COPIES)]
        yield ("silu * up", f"{tokens} x 2*{inter}",
               [partial(silu_mul_ref, gus[i]) for i in range(COPIES)],
               [partial(silu_mul_triton, gus[i]) for i in range(COPIES)])
        qkvs = [randn(tokens, (heads + 2 * kv_heads) * dim) for _ in range(COPIES)]
        angles = randn(2, tokens, dim // 2, dt=torch.float32)
        cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
        caches = [(randn(kv_heads, 9216, dim), randn(kv_heads, 9216, dim)) for _ in range(COPIES)]
        slots = torch.arange(9000, 9000 + tokens, device=device)
        yield ("RoPE + KV write", f"{tokens} tokens",
               [partial(rope_write_ref, qkvs[i], cos, sin, dim, heads, *caches[i], slots) for i in range(COPIES)],
               [partial(rope_write_triton, qkvs[i], cos, sin, dim, heads, *caches[i], slots)
                for i in range(COPIES)])
    capacity = 17408
    keys = [(randn(kv_heads, capacity, dim), randn(kv_heads, capacity, dim)) for _ in range(COPIES)]
    for bucket, tokens in ((2048, 1), (9216, 1), (17408, 1), (9216, 16)):
        q = randn(kv_heads, heads // kv_heads, 2, tokens, dim)
        # the FIM view's shape: prefix, a shifted suffix, then the scratch slots
        meta = torch.tensor([bucket // 2, bucket // 2 + 100, bucket - 200, 1, bucket - 100], device=device)
        slots = torch.arange(bucket - 90, bucket - 90 + tokens, device=device)
        yield ("span attention", f"{tokens} token(s) x {bucket} keys",
               [partial(span_attention_ref, q, *keys[i], meta, slots, dim ** -0.5, bucket) for i in range(COPIES)],
               [partial(span_attention_triton, q, *keys[i], meta, slots, dim ** -0.5, bucket)
                for i in range(COPIES)])
    # a PIE repair: an 8k-slot suffix moves one slot on, keys re-rotated by one position
    bufs = [(randn(layers, 1, kv_heads, 9216, dim), randn(layers, 1, kv_heads, 9216, dim)) for _ in range(2)]
    inv = 1.0 / (1e6 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
    rc, rs = torch.cos(inv), torch.sin(inv)
    yield ("move + re-rotate", f"{layers} layers x 8k slots",
           [partial(move_rerotate_ref, *bufs[i], 1000, 9000, 1, rc, rs, dim) for i in range(2)],
           [partial(move_rerotate_triton, *bufs[i], 1000, 9000, 1, rc, rs, dim) for i in range(2)])
    for rows in (1, 16):
        logits = [randn(rows, vocab, dt=torch.float32) for _ in range(COPIES)]
        yield ("logit summary (top-8, lse, entropy)", f"{rows} x {vocab}",
               [partial(logit_summary_ref, logits[i], 8) for i in range(COPIES)],
               [partial(logit_summary_triton, logits[i], 8) for i in range(COPIES)])
        # the reference orders ties (a second top-k and a sort); the ops a step ran before
        # the kernel, without that guarantee, are the fairer baseline
        yield ("logit summary vs plain torch ops", f"{rows} x {vocab}",
               [partial(_plain_summary, logits[i], 8) for i in range(COPIES)],
               [partial(logit_summary_triton, logits[i], 8) for i in range(COPIES)])


def _lookup_cases(device):
    """Device-side speculation (StaticForward.lookup_chain): prompt lookup over the 16k-slot
    search buffer with 3k tokens in use, and the verdict of an 8-token verification."""
    g = torch.Generator(device=device).manual_seed(1)
    size, used, width = SOURCE + 1, 3000, 8

    def buffer():
        padded = torch.full((MAX_MATCH + size,), -1, dtype=torch.long, device=device)
        padded[:MAX_MATCH] = -3
        padded[MAX_MATCH : MAX_MATCH + used] = torch.randint(0, 40, (used,), generator=g, device=device)
        return padded

    def state():
        return torch.tensor([5, 100, 40, 0, used, 0], dtype=torch.long, device=device)

    staged = [(buffer(), state(), *torch.zeros((3, width), dtype=torch.long, device=device)) for _ in range(COPIES)]
    yield ("lookup draft (match, pick, stage)", f"{used} of {SOURCE} slots, {width} rows",
           [partial(draft_ref, *staged[i]) for i in range(COPIES)],
           [partial(draft_triton, *staged[i]) for i in range(COPIES)])
    chosen = torch.randint(0, 40, (width,), generator=g, device=device)
    ids = torch.cat((chosen[:1], chosen[:3], chosen[3:-1] + 1))  # three drafts agree
    values = torch.randn(width, generator=g, device=device)
    lse = values + 1.0
    judged = [(chosen, values, lse, ids, buffer(), state(),
               torch.zeros((2, 16 * 16 + 17), dtype=torch.float64, device=device),
               torch.zeros(16, dtype=torch.long, device=device)) for _ in range(COPIES)]
    yield ("lookup verdict (accept, keep, advance)", f"{width} rows",
           [partial(accept_ref, *judged[i]) for i in range(COPIES)],
           [partial(accept_triton, *judged[i]) for i in range(COPIES)])


def _plain_summary(logits: torch.Tensor, k: int):
    """argmax, log-softmax, entropy and top-k as separate torch ops (no tie order)."""
    logp = torch.log_softmax(logits, -1)
    return logits.argmax(-1), entropy(logits), torch.topk(logp, k, dim=-1)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen-1.5b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("bench/kernels_gpu.py times CUDA graphs: run it with --device cuda on a GPU")
    dtype = getattr(torch, args.dtype)
    results = []
    cases = list(_cases(args.shape, args.device, dtype)) + list(_lookup_cases(args.device))
    for name, shape, reference, ours in cases:
        ref_us, our_us = _graph_us(reference, args.device), _graph_us(ours, args.device)
        results.append({"kernel": name, "shape": shape, "torch_us": ref_us, "ours_us": our_us,
                        "gain": ref_us / our_us})
        print(f"  {name} {shape}: torch {ref_us:.1f} us, ours {our_us:.1f} us", flush=True)
    rows = [[r["kernel"], r["shape"], r["torch_us"], r["ours_us"], f"{r['gain']:.1f}x"] for r in results]
    print(table(["kernel", "shape", "torch reference us", "Triton us", "gain"], rows,
                title=f"Kernels vs their torch definitions, {args.shape} shapes, {args.dtype}, "
                      f"CUDA-graph replay ({machine(args.device)})"))
    write_json(args.json, {"results": results, "shape": args.shape, "dtype": args.dtype,
                           "machine": machine(args.device)})


if __name__ == "__main__":
    main()
