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
