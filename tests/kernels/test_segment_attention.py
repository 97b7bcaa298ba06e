"""Segment attention: the flash kernel, the CPU flash path and the blocked torch path vs the
reference, and the reference vs plain softmax over an explicit list of each token's keys."""

import pytest
import torch
from editkv.kernels.segment_attention import (
    KeyRun,
    Segment,
    plan_segments,
    segment_attention_cpu,
    segment_attention_ref,
    segment_attention_torch,
    segment_attention_triton,
    triton,
)
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
CAPACITY = 200


def _first_mismatch(a, b, atol, rtol):
    bad = ~torch.isclose(a.float(), b.float(), atol=atol, rtol=rtol)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return f"first mismatch at {idx}: {a[idx].item()} vs {b[idx].item()}"
    return None


def _segments(pattern, num_tokens):
    """Named layouts of one buffer; the new tokens' own keys sit at [150, 150 + T)."""
    new = Segment(150, 150 + num_tokens, 0, causal=True)
    if pattern == "first_chunk":  # nothing cached before: causal only
        return [new], 1
    if pattern == "prefix":  # a document's slots before the chunk, as one run
        return [Segment(0, 150), new], 1
    if pattern == "windowed":  # a sink [0, 3) moved on (its own rotation), the window [61, 150)
        return [Segment(0, 3, 1), Segment(61, 150), new], 2
    if pattern == "fim":  # prefix, suffix acting 5 later, an empty run, and scratch
        return [Segment(0, 40), Segment(40, 0 + 40, 0), Segment(40, 97, 1), Segment(97, 150, 2), new], 3
    raise ValueError(pattern)


def _inputs(batch, key_batch, num_tokens, heads, kv_heads, head_dim, rotations, dtype, seed=0):
    """q [B, H, R, T, D] as a strided view, keys/values [B|1, KVH, CAP, D] views of a bigger cache."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, num_tokens, rotations, heads, head_dim, generator=g, device=DEVICE)
    q = (2 * q).to(dtype).permute(0, 3, 2, 1, 4)  # 2 * q: sharper softmax than unit-variance scores
    caches = [torch.randn(2, key_batch, kv_heads, CAPACITY + 7, head_dim, generator=g, device=DEVICE).to(dtype)
              for _ in range(2)]
    keys, values = (cache[1, :, :, 3 : 3 + CAPACITY] for cache in caches)
    return q, keys, values


SHAPES = [  # (batch, key batch, tokens, query heads, kv heads, head dim)
    (1, 1, 1, 2, 2, 64), (1, 1, 37, 6, 2, 128), (2, 1, 17, 3, 1, 80), (2, 2, 20, 4, 4, 32),
]


PATTERNS = ("first_chunk", "prefix", "windowed", "fim")
CASES = [(shape, pattern, torch.float32) for shape in SHAPES for pattern in PATTERNS] + [
    (SHAPES[1], "windowed", torch.bfloat16), (SHAPES[2], "fim", torch.bfloat16), (SHAPES[3], "prefix", torch.float16)]


@needs_triton
@pytest.mark.parametrize(("shape", "pattern", "dtype"), CASES)
def test_kernel_matches_reference(shape, pattern, dtype):
    batch, key_batch, num_tokens, heads, kv_heads, head_dim = shape
    segments, rotations = _segments(pattern, num_tokens)
    q, keys, values = _inputs(batch, key_batch, num_tokens, heads, kv_heads, head_dim, rotations, dtype)
    scale = head_dim**-0.5
    # blocks of 16 tokens x 16 keys: several token blocks, causal diagonals, partial last blocks
    out = segment_attention_triton(q, keys, values, segments, scale, config=(16, 16, 4, 1))
    ref = segment_attention_ref(q, [s.run(keys, values) for s in segments], scale)
    assert out.shape == (batch, num_tokens, heads, head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (msg := _first_mismatch(out, ref, *TOLERANCES[dtype])) is None, msg


@needs_triton
@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.bfloat16, 64), (torch.float32, 96)])
def test_kernel_with_the_engine_config(dtype, head_dim):
    """The config the engine launches (128-token blocks: one partial block of 130 tokens over two)."""
    segments, rotations = _segments("windowed", 130)
    q, keys, values = _inputs(1, 1, 130, 4, 2, head_dim, rotations, dtype, seed=1)
    keys, values = (torch.cat([t, t[:, :, :100]], dim=2) for t in (keys, values))  # room for 130 new keys
    segments = [*segments[:-1], Segment(150, 280, 0, causal=True)]
    out = segment_attention_triton(q, keys, values, segments, 0.1)
    ref = segment_attention_ref(q, [s.run(keys, values) for s in segments], 0.1)
    assert (msg := _first_mismatch(out, ref, *TOLERANCES[dtype])) is None, msg


@needs_triton
def test_kernel_with_a_segment_table_per_token_group():
    """Three groups of tokens (16, 32, 9), each with its own window, sink rotation and causal run:
    each group's rows equal the reference over that group's own runs."""
    q, keys, values = _inputs(1, 1, 57, 4, 2, 32, 2, torch.float32, seed=2)
    groups = [  # (tokens, segments); new keys at [140, 197)
        (16, [Segment(140, 156, 0, causal=True, first_token=0)]),
        (32, [Segment(0, 2, 1), Segment(110, 156), Segment(156, 188, 0, causal=True, first_token=16)]),
        (9, [Segment(0, 2, 1), Segment(130, 188), Segment(188, 197, 0, causal=True, first_token=48)]),
    ]
    plan = plan_segments([g for _, g in groups], 57, 32, DEVICE, group_tokens=[n for n, _ in groups],
                         config=(16, 16, 4, 1))
    assert plan.table.shape == (1 + 2 + 1, 3, 4)  # one row of segments per 16-token block
    out = segment_attention_triton(q, keys, values, plan, 0.2)
    first = 0
    for count, segments in groups:
        rows = slice(first, first + count)
        want = segment_attention_ref(q[:, :, :, rows], [s.run(keys, values) for s in segments], 0.2,
                                     token_offset=first)
        assert (msg := _first_mismatch(out[:, rows], want, *TOLERANCES[torch.float32])) is None, (count, msg)
        first += count


@needs_triton
def test_kernel_token_without_keys_gets_zeros():
    """Only empty segments: every row sees nothing and comes out as zeros, not NaN."""
    q, keys, values = _inputs(1, 1, 5, 2, 1, 32, 1, torch.float32)
    out = segment_attention_triton(q, keys, values, [Segment(10, 10)], 0.2, config=(16, 16, 4, 1))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("pattern", ["first_chunk", "prefix", "windowed", "fim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_flash_path_matches_reference(pattern, dtype):
    segments, rotations = _segments(pattern, 45)
    g = torch.Generator().manual_seed(4)
    q = (2 * torch.randn(2, 45, rotations, 6, 64, generator=g)).to(dtype).permute(0, 3, 2, 1, 4)
    keys, values = torch.randn(2, 1, 2, CAPACITY, 64, generator=g).to(dtype)
    runs = [s.run(keys, values) for s in segments]
    out = segment_attention_cpu(q, runs, 0.125)
    ref = segment_attention_ref(q, runs, 0.125)
    assert out.shape == (2, 45, 6, 64) and out.dtype == dtype
    assert (msg := _first_mismatch(out, ref, *TOLERANCES[dtype])) is None, msg


def test_cpu_flash_path_takes_runs_of_different_buffers():
    """A batch-1 document under a batch-3 scratch (forked rollouts): the runs need not share a buffer."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 2, 6, 32, generator=g)
    doc = torch.randn(2, 1, 2, 50, 32, generator=g)
    scratch = torch.randn(2, 3, 2, 6, 32, generator=g)
    runs = [KeyRun(doc[0, :, :, :20], doc[1, :, :, :20]), KeyRun(doc[0, :, :, 30:50], doc[1, :, :, 30:50], 1),
            KeyRun(scratch[0], scratch[1], causal=True)]
    out = segment_attention_cpu(q, runs, 0.3)
    assert (msg := _first_mismatch(out, segment_attention_ref(q, runs, 0.3), 2e-5, 1e-5)) is None, msg


