"""The logit summary (top-k, log-sum-exp, entropy): the reference vs torch's own ops and the
calibration's entropy, and the Triton kernels vs the reference on random, masked, tied and
empty rows."""

import math

import pytest
import torch
from editkv.engine.calibrate import entropy
from editkv.kernels.logit_summary import LogitSummary, logit_summary, logit_summary_ref, logit_summary_triton
from helpers import KERNEL_DEVICE, needs_triton

DEVICE = KERNEL_DEVICE
INF = float("-inf")


def _rows(vocab: int, dtype: torch.dtype, block: int, seed: int = 0) -> torch.Tensor:
    """Rows as decoding meets them: plain, healing-masked, exact ties, a few allowed, all -inf."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = 3 * torch.randn(7, vocab, generator=g, device=DEVICE)
    x[1, torch.rand(vocab, generator=g, device=DEVICE) < 0.9] = INF  # most of the vocabulary masked
    # the maximum three times, in different blocks, the lowest one not first in memory order
    x[2, [vocab - 1, 5, min(block + 3, vocab - 2)]] = 20.0
    x[3] = torch.randint(0, 4, (vocab,), generator=g, device=DEVICE).float()  # ties everywhere
    x[4] = INF  # healing that leaves two tokens: fewer finite entries than k
    x[4, [vocab // 2, 3]] = torch.tensor([1.5, -2.0], device=DEVICE)
    x[5] = INF  # nothing allowed
    x[6] = x[6] * 40 + 1000  # nearly one-hot, far from 0
    x[6, 7] = x[6].max()  # ... with a tie at the top
    return x.to(dtype)


def _assert_summary(got: LogitSummary, want: LogitSummary, k: int) -> None:
    rows = want.values.shape[0]
    assert got.values.shape == (rows, k) and got.values.dtype == torch.float32
    assert got.ids.shape == (rows, k) and got.ids.dtype == torch.int64
    assert got.logsumexp.shape == (rows,) and got.entropy.shape == (rows,)
    assert torch.equal(got.ids, want.ids), (got.ids, want.ids)
    assert torch.equal(got.values, want.values)
    torch.testing.assert_close(got.logsumexp, want.logsumexp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, atol=2e-5, rtol=1e-5)
    assert not got.entropy.isnan().any() and not got.logsumexp.isnan().any()


# --- the reference ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 8])
def test_reference_is_torch(k):
    x = _rows(300, torch.float32, 64)
    s = logit_summary_ref(x, k)
    finite = torch.arange(7) != 5
    assert torch.equal(s.ids[:, 0], x.argmax(-1))
    assert torch.equal(s.values, torch.topk(x, k, dim=-1).values)  # the values; the ids' tie order is ours
    assert torch.equal(s.values, x.gather(-1, s.ids))
    torch.testing.assert_close(s.logsumexp, torch.logsumexp(x, -1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(s.entropy[finite], entropy(x)[finite], atol=1e-5, rtol=1e-5)
    assert s.logsumexp[5] == INF and s.entropy[5] == 0
    logp = torch.log_softmax(x[finite], -1).gather(-1, s.ids[finite])
    # up to an ulp of the logits' scale (row 6 sits near 1000, where an fp32 ulp is 6e-5)
    torch.testing.assert_close(s.values[finite] - s.logsumexp[finite, None], logp, atol=2e-4, rtol=0)


def test_reference_orders_ties_by_lower_id():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 2.0, 0.5],
                      [INF, 0.0, INF, 0.0, INF, INF, INF],
                      [INF] * 7])
    s = logit_summary_ref(x, 5)
    assert s.ids.tolist() == [[1, 3, 4, 2, 5], [1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]
    assert s.values[0].tolist() == [3.0, 3.0, 3.0, 2.0, 2.0]
    assert s.values[1, 2:].tolist() == [INF] * 3
    assert s.logsumexp[2] == INF and s.entropy[2] == 0 and (s.values[2] == INF).all()
    torch.testing.assert_close(s.entropy[:2], torch.tensor([entropy(x[0]).item(), math.log(2)]))
    # the k-th place is a tie among more entries than fit: the lowest ids win it
    s = logit_summary_ref(torch.tensor([[0.0, 5.0, 1.0, 1.0, 1.0, 1.0]]), 3)
    assert s.ids.tolist() == [[1, 2, 3]]


def test_public_function_off_cuda_is_the_reference():
    x = _rows(200, torch.bfloat16, 64).cpu()
    got, want = logit_summary(x, 3), logit_summary_ref(x, 3)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


# --- the kernels ------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize(("vocab", "block"), [(1000, 256), (4099, 1024), (32768, 4096)])
def test_kernel_matches_reference(vocab, block, k, dtype):
    x = _rows(vocab, dtype, block, seed=vocab + k)
    got = logit_summary_triton(x, k, block=block)
    _assert_summary(got, logit_summary_ref(x, k), k)
    assert torch.equal(got.ids[:, 0], x.argmax(-1))  # bf16 rows are full of exact ties
    assert got.ids[2, :3].tolist() == sorted({vocab - 1, 5, min(block + 3, vocab - 2)})[:k]
    assert got.logsumexp[5] == INF and got.entropy[5] == 0 and (got.values[5] == INF).all()
    assert got.ids[5].tolist() == list(range(k))
    finite = torch.arange(7, device=DEVICE) != 5
    torch.testing.assert_close(got.entropy[finite], entropy(x[finite]), atol=2e-5, rtol=1e-5)
    logp = torch.log_softmax(x[finite].float(), -1).gather(-1, got.ids[finite])
    torch.testing.assert_close(got.values[finite] - got.logsumexp[finite, None], logp, atol=2e-4, rtol=0)


@needs_triton
def test_kernel_on_strided_rows_and_one_row():
    wide = _rows(1500, torch.float32, 128, seed=3)
    x = wide[:, 100:1300]  # rows 1500 apart, 1200 long: a tail block of 48 at block 128
    _assert_summary(logit_summary_triton(x, 4, block=128), logit_summary_ref(x, 4), 4)
    one = x[2:3]
    _assert_summary(logit_summary_triton(one, 2), logit_summary_ref(one, 2), 2)  # the default block


@needs_triton
def test_kernel_k_equal_to_a_tiny_vocabulary():
    x = torch.tensor([[0.5, INF, 0.5, 2.0, -1.0], [INF] * 5], device=DEVICE)
    got = logit_summary_triton(x, 5, block=16)
    _assert_summary(got, logit_summary_ref(x, 5), 5)
    assert got.ids.tolist() == [[3, 0, 2, 4, 1], [0, 1, 2, 3, 4]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replays_in_a_cuda_graph_as_the_logits_change(dtype):
    vocab = 151_936  # a real vocabulary: 75 blocks at the default block
    logits = torch.zeros(2, vocab, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        logit_summary(logits, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = logit_summary(logits, 4)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        new = 4 * torch.randn(2, vocab, generator=g, device="cuda")
        new[1, torch.rand(vocab, generator=g, device="cuda") < 0.99] = INF
        new[0, [vocab - 1, 77]] = 30.0
        logits.copy_(new.to(dtype))
        graph.replay()
        _assert_summary(got, logit_summary_ref(logits, 4), 4)
        assert got.ids[0, :2].tolist() == [77, vocab - 1]
