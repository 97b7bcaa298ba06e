"""What a verification is worth: its rows (`Plan`), the tokens a chain is expected to keep, and
the measured cost of a forward per (rows, width).

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from editkv.engine.decoding.drafters import (
    Candidate,
)


@dataclass
class Plan:
    """The rows one verification forward checks, with estimated acceptance per draft token."""

    rows: list[Candidate] = field(default_factory=list)
    accept: list[list[float]] = field(default_factory=list)

    @property
    def drafts(self) -> list[list[int]]:
        return [r.tokens for r in self.rows] or [[]]


def expected_accepted(chains: Sequence[tuple[Sequence[int], Sequence[float]]]) -> float:
    """Expected accepted tokens when `(tokens, acceptance per token)` chains are verified together.

    A node counts if its parent is reached and the target picks its token; estimates are
    conditional on the parent, and siblings exclude each other, so they are scaled down when
    they sum past 1.
    """
    cond: dict[tuple[int, ...], float] = {}
    for tokens, accept in chains:
        for j in range(len(tokens)):
            node = tuple(tokens[: j + 1])
            cond[node] = max(cond.get(node, 0.0), accept[j])
    siblings: dict[tuple[int, ...], float] = {}
    for node, p in cond.items():
        siblings[node[:-1]] = siblings.get(node[:-1], 0.0) + p
    reach: dict[tuple[int, ...], float] = {(): 1.0}
    total = 0.0
    for node in sorted(cond, key=len):
        reach[node] = reach[node[:-1]] * cond[node] / max(1.0, siblings[node[:-1]])
        total += reach[node]
    return total


class StepCost:
    """Cost of a verification forward per (rows, width): measured wall time (EMA), or a fixed model.

    Unmeasured shapes borrow the most expensive measured shape no larger than them (optimistic,
    so each shape gets tried once); a sample is clipped to [0.5, 2] x the estimate so that one
    stall of a shared machine does not rule a shape out. The fixed model (drafted tokens free,
    `row_cost` per extra row) is what a GPU looks like, and keeps tests deterministic.
    """

    def __init__(self, measure: bool = True, row_cost: float = 0.5, alpha: float = 0.2) -> None:
        self.measure = measure
        self.row_cost = row_cost
        self.alpha = alpha
        self.ms: dict[tuple[int, int], float] = {}
        self.chain_ms: float | None = None  # measured ms per token of a device-side chain of plain steps

    def estimate(self, rows: int, width: int) -> float:
        if not self.measure:
            return 1.0 + self.row_cost * (rows - 1)
        known = self.ms.get((rows, width))
        if known is not None:
            return known
        return max((v for (b, t), v in self.ms.items() if b <= rows and t <= width), default=1.0)

    def record(self, rows: int, width: int, ms: float) -> None:
        if not self.measure:
            return
        old = self.ms.get((rows, width))
        self.ms[(rows, width)] = self._blend(old, ms)

    def record_chain(self, ms_per_token: float) -> None:
        if self.measure:
            self.chain_ms = self._blend(self.chain_ms, ms_per_token)

    def _blend(self, old: float | None, ms: float) -> float:
        if old is None:
            return ms
        return old + self.alpha * (min(max(ms, 0.5 * old), 2.0 * old) - old)
