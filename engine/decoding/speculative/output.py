"""Where drafts stop being useful, and how many tokens a request is expected to take still
(emitted ids go through engine.generate.Output, the one set of output rules).

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editkv.engine.generate import Output


@dataclass
class DraftCut:
    """Where drafts stop being useful: after a stop token, or after the line the rules end on."""

    stop_ids: frozenset[int]
    token_bytes: dict[int, bytes]
    lines_left: int | None

    def length(self, tokens: Sequence[int]) -> int:
        end = self.ends_at(tokens)
        return len(tokens) if end is None else end + 1

    def ends_at(self, tokens: Sequence[int]) -> int | None:
        """Index of the first token that ends the output (a stop token, the last line's end)."""
        lines = 0
        for j, t in enumerate(tokens):
            if t in self.stop_ids:
                return j
            if self.lines_left is not None:
                lines += self.token_bytes.get(t, b"").count(b"\n")
                if lines >= self.lines_left:
                    return j
        return None


def draft_cut(out: Output) -> DraftCut:
    """Where drafts stop being useful after what `out` has emitted."""
    lines_left = None if out.rules.max_lines is None else out.rules.max_lines - out.lines
    return DraftCut(out.stop_ids, out.healer.token_bytes, lines_left)


def tokens_left(out: Output, line_tokens: float | None) -> float:
    """Tokens the request is expected to take still: its token budget, or under a line rule,
    the lines left at the length lines have been running (`Speculator.line_tokens`); a line
    already longer than that is expected to run on by half what it has (so a long line costs
    a few chains, not one per verification)."""
    left = out.rules.max_tokens - len(out.ids)
    if out.rules.max_lines is None or line_tokens is None:
        return left
    lines_left = out.rules.max_lines - out.lines
    return min(left, max(1.0, lines_left * line_tokens - out.in_line, out.in_line / 2))
