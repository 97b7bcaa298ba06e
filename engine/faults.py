"""Fault injection: make the engine fail on purpose at a chosen point, to test recovery.

A plan names sites and counts: `EDITKV_FAULTS="replay@3=cuda,repair@5=oom"` makes the 3rd
static (graph) forward raise a CUDA error and the 5th KV repair raise out-of-memory, each once.
The plan is read from the environment when this module is first imported (the server reads it
at startup), or installed with `install` (in-process tests) or, in a server started with
EDITKV_FAULTS set (e.g. to "none"), by the `editkv/debugFaults` request. With no plan, `hit` is one dict
lookup on a module global and costs nothing measurable.

Sites (where `hit` is called):
    forward   every forward: Transformer.forward (eager), or ModelRunner.forward's static one
              (there after the static forward ran it)
    replay    a forward StaticForward runs (a graph replay on CUDA, the static forward elsewhere)
    capture   StaticForward taking a new graph (on CUDA: a capture; in "static" mode: the first
              use of a graph key, which is where a capture would be)
    repair    Document.repair applying pending edits to the KV cache
    tokenize  TokenizedText.update (the incremental re-tokenizer); kind "mismatch" corrupts its
              result instead of raising, as a tokenizer bug would

Kinds: "oom" raises torch.OutOfMemoryError, "cuda" torch.AcceleratorError (what a device fault
such as an illegal memory access raises), "error" a plain RuntimeError, "mismatch" see above.
The messages say "(injected)" so logs tell them from real faults.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field

ENV = "EDITKV_FAULTS"
SITES = ("forward", "replay", "capture", "repair", "tokenize")
KINDS = ("oom", "cuda", "error", "mismatch")
_SPEC = re.compile(r"^(?P<site>[a-z]+)@(?P<n>\d+)=(?P<kind>[a-z]+)$")


@dataclass
class FaultPlan:
    """Which hit of which site fails, and how; counts every hit of every site."""

    faults: dict[str, dict[int, str]] = field(default_factory=dict)  # site -> {hit number: kind}
    hits: dict[str, int] = field(default_factory=dict)
    fired: list[tuple[str, int, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """`site@N=kind[,site@N=kind...]` (N counts from 1); ValueError naming what is wrong."""
        plan = cls()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if part == "none":  # a server that takes plans later (lsp_server/features.py debug_faults)
                continue
            m = _SPEC.match(part)
            if m is None:
                raise ValueError(f"{ENV}: {part!r} is not site@N=kind (e.g. replay@3=cuda)")
            site, n, kind = m["site"], int(m["n"]), m["kind"]
            if site not in SITES or kind not in KINDS or n < 1:
                raise ValueError(f"{ENV}: {part!r}: sites are {SITES}, kinds {KINDS}, N >= 1")
            if (kind == "mismatch") != (site == "tokenize"):
                raise ValueError(f"{ENV}: {part!r}: 'mismatch' is the tokenize site's kind, and its only one")
            plan.faults.setdefault(site, {})[n] = kind
        return plan

    def hit(self, site: str) -> str | None:
        """Count a hit of `site`; the kind of fault due now, if any (raised here unless "mismatch")."""
        n = self.hits[site] = self.hits.get(site, 0) + 1
        kind = self.faults.get(site, {}).get(n)
        if kind is None:
            return None
        self.fired.append((site, n, kind))
        if kind == "mismatch":
            return kind
        raise make_error(kind, site, n)


def make_error(kind: str, site: str, n: int) -> Exception:
    """The exception a fault of `kind` raises (the types a real one of that kind has)."""
    import torch

    where = f"at {site} #{n} (injected by {ENV})"
    if kind == "oom":
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB {where}")
    if kind == "cuda":
        return torch.AcceleratorError(f"CUDA error: an illegal memory access was encountered {where}")
    return RuntimeError(f"engine failure {where}")


_lock = threading.Lock()
_plan: FaultPlan | None = None


def install(plan: FaultPlan | None) -> FaultPlan | None:
    """Make `plan` the active one (None: no faults); returns the one it replaces."""
    global _plan
    with _lock:
        old, _plan = _plan, plan
    return old


def active() -> FaultPlan | None:
    """The plan in force (None: no faults)."""
    return _plan


def hit(site: str) -> str | None:
    """Called at each site: counts it and raises (or returns "mismatch") when a fault is due."""
    plan = _plan
    if plan is None:
        return None
    with _lock:
        return plan.hit(site)


if os.environ.get(ENV):
    install(FaultPlan.parse(os.environ[ENV]))
