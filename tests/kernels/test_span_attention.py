"""Split-K span attention vs the torch reference, the reference vs plain softmax attention over a
gathered key list, the split plan, and (on a GPU) replay inside a CUDA graph."""


import pytest
import torch
from editkv.kernels.span_attention import (
    plan_splits,
    span_attention_ref,
    span_attention_triton,
    triton,
)
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
NUM_KV_HEADS = 2
CAPACITY, OFFSET, SLOTS, BUCKET = 320, 16, 288, 200  # keys: slots [16, 304) of a 320-slot cache


def _first_mismatch(a, b, atol, rtol):
    bad = ~torch.isclose(a.float(), b.float(), atol=atol, rtol=rtol)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return f"first mismatch at {idx}: {a[idx].item()} vs {b[idx].item()}"
    return None


def _visibility(pattern, num_tokens, num_slots):
    """(meta, slots) for a named visibility pattern; meta = prefix_end, suffix_start, suffix_end, shift,
    scratch_start."""
    tokens = torch.arange(num_tokens)
    if pattern == "prefix":  # scratch starts past every slot: only [0, 150) is seen
        meta, slots = [150, 0, 0, 0, num_slots], 180 + tokens
    elif pattern == "mixed":  # block edges (32) and split edges (64) fall inside every run
        meta, slots = [70, 90, 150, 5, 160], 160 + tokens
    elif pattern == "repair":  # PIE repair: scratch from slot 0, plus padding rows
        meta, slots = [0, 0, 0, 0, 0], 120 + tokens
        if num_tokens > 1:
            slots[-1] = -1  # sees nothing at all: must come out as zeros
        if num_tokens > 2:
            slots[-2] = num_slots - 1  # past the bucket: sees all of [0, bucket)
    elif pattern == "empty":  # no row sees anything
        meta, slots = [0, 0, 0, 0, 0], torch.full((num_tokens,), -1)
    elif pattern == "windowed":  # a sink [0, 3) shifted 40 on, the window [75, 110), a shifted suffix, scratch
        meta, slots = [110, 130, 170, 5, 175, 75, 3, 40], 175 + tokens
    elif pattern == "windowed_repair":  # sink, then one run from the window start up to the new tokens
        meta, slots = [0, 0, 0, 0, 90, 0, 2, 60], 150 + tokens
    else:
        raise ValueError(pattern)
    return torch.tensor(meta, dtype=torch.int64), slots.to(torch.int64)


def _inputs(num_tokens, num_groups, head_dim, dtype, device=DEVICE, seed=0, rotations=2):
    """q [KVH, G, R, T, D] and keys/values as strided [KVH, S, D] views of [L, 1, KVH, CAP, D] caches."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(NUM_KV_HEADS, num_groups, rotations, num_tokens, head_dim, generator=g, device=device)
    caches = [torch.randn(2, 1, NUM_KV_HEADS, CAPACITY, head_dim, generator=g, device=device).to(dtype)
              for _ in range(2)]
    keys, values = (cache[1, 0, :, OFFSET : OFFSET + SLOTS] for cache in caches)
    return (2 * q).to(dtype), keys, values  # 2 * q: sharper softmax than scores of unit variance


SHAPES = [  # (tokens, groups, head_dim); 102 rows make two row blocks of 64
    (1, 1, 64), (1, 6, 128), (3, 7, 80), (17, 1, 128), (17, 6, 64),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["prefix", "mixed", "repair", "empty", "windowed", "windowed_repair"])
@pytest.mark.parametrize(("num_tokens", "num_groups", "head_dim"), SHAPES)
def test_kernel_matches_reference(num_tokens, num_groups, head_dim, pattern, dtype):
    rotations = 3 if pattern.startswith("windowed") else 2
    q, keys, values = _inputs(num_tokens, num_groups, head_dim, dtype, rotations=rotations)
    assert not keys.is_contiguous()
    meta, slots = (t.to(DEVICE) for t in _visibility(pattern, num_tokens, SLOTS))
    scale = head_dim**-0.5
    # splits of 64 keys, blocks of 32: a 200-slot bucket is 4 splits, the last one partial
    out = span_attention_triton(q, keys, values, meta, slots, scale, BUCKET, block_n=32, split_keys=64)
    ref = span_attention_ref(q, keys, values, meta, slots, scale, BUCKET)
    assert out.shape == (NUM_KV_HEADS, num_groups, num_tokens, head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    atol, rtol = TOLERANCES[dtype]
    assert (msg := _first_mismatch(out, ref, atol, rtol)) is None, msg
    if pattern == "empty" or (pattern == "repair" and num_tokens > 1):
        assert torch.equal(out[:, :, -1], torch.zeros_like(out[:, :, -1]))


@needs_triton
@pytest.mark.parametrize(("dtype", "bucket"), [(torch.float16, 256), (torch.float32, 77), (torch.bfloat16, 288)])
def test_kernel_with_default_split_plan(dtype, bucket):
    """The plan the engine uses (one split at these buckets), buckets that aren't a multiple of a block."""
    q, keys, values = _inputs(3, 6, 96, dtype, seed=1)
    meta, slots = (t.to(DEVICE) for t in _visibility("mixed", 3, SLOTS))
    out = span_attention_triton(q, keys, values, meta, slots, 0.1, bucket)
    ref = span_attention_ref(q, keys, values, meta, slots, 0.1, bucket)
    atol, rtol = TOLERANCES[dtype]
    assert (msg := _first_mismatch(out, ref, atol, rtol)) is None, msg