def test_blocked_torch_path_matches_reference():
    """Blocks of 16 tokens: a causal run's keys seen from each block's own first token on."""
    segments, rotations = _segments("windowed", 45)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, rotations, 45, 16, generator=g)
    keys, values = torch.randn(2, 1, 2, CAPACITY, 16, generator=g)
    runs = [s.run(keys, values) for s in segments]
    out = segment_attention_torch(q, runs, 0.25, block=16)
    assert torch.allclose(out, segment_attention_ref(q, runs, 0.25), atol=1e-6)


def _gathered(q, runs, scale):
    """Plain softmax in fp64, token by token, over an explicit list of (run, key index) pairs."""
    batch, heads, _, num_tokens, head_dim = q.shape
    out = torch.zeros(batch, num_tokens, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(num_tokens):
                scores, vals = [], []
                for run in runs:
                    kb = b if run.keys.shape[0] > 1 else 0
                    kh = h // (heads // run.keys.shape[1])
                    for i in range(run.keys.shape[2]):
                        if run.causal and i > t:
                            continue
                        scores.append(float(q[b, h, run.rotation, t].double() @ run.keys[kb, kh, i].double()) * scale)
                        vals.append(run.values[kb, kh, i].double())
                if scores:
                    out[b, t, h] = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0) @ torch.stack(vals)
    return out


def test_reference_equals_softmax_over_gathered_keys():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 2, 5, 8, generator=g)
    keys, values = torch.randn(2, 1, 2, 30, 8, generator=g)
    new_k, new_v = torch.randn(2, 2, 2, 5, 8, generator=g)
    runs = [KeyRun(keys[:, :, :2], values[:, :, :2], 1), KeyRun(keys[:, :, 9:21], values[:, :, 9:21]),
            KeyRun(new_k, new_v, causal=True)]
    ref = segment_attention_ref(q, runs, 0.4)
    want = _gathered(q, runs, 0.4)
    assert torch.allclose(ref.double(), want, atol=1e-5), (ref.double() - want).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_at_prefill_sizes_on_the_gpu(dtype, head_dim):
    """A 2k-token chunk after a 3k-key window with a sink, GQA 6:1, the engine's config."""
    g = torch.Generator(device="cuda").manual_seed(0)
    num_tokens, heads, kv_heads = 2048, 12, 2
    q = torch.randn(1, heads, 2, num_tokens, head_dim, generator=g, device="cuda").to(dtype)
    keys, values = (torch.randn(1, kv_heads, 8000, head_dim, generator=g, device="cuda").to(dtype) for _ in range(2))
    segments = [Segment(0, 4, 1), Segment(1000, 4000), Segment(4000, 4000 + num_tokens, 0, causal=True)]
    out = segment_attention_triton(q, keys, values, segments, head_dim**-0.5)
    ref = segment_attention_torch(q, [s.run(keys, values) for s in segments], head_dim**-0.5)
    assert (msg := _first_mismatch(out, ref, *TOLERANCES[dtype])) is None, msg
