"""The readback ring checks its own invariants: a ticket whose slot the ring came round to is
refused (not read as another batch's values), what `receive` returns is the caller's own copy,
and `drain` leaves nothing in flight."""

import numpy as np
import pytest
import torch
from editkv.engine.readback import Readback


def test_a_ticket_overtaken_by_the_ring_is_refused_not_misread():
    ring = Readback(3, 2, torch.device("cpu"))
    first = ring.send([torch.tensor([1.0, 2.0, 3.0])])
    second = ring.send([torch.tensor([4.0]), torch.tensor([5.0, 6.0])])
    assert ring.receive(first).tolist() == [1.0, 2.0, 3.0]
    third = ring.send([torch.tensor([7.0, 8.0, 9.0])])  # takes the first one's slot again
    assert ring.receive(second).tolist() == [4.0, 5.0, 6.0]
    fourth = ring.send([torch.tensor([0.0, 0.0, 1.0])])  # and the second one's, unread
    with pytest.raises(RuntimeError, match="overwritten"):
        ring.receive(second)
    assert ring.receive(third).tolist() == [7.0, 8.0, 9.0] and ring.receive(fourth).tolist() == [0.0, 0.0, 1.0]


def test_received_values_are_a_copy_the_ring_does_not_overwrite():
    ring = Readback(2, 2, torch.device("cpu"))
    kept = ring.receive(ring.send([torch.tensor([1.0, 1.0])]))
    for value in range(2, 6):  # the ring comes round to that slot twice
        ring.receive(ring.send([torch.tensor([float(value)] * 2)]))
    assert isinstance(kept, np.ndarray) and kept.tolist() == [1.0, 1.0]


def test_sizes_must_fill_the_buffer_and_drain_leaves_nothing_in_flight():
    ring = Readback(3, 3, torch.device("cpu"))
    with pytest.raises(ValueError):
        ring.send([torch.tensor([1.0])])
    ring.send([torch.zeros(3)])
    ring.drain()
    assert ring.in_flight == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_copies_are_in_flight_until_received_or_drained():
    ring = Readback(1024, 3, torch.device("cuda"))
    big = torch.randn(4096, 4096, device="cuda")
    tickets = []
    for i in range(2):
        (big @ big).sum()  # keep the stream busy so that the copies are still queued
        tickets.append(ring.send([torch.full((1024,), float(i), device="cuda")]))
    assert ring.in_flight >= 1
    assert ring.receive(tickets[0]).tolist() == [0.0] * 1024
    ring.drain()
    assert ring.in_flight == 0 and ring.receive(tickets[1])[0] == 1.0
