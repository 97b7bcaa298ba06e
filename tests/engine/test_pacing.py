"""engine/pacing.py: interruptible device work keeps the host at most one chunk ahead."""

import pytest
import torch
from editkv.engine.pacing import Pacer


def test_on_the_cpu_nothing_is_waited_for():
    pacer = Pacer("cpu")
    for _ in range(3):
        pacer.step()
    assert pacer.waits == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_step_returns_once_the_chunk_before_is_done():
    pacer = Pacer("cuda")
    big = torch.randn(4096, 4096, device="cuda")
    first_done = torch.cuda.Event()
    for _ in range(8):  # chunk 1: long enough to be still queued when the host gets here
        big = big @ big / 64
    first_done.record()
    pacer.step()
    assert pacer.waits == 0  # nothing before chunk 1
    for _ in range(8):  # chunk 2
        big = big @ big / 64
    second_done = torch.cuda.Event()
    second_done.record()
    pacer.step()
    assert pacer.waits == 1 and first_done.query()  # chunk 1 has run; chunk 2 may still be queued
    torch.cuda.synchronize()
    assert second_done.query()


TEXT = "def f(x):\n    return x + 1\n\n\nclass A:\n    y = [1, 2]\n" * 40


def _one_chunk_jobs(device: str):
    """A document whose text has no keys yet, encoded as background work does it: one chunk per job."""
    from editkv.edit_cache.document import Document, encode_chunk

    doc = Document.create_simulated(TEXT, device=device)
    chunk = encode_chunk(doc.model)
    assert len(doc.ids) > 5 * chunk
    doc.ensure_ready(chunk)  # a request's text before the cursor (its one prefill: not paced)
    assert doc.model.pacer.steps == 0 and doc.num_unencoded > 0
    return doc, chunk


def test_a_model_s_encoding_loops_share_one_pacer():
    # Background jobs of one chunk each: with a pacer per loop no job would ever wait for the one
    # before it (engine/pacing.py)
    doc, chunk = _one_chunk_jobs("cpu")
    pacer = doc.model.pacer
    for job in range(1, 4):
        assert doc.extend(chunk, should_stop=lambda: False)
        assert doc.model.pacer is pacer and pacer.steps == job
    before = pacer.steps
    doc.ensure_ready()  # the request path's one prefill: not paced
    assert pacer.steps == before and doc.num_unencoded == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_background_job_waits_for_the_chunk_of_the_job_before():
    doc, chunk = _one_chunk_jobs("cuda")
    pacer = doc.model.pacer
    doc.extend(chunk, should_stop=lambda: False)
    assert pacer.waits == 0
    doc.extend(chunk, should_stop=lambda: False)
    assert pacer.waits == 1  # job 2's chunk queued, then job 1's waited for
