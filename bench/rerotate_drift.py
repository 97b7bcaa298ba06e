"""How much PIE's re-rotation in bf16 adds to a cached key's error (issue 22's "bf16 re-rotation" suspect).

A document slot is re-rotated every time an edit's gap moves across it. Layer-0 keys of a
real model (they depend on the token alone, so a fresh encoding at any position is exact up to
float error) are stored in bf16, re-rotated k times by random deltas with the real kernel's
reference (fp64 angles, one bf16 rounding per move), and compared with the same keys encoded
fresh at the final positions, in bf16 (what a full recompute stores) and exactly (fp32). The
attention-logit error is that of the last query against all keys.

    python bench/rerotate_drift.py --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf
"""

from __future__ import annotations

import random

import torch
from common import ROOT, parser, table
from editkv.engine.loading import load_model
from editkv.kernels.rerotate import move_rerotate_ref


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--distance", type=int, default=3000, help="total positions the keys move")
    p.add_argument("--moves", default="1,4,16,64,256,1024")
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device, dtype="float32")
    model, cfg, rot = loaded.runner.model, loaded.config, loaded.runner.rotary
    text = (ROOT / "engine" / "calibrate.py").read_text()
    ids = torch.tensor([loaded.tokenizer.encode(text)[: args.tokens]], device=model.device)
    n = ids.shape[1]
    attn = model.layers[0].self_attn
    with torch.inference_mode():
        h = model.layers[0].input_layernorm(model.embed_tokens(ids))
        k = attn.k_proj(h).view(1, n, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [1, Hkv, T, D] pre-RoPE
        q = attn.q_proj(h[:, -1:]).view(1, 1, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [1, H, 1, D]

    def rotated(x: torch.Tensor, first: int) -> torch.Tensor:
        cos, sin = rot.cos_sin(torch.arange(first, first + x.shape[2], device=x.device)[None])
        return rot.apply(x, cos, sin)

    start, end = 100, 100 + args.distance
    exact = rotated(k, end)
    query = rotated(q, end + n)
    group = cfg.num_heads // cfg.num_kv_heads

    def logits(keys: torch.Tensor) -> torch.Tensor:  # [H, T]
        return torch.einsum("bhqd,bhkd->bhk", query, keys.repeat_interleave(group, dim=1))[0] * cfg.head_dim**-0.5

    want = logits(exact)
    scale = want.abs().max().item()

    def row(name: str, keys: torch.Tensor) -> list:
        err = (logits(keys) - want).abs().max().item()
        return [name, f"{((keys - exact).norm() / exact.norm()).item():.2e}", f"{err:.3f}", f"{100 * err / scale:.2f}%"]

    rows = [row("fresh prefill, bf16 (full recompute)", exact.to(torch.bfloat16).float())]
    half = rot.rotary_dim // 2
    for moves in (int(m) for m in args.moves.split(",")):
        rng = random.Random(moves)
        deltas = [rng.randint(-40, 40) for _ in range(moves - 1)]
        deltas.append(args.distance - sum(deltas))
        slack = sum(abs(d) for d in deltas) + n
        buf_k = torch.zeros(1, 1, cfg.num_kv_heads, 2 * slack + n, cfg.head_dim, dtype=torch.bfloat16,
                            device=k.device)
        buf_v = torch.zeros_like(buf_k)
        at = slack
        buf_k[0, :, :, at : at + n] = rotated(k, start).to(torch.bfloat16)
        for delta in deltas:
            cos, sin = rot.delta_cos_sin(delta)
            move_rerotate_ref(buf_k, buf_v, at, at + n, delta, cos[:half], sin[:half], rot.rotary_dim)
            at += delta
        rows.append(row(f"bf16, re-rotated {moves}x", buf_k[0, :, :, at : at + n].float()))
    print(f"layer-0 keys of {loaded.source}, {n} tokens moved {args.distance} positions; "
          f"largest |attention logit| {scale:.1f}")
    print(table(["keys", "relative error", "max attention-logit error", "of the largest logit"], rows))


if __name__ == "__main__":
    main()