@needs_triton
def test_kernel_with_more_splits_than_one_combine_round():
    """70 splits: the combine folds them in two rounds of 64 lanes."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q = torch.randn(NUM_KV_HEADS, 3, 2, 2, 64, generator=g, device=DEVICE)
    keys, values = torch.randn(2, NUM_KV_HEADS, 1200, 64, generator=g, device=DEVICE)
    meta = torch.tensor([300, 400, 700, 2, 1000], device=DEVICE)
    slots = torch.tensor([1100, 1119], device=DEVICE)
    bucket = 70 * 16
    out = span_attention_triton(q, keys, values, meta, slots, 0.125, bucket, block_n=16, split_keys=16)
    ref = span_attention_ref(q, keys, values, meta, slots, 0.125, bucket)
    assert (msg := _first_mismatch(out, ref, *TOLERANCES[torch.float32])) is None, msg


def _gathered_attention(q, keys, values, meta, slots, scale, bucket):
    """Plain softmax attention in fp64, token by token over an explicit list of visible slots."""
    numbers = meta.tolist()
    prefix_end, suffix_start, suffix_end, _, scratch_start = numbers[:5]
    prefix_start, sink_end = numbers[5:7] if len(numbers) >= 8 else (0, 0)
    lane_start, lanes = numbers[9:11] if len(numbers) == 11 else (0, 1)

    def own_lane(j, slot):  # written out: lane = how many slots past lane_start, modulo lanes
        return j < lane_start or lanes <= 1 or (j - lane_start) % lanes == (slot - lane_start) % lanes

    out = torch.zeros(q.shape[0], q.shape[1], q.shape[3], q.shape[4], dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        seen = [j for j in range(bucket) if j < sink_end or prefix_start <= j < prefix_end
                or suffix_start <= j < suffix_end or (scratch_start <= j <= slot and own_lane(j, slot))]
        if not seen:
            continue
        which = torch.tensor([2 if j < sink_end else 1 if suffix_start <= j < suffix_end else 0 for j in seen])
        k = keys[:, seen].double()  # [KVH, N, D]
        qs = q[:, :, :, t].double()[:, :, which]  # [KVH, G, N, D]: each key's own query rotation
        scores = (qs * k[:, None]).sum(-1) * scale  # [KVH, G, N]
        out[:, :, t] = torch.softmax(scores, dim=-1) @ values[:, seen].double()
    return out


@pytest.mark.parametrize(("meta", "slots"), [
    ([6, 10, 20, 3, 24], [24, 25, 26, 27, 39]),  # the last slot lies past the bucket
    ([0, 0, 0, 0, 0], [10, 11, -1, 12, 13]),  # repair shape with a padding row that sees nothing
    ([12, 12, 30, 7, 30], [30, 31, 32, 33, 34]),  # suffix right after the prefix, scratch right after it
    ([14, 20, 28, 2, 30, 8, 2, 6], [30, 31, 32, 33, 34]),  # windowed: sink [0, 2), window [8, 14), suffix
    ([0, 0, 0, 0, 9, 0, 3, 6], [20, 21, 22, 23, 24]),  # windowed repair: sink, then [9, own slot]
    # three beams interleaved from slot 24 (view tokens [20, 24) shared), at their fourth step
    ([6, 10, 18, 3, 20, 0, 0, 0, 0, 24, 3], [33, 34, 35, 35, 33]),
    ([6, 10, 18, 3, 20, 0, 0, 0, 0, 24, 1], [33, 34, 35, 35, 33]),  # one lane: the causal rule
])
def test_reference_equals_softmax_over_gathered_keys(meta, slots):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 3 if len(meta) >= 8 else 2, 5, 16, generator=g)
    keys, values = torch.randn(2, 2, 40, 16, generator=g)
    meta, slots = torch.tensor(meta), torch.tensor(slots)
    ref = span_attention_ref(q, keys, values, meta, slots, 0.3, 36)
    want = _gathered_attention(q, keys, values, meta, slots, 0.3, 36)
    assert torch.allclose(ref.double(), want, atol=1e-5), (ref.double() - want).abs().max()


def test_split_plan_fills_the_gpu_at_decode():
    """T=1 with 6 query heads per kv head, 2 kv heads: ~4 programs per SM from 8k keys up, and
    one-block splits for a 2k context (the sizes the H100 sweep found fastest)."""
    for bucket, split in ((2048, 64), (9216, 64), (17408, 128)):
        plan = plan_splits(num_kv_heads=2, num_groups=6, num_tokens=1, bucket=bucket)
        assert plan.block_m == 16 and plan.num_row_blocks == 1 and plan.split_keys == split, (bucket, plan)
        assert plan.num_splits * 2 >= min(256, bucket * 2 // 64), plan


def test_split_plan_uses_longer_splits_for_many_rows():
    """A 16-token verification (96 rows a kv head): splits of at least 256 keys."""
    plan = plan_splits(num_kv_heads=2, num_groups=6, num_tokens=16, bucket=9216)
    assert plan.block_m == 64 and plan.num_row_blocks == 2 and plan.split_keys == 256, plan
    assert plan_splits(num_kv_heads=4, num_groups=7, num_tokens=16, bucket=9216).split_keys == 512


@pytest.mark.parametrize("shape", [(2, 6, 1, 1024), (2, 8, 64, 65536), (32, 8, 64, 65536), (1, 1, 1, 1)])
def test_split_plan_covers_the_bucket(shape):
    num_kv_heads, num_groups, num_tokens, bucket = shape
    plan = plan_splits(num_kv_heads, num_groups, num_tokens, bucket)
    assert (plan.num_splits - 1) * plan.split_keys < bucket <= plan.num_splits * plan.split_keys
    assert plan.num_row_blocks * plan.block_m >= num_groups * num_tokens > (plan.num_row_blocks - 1) * plan.block_m
    assert 16 <= plan.block_m <= 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replays_in_a_cuda_graph_as_meta_and_slots_change(dtype):
    num_tokens, num_groups, head_dim, bucket = 4, 6, 128, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(NUM_KV_HEADS, num_groups, 2, num_tokens, head_dim, generator=g, device="cuda").to(dtype)
    caches = [torch.randn(2, 1, NUM_KV_HEADS, 6000, head_dim, generator=g, device="cuda").to(dtype) for _ in range(2)]
    keys, values = (cache[1, 0, :, 100:5100] for cache in caches)
    meta = torch.tensor([1000, 1100, 1500, 9, 2000], device="cuda")
    slots = torch.arange(2000, 2000 + num_tokens, device="cuda")
    scale = head_dim**-0.5

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        span_attention_triton(q, keys, values, meta, slots, scale, bucket)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = span_attention_triton(q, keys, values, meta, slots, scale, bucket)

    atol, rtol = TOLERANCES[dtype]
    for new_meta, new_slots in [
        ([1000, 1100, 1500, 9, 2000], [2000, 2001, 2002, 2003]),
        ([0, 0, 0, 0, 0], [3000, 3001, -1, 4095]),  # repair shape, a row that sees nothing
        ([3500, 3600, 3900, -4, 3950], [3950, 3951, 3952, 5000]),  # a slot past the bucket
    ]:
        meta.copy_(torch.tensor(new_meta))
        slots.copy_(torch.tensor(new_slots))
        graph.replay()
        ref = span_attention_ref(q, keys, values, meta, slots, scale, bucket)
        assert torch.isfinite(out).all()
        assert (msg := _first_mismatch(out, ref, atol, rtol)) is None, f"{new_meta}: {msg}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lanes", [1, 3, 4])
def test_kernel_matches_reference_with_lanes(dtype, lanes):
    """Interleaved lanes (beam search's beams after a shared view): each row sees the shared
    scratch and only its own lane's slots after `lane_start`; with a region origin too."""
    q, keys, values = _inputs(4, 6, 64, dtype)
    origin, lane_start, steps = 20, 150, 9
    meta = torch.tensor([100, 110, 130, 5, 140, 0, 0, 0, origin, lane_start, lanes], device=DEVICE)
    at = origin + lane_start + steps * lanes
    slots = torch.tensor([at + row if row < lanes else SLOTS - 1 for row in range(4)], device=DEVICE)
    out = span_attention_triton(q, keys, values, meta, slots, 0.125, BUCKET)
    ref = span_attention_ref(q, keys, values, meta, slots, 0.125, BUCKET)
    atol, rtol = TOLERANCES[dtype]
    assert (msg := _first_mismatch(out, ref, atol, rtol)) is None, msg
    if lanes > 1:  # the rule is in force: not what the plain causal rule gives
        plain = span_attention_ref(q, keys, values, meta[:9].contiguous(), slots, 0.125, BUCKET)
        assert not torch.allclose(ref[:, :, :lanes].float(), plain[:, :, :lanes].float(), atol=atol)


@pytest.mark.parametrize("kernel", ["ref", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("origin", [0, 40, 150])
def test_origin_reads_a_region_of_the_buffer(kernel, origin):
    """A 9-number meta counts spans and visibility from `origin`, with slots the buffer's own: the
    same as the 8-number meta over the buffer from `origin` on (a document that is a region of the
    KV pool), also where the bucket runs past the buffer's end (origin 150: 138 slots are left)."""
    q, keys, values = _inputs(3, 6, 64, torch.float32, rotations=3)
    meta, slots = _visibility("windowed", 3, SLOTS)
    slots = (slots - 100).to(DEVICE)  # within every region below
    meta8 = torch.tensor([*meta[:4].tolist(), 0, *meta[5:].tolist()], device=DEVICE)  # scratch from 0
    meta9 = torch.cat((meta8, torch.tensor([origin], device=DEVICE)))
    run = span_attention_ref if kernel == "ref" else span_attention_triton
    got = run(q, keys, values, meta9, slots + origin, 0.125, BUCKET)
    region = (keys[:, origin:], values[:, origin:])
    bucket = min(BUCKET, SLOTS - origin)
    want = span_attention_ref(q, *region, meta8, slots, 0.125, bucket)
    assert (msg := _first_mismatch(got, want, *TOLERANCES[torch.float32])) is None, msg
    if origin:  # and not the keys before the origin
        assert not torch.allclose(got, span_attention_ref(q, keys, values, meta8, slots, 0.125, BUCKET))
