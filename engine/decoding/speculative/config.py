"""Speculation's settings and a request's counters.

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DRAFTERS = ("lookup", "table")


@dataclass(frozen=True)
class SpeculationConfig:
    """How much to draft and from where; `measure_cost` fits the plan to the device it runs on."""

    drafters: tuple[str, ...] = DRAFTERS
    threshold: float = 0.9  # h: SpecDec++ stop threshold on P(some draft token is rejected)
    max_draft: int = 16  # draft tokens per row
    max_rows: int = 1  # > 1: verify up to this many candidate chains as batch rows
    measure_cost: bool = True  # rank drafts by measured forward time per (rows, width)...
    row_cost: float = 0.5  # ...or, when not measuring, by cost 1 + row_cost per extra row
    max_match: int = 8  # prompt lookup: longest tail matched
    table_orders: tuple[int, ...] = (3, 2, 1)
    table_top_k: int = 10
    table_contexts: int = 50_000
    stochastic_table: bool = True  # sampling: draft from the table's distribution q (STAND)
    recent: int = 8  # own completions kept as a "recent" reference
    # greedy on graphed forwards: a step with nothing to draft runs this many plain steps as one
    # device-side chain (engine.static_decode.StaticForward.chain) instead of one verification
    chain_steps: int = 8
    # greedy on graphed forwards with prompt lookup among the drafters: draft and verify on the
    # device instead (StaticForward.lookup_chain), up to `device_steps` verifications of
    # `device_width` tokens per host round trip; the model table is then not consulted
    device_lookup: bool = True
    device_width: int = 8
    device_steps: int = 8
    device_in_flight: int = 2  # chains queued at once (2: the next runs while the host reads one)

    def __post_init__(self) -> None:
        unknown = set(self.drafters) - set(DRAFTERS)
        if unknown:
            raise ValueError(f"unknown drafters {sorted(unknown)}; use some of {DRAFTERS}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.max_draft < 0 or self.max_rows < 1:
            raise ValueError(f"need max_draft >= 0 and max_rows >= 1, got {self.max_draft}, {self.max_rows}")
        if self.chain_steps < 0:
            raise ValueError(f"chain_steps must be >= 0, got {self.chain_steps}")
        if self.device_width not in (2, 4, 8, 16):
            raise ValueError(f"device_width must be 2, 4, 8 or 16, got {self.device_width}")
        if not 1 <= self.device_steps <= 16:
            raise ValueError(f"device_steps must be in [1, 16], got {self.device_steps}")
        if self.device_in_flight not in (1, 2):
            raise ValueError(f"device_in_flight must be 1 or 2, got {self.device_in_flight}")


@dataclass
class SpecCounters:
    """One request's speculation, in drafted / accepted / bonus tokens.

    Every token the decoder chose is the first one (from the state's logits), an accepted draft,
    a bonus token (one per verification forward) or a chained one (plain greedy steps run on the
    device where there was nothing to draft): `len(ids) + discarded == 1 + accepted + bonus +
    chained`, where `discarded` counts chosen tokens a stop rule cut (the stop token, tokens past
    the end).
    """

    drafted: int = 0  # draft tokens verified, all rows
    accepted: int = 0  # draft tokens the target agreed with (the kept row)
    bonus: int = 0  # tokens the target chose in a verification
    forwards: int = 0  # verification forwards
    rows: int = 0  # batch rows verified, summed over forwards
    discarded: int = 0
    chained: int = 0  # tokens chosen by device-side chains of plain steps (one forward each)
    by_source: dict[str, list[int]] = field(default_factory=dict)  # source -> [drafted, accepted]

    NAMES = ("drafted", "accepted", "bonus", "forwards", "rows", "discarded", "chained")

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def write(self, extra: dict[str, float]) -> None:
        """Add these counts to `DecodeStats.extra` (keys `spec.<name>`, `spec.<name>.<source>`)."""
        for name in self.NAMES:
            extra[f"spec.{name}"] = extra.get(f"spec.{name}", 0) + getattr(self, name)
        for source, (drafted, accepted) in self.by_source.items():
            for name, value in (("drafted", drafted), ("accepted", accepted)):
                key = f"spec.{name}.{source}"
                extra[key] = extra.get(key, 0) + value

    @classmethod
    def read(cls, extra: dict[str, float]) -> SpecCounters:
        """The counters `write` left in a stats' extra."""
        out = cls(**{name: int(extra.get(f"spec.{name}", 0)) for name in cls.NAMES})
        for key, value in extra.items():
            parts = key.split(".", 2)
            if len(parts) == 3 and parts[0] == "spec":
                slot = out.by_source.setdefault(parts[2], [0, 0])
                slot[0 if parts[1] == "drafted" else 1] += int(value)
        return out
