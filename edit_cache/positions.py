"""LSP positions (line, character in UTF-16/UTF-8/UTF-32 units) <-> Python str indices.

Lines end at `\\r\\n`, `\\r` or `\\n` (LSP's terminators); a text ending in a terminator has a
final empty line. A character past the end of its line means the end of the line (LSP says
so); a line past the end of the text is an error. A position inside a surrogate pair or a
UTF-8 sequence snaps to the start of that character.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

_TERMINATOR = re.compile(r"\r\n|\r|\n")
ENCODINGS = ("utf-16", "utf-8", "utf-32")


class PositionError(ValueError):
    """A position or range that does not exist in the document."""


@dataclass(frozen=True)
class Position:
    """0-based line and character, in the negotiated position encoding's code units."""

    line: int
    character: int


@dataclass(frozen=True)
class Range:
    """`[start, end)` between two positions."""

    start: Position
    end: Position


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, token ids) `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def common_suffix(a: Sequence, b: Sequence) -> int:
    """How many trailing items `a` and `b` share."""
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def line_starts(text: str) -> list[int]:
    """str index where each line begins (LSP terminators)."""
    return [0] + [m.end() for m in _TERMINATOR.finditer(text)]


def _units(ch: str, encoding: str) -> int:
    code = ord(ch)
    if encoding == "utf-16":
        return 2 if code > 0xFFFF else 1
    if encoding == "utf-8":
        return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
    return 1


def _line_text(text: str, starts: list[int], line: int) -> str:
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    body = text[starts[line] : end]
    return body.rstrip("\r\n") if line + 1 < len(starts) else body


def to_offset(text: str, pos: Position, encoding: str = "utf-16", starts: list[int] | None = None) -> int:
    """str index of an LSP position."""
    starts = starts if starts is not None else line_starts(text)
    if pos.line < 0 or pos.character < 0:
        raise PositionError(f"negative position {pos.line}:{pos.character}")
    if pos.line >= len(starts):
        raise PositionError(f"line {pos.line} is past the end of the document ({len(starts)} lines)")
    body = _line_text(text, starts, pos.line)
    if encoding == "utf-32":
        return starts[pos.line] + min(pos.character, len(body))
    units = 0
    for i, ch in enumerate(body):
        step = _units(ch, encoding)
        if units + step > pos.character:
            return starts[pos.line] + i
        units += step
    return starts[pos.line] + len(body)


def to_position(text: str, offset: int, encoding: str = "utf-16", starts: list[int] | None = None) -> Position:
    """LSP position of a str index."""
    starts = starts if starts is not None else line_starts(text)
    offset = max(0, min(offset, len(text)))
    line = bisect.bisect_right(starts, offset) - 1
    prefix = text[starts[line] : offset]
    if encoding == "utf-32":
        return Position(line, len(prefix))
    return Position(line, sum(_units(ch, encoding) for ch in prefix))


def apply_change(text: str, rng: Range | None, new_text: str, encoding: str = "utf-16") -> tuple[str, int, int]:
    """Apply one LSP content change; returns (new text, start index, old end index).

    `rng=None` replaces the whole document.
    """
    if rng is None:
        return new_text, 0, len(text)
    starts = line_starts(text)
    start = to_offset(text, rng.start, encoding, starts)
    end = to_offset(text, rng.end, encoding, starts)
    if end < start:
        raise PositionError(
            f"range end {rng.end.line}:{rng.end.character} is before its start "
            f"{rng.start.line}:{rng.start.character}"
        )
    return text[:start] + new_text + text[end:], start, end
