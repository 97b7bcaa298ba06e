"""Weight-only quantized matmuls of torch on the CPU against fp32 F.linear (issue 23).

Shapes of Qwen2.5-Coder-0.5B: the MLP's down projection (896 x 4864), its fused gate/up (9728 x 896)
and the tied output head (151936 x 896), at a few row counts (1: a decode step; 8: a short
repair; 128: a prefill chunk), per thread count. Reports the median ms per call of:
  fp32   F.linear over the fp32 weight
  int8   torch.ops.aten._weight_int8pack_mm: int8 weight, one fp32 scale per output channel
  int8 dq  the int8 weight dequantized to fp32 (one pass), then F.linear
  bf16     F.linear over a bf16 copy, bf16 activations
  int8 bf  int8 with bf16 activations and scales
  int4   torch.ops.aten._weight_int4pack_mm_for_cpu: 4-bit weight, scale and offset per group of
         --group inputs (the weight packed by _convert_weight_to_int4pack_for_cpu)

    python bench/quant_matmul.py --threads 1,2 --rows 1,8,128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"down 896x4864": (896, 4864), "gate_up 9728x896": (9728, 896), "head 151936x896": (151936, 896)}


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,8,128")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    from editkv.engine.quant import QuantLinear

    torch.manual_seed(0)
    print(f"torch {torch.__version__}; median ms per call; GB read = weight bytes / 1e9")
    print(f"{'shape':18} {'thr':>3} {'rows':>4} {'fp32':>8} {'int8':>8} {'int4':>8} {'int8 dq':>8} "
          f"{'bf16':>8} {'int8 bf':>8}  {'GB fp32/int8/int4':>20}")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        q8 = QuantLinear(weight, None, "int8")
        q4 = QuantLinear(weight, None, "int4", group_size=args.group)
        w16 = weight.bfloat16()
        q8b = QuantLinear(w16, None, "int8")  # bf16 scales: bf16 activations
        sizes = "/".join(f"{b / 1e9:.3f}" for b in (weight.numel() * 4, q8.nbytes(), q4.nbytes()))
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k)
                xb = x.bfloat16()
                reps = max(3, args.repeats // (1 + rows // 32)) if n < 100_000 else max(3, args.repeats // 4)
                calls = (lambda w=weight, x=x: F.linear(x, w), lambda f=q8, x=x: f(x), lambda f=q4, x=x: f(x),
                         lambda f=q8, x=x: F.linear(x, f.qweight * f.scales[:, None]),
                         lambda w=w16, x=xb: F.linear(x, w),
                         lambda f=q8b, x=xb: f(x))
                with torch.inference_mode():
                    ms = [_time(call, reps) for call in calls]
                times = " ".join(f"{t:8.3f}" for t in ms)
                print(f"{name:18} {threads:>3} {rows:>4} {times}  {sizes:>20}", flush=True)


if __name__ == "__main__":
    main()
