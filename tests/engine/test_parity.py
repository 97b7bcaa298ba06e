"""Our forward pass vs transformers' own model on the same tiny random checkpoints (fp32)."""

import pytest
import torch
from editkv.engine.generate import prefill
from editkv.engine.loading import load_model
from editkv.engine.model import Span
from helpers import FAMILIES, hf_model, make_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, load_model(folder), hf_model(folder)


def _ids(n, vocab=320, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (1, n), generator=g)


def _hf_logits(hf, ids, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=position_ids).logits.float()


def test_prefill_logits_match(pair):
    family, ours, hf = pair
    ids = _ids(24)
    cache = ours.runner.new_cache(24)
    # Dynamic NTK picks frequencies from the largest position of each forward: no chunking.
    chunk = 64 if family == "dynamic" else 7
    got = prefill(ours.runner, ids[0].tolist(), cache, logits="all", chunk=chunk)
    want = _hf_logits(hf, ids)
    assert (got - want).abs().max() <= TOL, family


def test_cached_decode_steps_match(pair):
    family, ours, hf = pair
    if family == "dynamic":
        pytest.skip("dynamic NTK rescales all positions per forward in the reference; cached keys can't")
    ids = _ids(20)
    cache = ours.runner.new_cache(20)
    prefill(ours.runner, ids[0, :12].tolist(), cache)
    want = _hf_logits(hf, ids)
    for t in range(12, 20):
        got = ours.runner(ids[:, t : t + 1], torch.tensor([t]), write=cache, write_at=t,
                         context=[Span(cache, 0, t)], logits="last")
        assert (got - want[:, t]).abs().max() <= TOL, (family, t)


def test_multi_token_step_at_explicit_positions(pair):
    family, ours, hf = pair
    if family == "dynamic":
        pytest.skip("see test_cached_decode_steps_match")
    # Positions start at 40, as for a document whose earlier slots hold other tokens.
    ids = _ids(16)
    positions = torch.arange(40, 56)
    want = _hf_logits(hf, ids, positions[None])
    cache = ours.runner.new_cache(32)
    # First 10 tokens into slots 5..15 (slots need not equal positions), then a 6-token step.
    ours.runner(ids[:, :10], positions[:10], write=cache, write_at=5, logits="none")
    got = ours.runner(ids[:, 10:], positions[10:], write=cache, write_at=20,
                     context=[Span(cache, 5, 15)], logits="all")
    assert (got - want[:, 10:]).abs().max() <= TOL, family


def test_shifted_span_equals_reencoding_at_shifted_positions(pair):
    """A span with shift s acts like its keys were encoded s positions later (RoPE relative)."""
    family, ours, hf = pair
    if family == "dynamic":
        pytest.skip("dynamic frequencies change with length")
    model = ours.runner
    ids = _ids(12)
    cache = model.new_cache(32)
    model(ids[:, :8], torch.arange(0, 8), write=cache, write_at=0, logits="none")
    # Only layer 0's keys are context-independent; compare a single-layer effect through logits
    # of a query that sees the shifted span vs. a cache re-encoded at +3 with the same layer-0 keys.
    shifted = model(ids[:, 8:], torch.arange(11, 15), write=model.new_cache(4), write_at=0,
                    context=[Span(cache, 0, 8, shift=3)], logits="all")
    cache2 = model.new_cache(32)
    model(ids[:, :8], torch.arange(3, 11), write=cache2, write_at=0, logits="none")
    direct = model(ids[:, 8:], torch.arange(11, 15), write=model.new_cache(4), write_at=0,
                   context=[Span(cache2, 0, 8)], logits="all")
    assert (shifted - direct).abs().max() <= TOL, family


def test_batch_rows_broadcast_a_batch1_context(pair):
    family, ours, hf = pair
    model = ours.runner
    ids = _ids(10)
    cache = model.new_cache(10)
    prefill(model, ids[0, :8].tolist(), cache)
    scratch = model.new_cache(2, batch=3)
    branch = torch.tensor([[7], [8], [9]])
    got = model(branch, torch.tensor([8]), write=scratch, write_at=0,
                context=[Span(cache, 0, 8)], logits="last")
    for row in range(3):
        want = _hf_logits(hf, torch.cat([ids[:, :8], branch[row : row + 1]], dim=1))[:, -1]
        assert (got[row] - want[0]).abs().max() <= TOL, (family, row)
