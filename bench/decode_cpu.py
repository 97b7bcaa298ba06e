"""Per-token decode latency on the CPU per weight format (engine/quant.py, issue 23).

For each --formats entry the model is loaded with that `cpu_weights`, a prompt of --prompt
tokens (lsp_server/worker.py, or with --data the first record's file) is prefilled in one
forward (timed), then
--steps greedy one-token forwards are timed, each attending to everything before it (what a
decode step of a request does). Reported per format: load seconds, process RSS after the
load, bytes of the projection weights, prefill ms, decode ms per token (median, p90), and how
many of the greedy tokens equal the first format's.

    python bench/decode_cpu.py --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf \
        --formats fp32,int8,int4 --threads 2
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch
from common import load_records, machine, parser, write_json
from editkv.engine.loading import load_model
from editkv.engine.model import Span
from editkv.engine.quant import QuantLinear, quantize_model

SAMPLE = Path(__file__).resolve().parents[1] / "lsp_server" / "worker.py"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _weight_bytes(model) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.nbytes()
    for fused in model.fused():
        for t in (fused.qkv_weight, fused.gate_up_weight):
            total += 0 if t is None else t.numel() * t.element_size()
        for q in (fused.qkv_quant, fused.gate_up_quant):
            total += 0 if q is None else q.nbytes()
    for block in model.layers:
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            if isinstance(lin, torch.nn.Linear):
                total += lin.weight.numel() * lin.weight.element_size()
    if isinstance(model.lm_head, torch.nn.Linear):
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


@torch.inference_mode()
def measure(spec: str, fmt: str, prompt: list[int], steps: int) -> dict:
    started = time.perf_counter()
    if fmt == "bf16":  # the bf16 dtype, not quantized
        loaded = load_model(spec, cpu_weights="fp32", dtype="bfloat16")
    elif fmt.startswith("int4g"):  # int4 with groups of another size
        loaded = load_model(spec, cpu_weights="fp32")
        quantize_model(loaded.runner.model, "int4", group_size=int(fmt.removeprefix("int4g")))
    else:
        loaded = load_model(spec, cpu_weights=fmt)
    load_s = time.perf_counter() - started
    model = loaded.runner
    n = len(prompt)
    cache = model.new_cache(n + steps + 1)
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    logits = model(ids, torch.arange(n), write=cache, write_at=0, logits="last")
    prefill_ms = (time.perf_counter() - start) * 1e3
    token = int(logits[0].argmax())
    tokens, times = [token], []
    for step in range(steps):
        pos = n + step
        start = time.perf_counter()
        logits = model(torch.tensor([[token]]), torch.tensor([pos]), write=cache, write_at=pos,
                       context=[Span(cache, 0, pos)], logits="last")
        token = int(logits[0].argmax())
        times.append((time.perf_counter() - start) * 1e3)
        tokens.append(token)
    row = {"format": fmt, "load_s": load_s, "rss_mb": _rss_mb(),
           "weight_mb": _weight_bytes(model.model) / 2**20,
           "prefill_ms": prefill_ms, "decode_ms_p50": statistics.median(times),
           "decode_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))], "tokens": tokens,
           "text": loaded.tokenizer.decode(tokens)}
    del loaded, model, cache
    gc.collect()
    return row


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(data=None)  # the prompt: lsp_server/worker.py unless --data names realedits
    p.add_argument("--formats", default="fp32,int8,int4")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("decode_cpu: the weight formats are for the CPU (--device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_model(args.model, cpu_weights="fp32").tokenizer
    gc.collect()
    text = load_records(args.data, 1)[0]["before"] if args.data else SAMPLE.read_text(encoding="utf-8")
    prompt = tok.encode(text)[: args.prompt]
    rows = []
    for fmt in args.formats.split(","):
        rows.append(measure(args.model, fmt, prompt, args.steps))
        r = rows[-1]
        same = sum(a == b for a, b in zip(r["tokens"], rows[0]["tokens"], strict=True))
        print(f"{r['format']:7} load {r['load_s']:5.1f} s  rss {r['rss_mb']:6.0f} MB  "
              f"weights {r['weight_mb']:6.0f} MB  "
              f"prefill({len(prompt)}) {r['prefill_ms']:7.0f} ms  decode p50 {r['decode_ms_p50']:6.1f} ms  "
              f"p90 {r['decode_ms_p90']:6.1f} ms  same greedy tokens as {rows[0]['format']}: "
              f"{same}/{len(r['tokens'])}  {r['text'][:60]!r}", flush=True)
    write_json(args.json, {"model": args.model, "machine": machine("cpu"), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
