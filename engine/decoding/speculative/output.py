"""Emitted ids through engine.generate.decode's rules (heal, stop id, line, length), and where
drafts stop being useful.

Part of engine/decoding/speculative (the package docstring has the data flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editkv.engine.generate import LineStopper, StopRules
from editkv.engine.healing import healer_for
from editkv.engine.tokenizer import Tokenizer


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


class Output:
    """Emitted ids through engine.generate.decode's rules, in its order: heal, stop id, line, length.

    Line ends are counted per emitted token (`LineStopper.line_ends`), as `DraftCut` counts
    them, instead of decoding all ids at each token as `LineStopper.cut` does.
    """

    def __init__(self, tokenizer: Tokenizer, rules: StopRules, heal: bytes) -> None:
        self.tokenizer = tokenizer
        self.rules = rules
        self.stop_ids = rules.stop_set(tokenizer)
        self.stopper = LineStopper(tokenizer, rules.max_lines)
        self.healer = healer_for(tokenizer)
        self.remaining = heal
        self.ids: list[int] = []
        self.lines = 0  # line ends in the emitted ids' text
        self.in_line = 0  # emitted ids since the last line end (counted under a line rule)
        self.logprob = 0.0
        self.reason: str | None = None

    def emit(self, tokens: Sequence[int], logprobs: Sequence[float]) -> int:
        """Append tokens until a rule fires; returns how many were appended."""
        max_lines = self.rules.max_lines
        for n, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            if self.remaining:
                self.remaining = self.healer.advance(self.remaining, token)
            if token in self.stop_ids:
                self.reason = "stop_token"
                return n
            self.logprob += logprob
            self.ids.append(token)
            if max_lines is not None or self.rules.lines_until is not None:
                ends = self.stopper.line_ends(token)
                self.lines += ends
                self.in_line = 0 if ends else self.in_line + 1
                if max_lines is not None and self.lines >= max_lines:
                    self.reason = "lines"
                    return n + 1
                if ends and self.stopper.out_of_time(self.rules.lines_until, self.ids, self.lines):
                    self.reason = "lines"
                    return n + 1
            if len(self.ids) >= self.rules.max_tokens:
                self.reason = "max_tokens"
                return n + 1
        return len(tokens)

    def cut(self) -> DraftCut:
        lines_left = None if self.rules.max_lines is None else self.rules.max_lines - self.lines
        return DraftCut(self.stop_ids, self.healer.token_bytes, lines_left)

    def text(self, heal: bytes) -> str:
        text = self.stopper.cut(self.ids)[0]
        healed = heal.decode("utf-8", errors="replace")
        return text[len(healed):] if text.startswith(healed) else text


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
