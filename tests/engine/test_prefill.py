"""Chunked prefill and the eager attention paths: chunk sizes, one-buffer vs any-span forwards,
the flash kernel through the model (interpreter on the CPU), windows with a sink, no [T, S]
score matrices, and (on a GPU) the CUDA path against the CPU's."""

import pytest
import torch
from editkv.engine.generate import PREFILL_CHUNK, PREFILL_CHUNK_CUDA, prefill, prefill_chunk
from editkv.engine.loading import load_model
from editkv.engine.model import KVCache, Span, TokenGroup, one_buffer
from helpers import make_checkpoint, needs_triton

TOL = 1e-4


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """Two layers, 4 query heads over 2 KV heads, linear RoPE scaling, context 128."""
    return load_model(make_checkpoint(tmp_path_factory.mktemp("gqa"), "llama-gqa-tied-linear"))


def _ids(n, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


def _copy(cache: KVCache) -> KVCache:
    return KVCache(cache.k.clone(), cache.v.clone())


def test_prefill_chunk_policy():
    assert prefill_chunk(None) == PREFILL_CHUNK
    assert prefill_chunk(None, device="cuda") == PREFILL_CHUNK_CUDA
    assert prefill_chunk(4096, device="cuda", end=5000) == 1024  # past the window: small against it
    assert prefill_chunk(4096, device="cuda", end=4096) == PREFILL_CHUNK_CUDA  # within it: nothing dropped
    assert prefill_chunk(4096, 300, end=9000) == 300
    assert prefill_chunk(96, end=300) == 24


@pytest.mark.parametrize("window", [None, 48])
def test_prefill_logits_do_not_depend_on_the_chunk_within_the_context(gqa, window):
    """Without dropping keys (window None, or the text shorter than it) chunks are only a memory bound."""
    model = gqa.runner
    ids = _ids(45)
    outs = []
    for chunk in (5, 16, None):
        cache = model.new_cache(len(ids))
        outs.append(prefill(model, ids, cache, chunk=chunk, logits="all", window=window, sink=(cache, 1)))
    for out in outs[1:]:
        assert (out - outs[0]).abs().max() <= TOL


def test_one_buffer_forward_equals_the_any_span_forward(gqa):
    """The same context as slots of the write buffer (one segment-attention call, fused RoPE write)
    and as spans of a copy (runs of another buffer): a sink acting 20 on, a window, a shifted run."""
    model = gqa.runner
    cache = model.new_cache(120)
    prefill(model, _ids(90), cache, logits="none")
    other = _copy(cache)
    ids = torch.tensor([_ids(12, seed=1)])
    positions = torch.arange(95, 107)
    spans = lambda c: [Span(c, 0, 2, 20), Span(c, 22, 60), Span(c, 60, 90, 3)]  # noqa: E731
    rotations = [{0: 0, 3: 1, 20: 2}]
    assert one_buffer(cache, 90, [TokenGroup(12, spans(cache))], rotations) is not None
    assert one_buffer(cache, 90, [TokenGroup(12, spans(other))], rotations) is None
    got = model(ids, positions, write=cache, write_at=90, context=spans(cache), logits="all")
    want = model(ids, positions, write=other, write_at=90, context=spans(other), logits="all")
    assert (got - want).abs().max() <= TOL
    assert torch.allclose(cache.k[:, :, :, 90:102], other.k[:, :, :, 90:102], atol=1e-6)


@needs_triton
@pytest.mark.parametrize("case", ["windowed", "repair", "fim"])
def test_flash_kernel_through_the_model(gqa, case):
    """model.model.attention = "triton" runs kernels/segment_attention.py's kernel for every one-buffer
    forward (the interpreter here): same logits and cache as the CPU path, windows and sinks included."""
    model = gqa.runner
    ids = _ids(70, seed=2)
    results = []
    for kernel in ("auto", "triton"):
        model.model.attention = kernel
        try:
            cache = model.new_cache(100)
            if case == "windowed":  # 40 tokens under a 24-token window: 6-token chunks, a sink of 1
                out = prefill(model, ids[:40], cache, logits="all", window=24, sink=(cache, 1))
            elif case == "repair":  # 20 tokens after 50 cached ones, in two chunks
                prefill(model, ids[:50], cache, logits="none")
                out = prefill(model, ids[50:], cache, start=50, first_position=50, context=[Span(cache, 0, 50)],
                              chunk=11, logits="all")
            else:  # a FIM-like view: prefix, suffix acting 2 on, then 6 view tokens
                prefill(model, ids[:60], cache, logits="none")
                out = model(torch.tensor([ids[60:66]]), torch.arange(62, 68), write=cache, write_at=60,
                            context=[Span(cache, 0, 30), Span(cache, 30, 60, 2)], logits="all")
        finally:
            model.model.attention = "auto"
        results.append((out, cache.k.clone()))
    (auto, auto_k), (flash, flash_k) = results
    assert (auto - flash).abs().max() <= TOL, case
    assert (auto_k - flash_k).abs().max() <= TOL, case


@needs_triton
def test_window_chunks_as_token_groups_of_one_forward(gqa, monkeypatch):
    """Several window chunks per forward (what prefill does by default), through the CPU path
    (one flash call per group and run) and the flash kernel (a segment table per token block,
    each token's own sink rotation): the logits and cache of one forward per chunk."""
    model = gqa.runner
    ids = _ids(100, seed=6)
    results = []
    for per_forward, kernel in ((16, "auto"), (48, "auto"), (48, "triton")):  # chunks of 16 (window 64 // 4)
        model.model.attention, model.model.attention_config = kernel, ((16, 16, 4, 1) if kernel == "triton" else None)
        if per_forward > 16:  # grouped forwards must not split into one forward per group
            monkeypatch.setattr(model.model, "_one_group_at_a_time", None)
        try:
            cache = model.new_cache(len(ids))
            out = prefill(model, ids, cache, logits="all", window=64, sink=(cache, 1), per_forward=per_forward)
        finally:
            model.model.attention, model.model.attention_config = "auto", None
            monkeypatch.undo()
        results.append((out, cache.k.clone()))
    (one, one_k), *grouped = results
    for out, k in grouped:
        assert (one - out).abs().max() <= TOL
        assert (one_k - k).abs().max() <= TOL


def test_token_groups_fall_back_to_one_forward_each(gqa):
    """Groups the flash kernel can't take (here: the CPU's path) run as forwards of their own."""
    model = gqa.runner
    ids = torch.tensor([_ids(30, seed=7)])
    cache, other = model.new_cache(40), model.new_cache(40)
    groups = lambda c: [TokenGroup(10, [Span(c, 0, 2, 5)]), TokenGroup(20, [Span(c, 0, 10)])]  # noqa: E731
    got = model(ids, torch.arange(30), write=cache, write_at=0, groups=groups(cache), logits="all")
    first = model(ids[:, :10], torch.arange(10), write=other, write_at=0, context=[Span(other, 0, 2, 5)])
    second = model(ids[:, 10:], torch.arange(10, 30), write=other, write_at=10, context=[Span(other, 0, 10)])
    assert (got - torch.cat([first, second], 1)).abs().max() <= TOL


def test_forwards_over_more_spans_take_the_segment_kernels(gqa):
    """Attention over two cached spans and the new tokens (a view's prefix and suffix, say) is no
    case for the one causal SDPA call: the choice says so instead of failing (it raised on such
    forwards on the GPU, where half precision asks for SDPA first)."""
    cache = gqa.runner.new_cache(64)
    context = [Span(cache, 0, 8), Span(cache, 16, 24)]
    for choice in ("sdpa", "auto"):
        assert one_buffer(cache, 32, [TokenGroup(8, context)], [{0: 0}], choice).kernel == "cpu"
    long_head = [Span(cache, 0, 20)]  # unshifted, but more than a head's few slots
    assert one_buffer(cache, 20, [TokenGroup(8, long_head)], [{0: 0}], "sdpa").kernel == "cpu"


@pytest.mark.parametrize("head", [0, 1, 3])
def test_sdpa_call_after_a_short_prefix(gqa, head):
    """A file's tokens after its head (a few slots encoded before): one causal SDPA call over
    both, the queries padded in front (what a GPU runs in half precision), equals the CPU path."""
    model = gqa.runner
    ids = _ids(60, seed=8)
    outs = []
    for kernel in ("auto", "sdpa"):
        model.model.attention = kernel
        try:
            cache = model.new_cache(64)
            if head:
                prefill(model, ids[:head], cache, logits="none")
            context = [Span(cache, 0, head)] if head else []
            assert (one_buffer(cache, head, [TokenGroup(60 - head, context)], [{0: 0}], kernel).kernel
                    == ("sdpa" if kernel == "sdpa" else "cpu"))
            outs.append(prefill(model, ids[head:], cache, start=head, first_position=head, context=context,
                                logits="all"))
        finally:
            model.model.attention = "auto"
    assert (outs[0] - outs[1]).abs().max() <= TOL


def test_prefill_materialises_no_score_matrix(tmp_path):
    """A 2048-token chunk over 2048 cached keys: no tensor of the forward holds T x S scores
    (the old eager path made [1, KVH, G*T, S] fp32 ones; 8M elements here)."""
    model = load_model(make_checkpoint(tmp_path, "llama-gqa-tied-linear", max_position_embeddings=8192)).runner
    ids = _ids(4096, seed=3)
    cache = model.new_cache(len(ids))
    prefill(model, ids[:2048], cache, logits="none", chunk=2048)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        prefill(model, ids[2048:], cache, start=2048, first_position=2048, context=[Span(cache, 0, 2048)],
                logits="none", chunk=2048)
    largest = max((torch.Size(shape).numel() for event in prof.events() for shape in event.input_shapes
                   if isinstance(shape, list) and all(isinstance(n, int) for n in shape)), default=0)
    assert 0 < largest < 2048 * 2048 // 4, largest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_prefill_matches_the_cpu(tmp_path, dtype):
    """On the GPU: a whole prefill (SDPA in half precision, the flash kernel in fp32), a chunked
    windowed one (the flash kernel with a sink; chunks over 256 tokens, which no CUDA graph
    takes) and a repair after each, against the CPU in fp32."""
    folder = make_checkpoint(tmp_path, "qwen2", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048)
    cpu, gpu = load_model(folder).runner, load_model(folder, device="cuda", dtype=dtype).runner
    tol = 1e-3 if dtype == torch.float32 else 0.1
    ids, more = _ids(2600, seed=4), _ids(300, seed=5)
    for kwargs in ({}, {"window": 2048, "chunk": 300}):
        outs = []
        for model in (cpu, gpu):
            cache = model.new_cache(len(ids) + len(more))
            sink = {"sink": (cache, 1)} if kwargs else {}
            first = prefill(model, ids, cache, logits="all", **kwargs, **sink)
            repair = prefill(model, more, cache, start=len(ids), first_position=len(ids),
                             context=[Span(cache, 0, len(ids))], logits="all", **kwargs, **sink)
            outs.append(torch.cat([first, repair], 1).float().cpu())
        scale = outs[0].abs().max()
        assert (outs[0] - outs[1]).abs().max() <= tol * scale, kwargs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_choice(tmp_path):
    model = load_model(make_checkpoint(tmp_path, "qwen2"), device="cuda", dtype=torch.bfloat16).runner
    cache = model.new_cache(64)
    assert one_buffer(cache, 0, [TokenGroup(16, [])], [{0: 0}]).kernel == "sdpa"  # nothing before: transformers' call
    assert one_buffer(cache, 16, [TokenGroup(16, [Span(cache, 0, 16)])], [{0: 0}]).kernel == "sdpa"  # a short head
    assert one_buffer(cache, 24, [TokenGroup(16, [Span(cache, 0, 24)])], [{0: 0}]).kernel == "triton"
    two = [Span(cache, 0, 8), Span(cache, 16, 24)]
    assert one_buffer(cache, 32, [TokenGroup(16, two)], [{0: 0}]).kernel == "triton"
    assert one_buffer(model.new_cache(64, dtype=torch.float32), 0, [TokenGroup(16, [])], [{0: 0}]).kernel == "triton"


def test_a_flash_kernel_that_fails_to_build_hands_attention_to_torch(gqa, monkeypatch):
    """A Triton the GPU can't compile for: the forward that hit it and every later one take the
    torch path (same logits), once logged, instead of failing every request."""
    import editkv.engine.model as engine_model

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed (simulated)")

    model = gqa.runner
    ids = torch.tensor([_ids(20, seed=3)])
    want = model(ids, torch.arange(20), write=model.new_cache(24), write_at=0, logits="all")
    monkeypatch.setattr(engine_model, "segment_attention_triton", broken)
    monkeypatch.setattr(engine_model, "TRITON_FAILED", None)
    model.model.attention = "triton"
    try:
        cache = model.new_cache(24)
        assert one_buffer(cache, 0, [TokenGroup(20, [])], [{0: 0}], "triton").kernel == "triton"
        got = model(ids, torch.arange(20), write=cache, write_at=0, logits="all")
        assert engine_model.TRITON_FAILED and "PTX" in engine_model.TRITON_FAILED
        assert (got - want).abs().max() <= TOL
        assert one_buffer(cache, 0, [TokenGroup(20, [])], [{0: 0}], "triton").kernel != "triton"
    finally:
        model.model.attention = "auto"
