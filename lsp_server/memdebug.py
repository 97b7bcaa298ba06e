"""`editkv/debugMemory`: what the server process holds, for finding leaks (tests, soak runs).

Started with EDITKV_TRACEMALLOC=N (frames per traceback; 1 is enough for a by-line table;
0: no tracing, which keeps the rest without tracemalloc's own memory and time), the server
traces Python allocations from startup; each request answers the process's
resident memory, the biggest growths of traced memory by source line since the previous
request (the first compares to startup), and the live objects by type that changed most
(`gc.get_objects`, so only containers and tracked objects). `trim: true` first asks glibc to
give freed memory back (`malloc_trim(0)`) and answers the resident memory before and after,
which tells fragmentation (memory that trimming gives back) from memory still in use.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import tracemalloc
from typing import Any

ENV = "EDITKV_TRACEMALLOC"
TOP = 25


def start_from_env() -> bool:
    """Start tracing if EDITKV_TRACEMALLOC asks for it; whether tracing is on."""
    frames = os.environ.get(ENV)
    if frames and int(frames) > 0 and not tracemalloc.is_tracing():
        tracemalloc.start(int(frames))
    return tracemalloc.is_tracing()


def rss_mb() -> float | None:
    """This process's resident memory (VmRSS) in MiB; None where /proc has no answer."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def malloc_trim() -> bool:
    """glibc's malloc_trim(0); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False


class MemoryProbe:
    """Keeps the previous snapshot and type counts so each report is a difference."""

    def __init__(self) -> None:
        self.snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        self.types = self._types()

    @staticmethod
    def _types() -> collections.Counter[str]:
        return collections.Counter(type(o).__qualname__ for o in gc.get_objects())

    def report(self, trim: bool = False, top: int = TOP) -> dict[str, Any]:
        gc.collect()
        out: dict[str, Any] = {"rss_mb": rss_mb()}
        if trim:
            out["trimmed"] = malloc_trim()
            out["rss_mb_after_trim"] = rss_mb()
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            traced, peak = tracemalloc.get_traced_memory()
            out["traced_mb"], out["traced_peak_mb"] = traced / 2**20, peak / 2**20
            if self.snapshot is not None:
                diff = snap.compare_to(self.snapshot, "lineno")
                out["growth"] = [{"where": str(d.traceback), "size_kb": d.size / 1024,
                                  "size_diff_kb": d.size_diff / 1024, "count": d.count, "count_diff": d.count_diff}
                                 for d in diff[:top]]
            self.snapshot = snap
        types = self._types()
        changed = sorted(((n - self.types.get(t, 0), t, n) for t, n in types.items()), reverse=True)
        out["types_grown"] = [{"type": t, "count": n, "diff": d} for d, t, n in changed[:top] if d]
        self.types = types
        return out
