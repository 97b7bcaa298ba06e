"""Interruptible device work that stays interruptible: `Pacer` keeps the host at most one chunk
ahead of the device.

Background encoding runs in chunks that poll a stop flag between them (edit_cache/document.py).
On a GPU a chunk's forward is queued, not run, when the call returns (a replayed CUDA graph
queues in microseconds), so a loop that only polls the flag can queue a whole file's chunks
before the device has run the first: a request arriving meanwhile then waits behind all of them
(the H100 replay of session 16: ~4,000 tokens queued between two keystrokes, keystrokes 50-60 ms
instead of ~15). The pacer waits, after queueing chunk i, until chunk i-1 is done, so a stop
leaves at most one chunk for the next request to wait behind, and the device is never idle
between chunks. On the CPU every forward has run when it returns: nothing to wait for.

One pacer serves every loop on a device (`ModelRunner.pacer`): background work comes as jobs of one
256-token chunk each (lsp_server/worker.py), so a pacer per loop never waited, and the H100 replay
of session 17 still ran 3,500-4,000 tokens between keystrokes 100 ms apart (three mid-word
keystrokes after them 57-68 ms against 15-25 ms of their own work). Shared, the next job's first
chunk waits for the last one's.
"""

from __future__ import annotations

import torch


class Pacer:
    """Call `step()` after queueing each chunk of work on `device`'s current stream."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._last: torch.cuda.Event | None = None
        self.steps = 0  # chunks queued
        self.waits = 0  # steps that waited for an earlier chunk (for tests and stats)

    def step(self) -> None:
        self.steps += 1
        if not self._cuda:
            return
        done = torch.cuda.Event()
        done.record()
        if self._last is not None:
            self._last.synchronize()
            self.waits += 1
        self._last = done
