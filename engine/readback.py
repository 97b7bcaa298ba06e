"""Device results to the host without stalls: a ring of pinned host buffers (`Readback`), used by
the graphed decode chains (engine/static_decode.py) and the superposed device loop
(engine/decoding/superposed_device.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Readback:
    """Device results to the host in one copy each: packed into one float64 device buffer, then
    copied to the next of a ring of pinned host buffers, so that one batch can land while the
    host reads the one before. `send` queues (nothing waits for the GPU on CUDA); `receive`
    waits for that copy only.

    The ring's safety is checked here, not assumed from the callers' in-flight limits: a ticket
    names its slot and the send that filled it, and `receive` refuses a ticket whose slot a later
    send has taken (its values would be another batch's); the values it returns are a copy, so
    nothing the caller keeps points into a slot the ring will fill again; `send` into a slot
    whose copy may still be landing waits for that copy's event first; `drain` waits for every
    batch still in flight (nothing of a decode is left running when its answer goes out).
    """

    def __init__(self, size: int, ring: int, device: torch.device) -> None:
        self._pack = torch.zeros(size, dtype=torch.float64, device=device)
        self._host = torch.zeros((ring, size), dtype=torch.float64, pin_memory=device.type == "cuda")
        self._next = 0
        self._sends = 0  # sends so far: a ticket's serial number
        self._serial = [0] * ring  # the send each slot holds now (0: none)
        self._events: list[torch.cuda.Event | None] = [None] * ring  # its copy, until known landed

    def send(self, parts: Sequence[torch.Tensor]) -> tuple[int, torch.cuda.Event | None, int]:
        """Queue the copy of `parts` (flattened, in order, filling the buffer); the ticket."""
        at = 0
        for part in parts:
            n = part.numel()
            self._pack[at : at + n].copy_(part.flatten())
            at += n
        if at != self._pack.numel():
            raise ValueError(f"parts hold {at} values, the buffer {self._pack.numel()}")
        slot = self._next = (self._next + 1) % len(self._host)
        if self._events[slot] is not None:  # the slot's last copy may still be landing: let it
            self._events[slot].synchronize()
            self._events[slot] = None
        self._sends += 1
        self._serial[slot] = self._sends
        self._host[slot].copy_(self._pack, non_blocking=True)
        event = None
        if self._pack.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._events[slot] = event
        return slot, event, self._sends

    def receive(self, ticket: tuple[int, torch.cuda.Event | None, int]) -> np.ndarray:
        """Wait for a sent batch; a copy of its values. RuntimeError if the ring came round to
        its slot since (more batches were in flight than the ring holds)."""
        slot, event, serial = ticket
        if self._serial[slot] != serial:
            raise RuntimeError(f"readback batch {serial} was overwritten by batch {self._serial[slot]}: more than "
                               f"{len(self._host)} batches were in flight")
        if event is not None:
            event.synchronize()
            if self._events[slot] is event:
                self._events[slot] = None
        return self._host[slot].numpy().copy()

    @property
    def in_flight(self) -> int:
        """Copies queued and not yet known to have landed."""
        return sum(e is not None for e in self._events)

    def drain(self) -> None:
        """Wait for every queued copy (and so for the device work queued before it)."""
        for slot, event in enumerate(self._events):
            if event is not None:
                event.synchronize()
                self._events[slot] = None
