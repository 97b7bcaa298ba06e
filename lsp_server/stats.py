"""Local statistics: what the server was asked, what it dropped, and what users did with it.

Suggestions get ids when they are served; the client reports `shown`, `accepted` and
`rejected` events for them (the `editkv/suggestionEvent` notification, or the
`editkv.suggestionAccepted` command attached to each item). Everything stays on this machine:
in memory (bounded) and, when enabled, one JSON file in the user's cache folder.
Only counts and sizes are kept, never suggestion or document text.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

EVENTS = ("shown", "accepted", "rejected")
MAX_TRACKED = 2000  # served suggestions remembered for matching events
MAX_EVENTS = 200  # recent events kept for `editkv/stats`
MAX_LATENCIES = 2000
# a served request's time: waiting (debounce, queue, the worker busy with other work, the
# event loop) + backend (the worker's call); the backend's = repair (edits into the cache) +
# view (the prompt's extra tokens) + decode (the rest: encoding near the cursor, then decoding)
PHASES = ("waiting", "backend", "repair", "view", "decode")


@dataclass
class Served:
    """What is remembered of one served suggestion."""

    kind: str  # "inline" | "completion"
    lines: int
    chars: int
    at: float
    shown: bool = False
    accepted: bool = False


def default_stats_path() -> Path:
    """`$XDG_CACHE_HOME/editkv/suggestion-stats.json` (or ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "editkv" / "suggestion-stats.json"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


class Stats:
    """Request counters, latencies and suggestion events of one server process."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.requests: dict[str, Counter[str]] = {}  # kind -> outcome -> count
        self.events: Counter[str] = Counter()
        self.events_by_kind: dict[str, Counter[str]] = {}
        self.unknown_events = 0
        self.served: OrderedDict[str, Served] = OrderedDict()
        self.recent: deque[dict] = deque(maxlen=MAX_EVENTS)
        self.latency_ms: deque[float] = deque(maxlen=MAX_LATENCIES)
        # where a served request's time went (PHASES), as many as latency_ms keeps
        self.phase_ms: dict[str, deque[float]] = {name: deque(maxlen=MAX_LATENCIES) for name in PHASES}
        self._next_id = 0
        self.shown_ids = 0  # served suggestions reported shown (each once)
        self.accepted_shown_ids = 0  # ... of which were then accepted
        self._dirty = 0
        self._previous = self._load()

    def count(self, kind: str, what: str, n: int = 1) -> None:
        """One more `what` (requests, served, dropped, ...) for `kind` (inline, completion, sync)."""
        self.requests.setdefault(kind, Counter())[what] += n

    def served_request(self, latency_ms: float, backend: dict) -> None:
        """One served request: its latency (request received -> answer ready) and the backend's
        own timings of it (`total_ms`, `repair_ms`, `view_ms`), split into PHASES."""
        self.latency_ms.append(latency_ms)
        total = backend.get("total_ms")
        if not isinstance(total, (int, float)):  # a backend that doesn't time itself
            return
        repair, view = float(backend.get("repair_ms") or 0.0), float(backend.get("view_ms") or 0.0)
        parts = {"waiting": max(0.0, latency_ms - total), "backend": total, "repair": repair, "view": view,
                 "decode": max(0.0, total - repair - view)}
        for name, ms in parts.items():
            self.phase_ms[name].append(ms)

    def new_id(self, kind: str, text: str) -> str:
        """Remember a served suggestion and give it an id for later events."""
        self._next_id += 1
        sid = f"{os.getpid()}-{self._next_id}"
        self.served[sid] = Served(kind, text.count("\n") + 1, len(text), time.time())
        while len(self.served) > MAX_TRACKED:
            self.served.popitem(last=False)
        return sid

    def event(self, sid: str, event: str) -> bool:
        """Record a client event; False (ignored) if it is malformed."""
        if event not in EVENTS or not isinstance(sid, str):
            return False
        served = self.served.get(sid)
        if served is None:
            self.unknown_events += 1
        self.events[event] += 1
        if served is not None:
            self.events_by_kind.setdefault(served.kind, Counter())[event] += 1
            if event == "shown" and not served.shown:
                served.shown = True
                self.shown_ids += 1
                self.accepted_shown_ids += served.accepted  # accepted before its shown event arrived
            elif event == "accepted" and not served.accepted:
                served.accepted = True
                self.accepted_shown_ids += served.shown
        self.recent.append({"id": sid, "event": event, "kind": served.kind if served else None,
                            "lines": served.lines if served else None, "at": round(time.time(), 3)})
        self._dirty += 1
        if self._dirty >= 20:
            self.save()
        return True

    def snapshot(self) -> dict:
        """Everything, as JSON-able data."""
        lat = list(self.latency_ms)
        totals = Counter(self._previous.get("events", {})) + self.events
        return {
            "requests": {kind: dict(c) for kind, c in self.requests.items()},
            "latency_ms": {"count": len(lat), "p50": _round(percentile(lat, 50)), "p95": _round(percentile(lat, 95))},
            "phases_ms": {name: {"p50": _round(percentile(list(ms), 50)), "p95": _round(percentile(list(ms), 95)),
                                 "mean": _round(sum(ms) / len(ms)) if ms else None}
                          for name, ms in self.phase_ms.items()},
            "suggestions": {
                "served": self._next_id,
                **{e: self.events[e] for e in EVENTS},
                "by_kind": {kind: dict(c) for kind, c in self.events_by_kind.items()},
                # of the suggestions reported shown, the share accepted (dropdown items are often
                # accepted without a shown event: they count in "accepted", not here)
                "acceptance_rate": round(self.accepted_shown_ids / self.shown_ids, 4) if self.shown_ids else None,
                "unknown_ids": self.unknown_events,
            },
            "all_time": {e: totals[e] for e in EVENTS},
            "recent_events": list(self.recent)[-20:],
            "file": str(self.path) if self.path else None,
        }

    def save(self) -> None:
        """Write the all-time totals file (best effort: a read-only cache folder is not an error)."""
        self._dirty = 0
        if self.path is None:
            return
        totals = Counter(self._previous.get("events", {})) + self.events
        data = {"events": dict(totals), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)
        except OSError:
            pass

    def _load(self) -> dict:
        if self.path is None:
            return {}
        try:
            events = json.loads(self.path.read_text()).get("events", {})
            return {"events": {k: v for k, v in events.items()
                               if k in EVENTS and isinstance(v, int) and not isinstance(v, bool) and v >= 0}}
        except (OSError, ValueError, AttributeError):
            return {}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
