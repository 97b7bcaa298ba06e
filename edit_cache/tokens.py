"""A document's token ids and character offsets, kept equal to a fresh tokenization across edits.

After a text edit only a window of whole lines around it is re-tokenized. Window edges sit
at the start of a line that holds non-whitespace: for the pre-tokenizers code models use
(Qwen2 / editkv style regexes) such a point is always a token boundary, so the window's
tokens are exactly what a fresh tokenization gives there. The tokenizer is probed once for
that property; one that fails it (e.g. GPT-2's regex, which glues a newline to the next
line's indentation) gets a whole-text re-tokenization instead. Either way the result is
diffed against the old ids to give the minimal changed span `TokenEdit(start, end, new_ids)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from editkv.engine import faults
from editkv.engine.tokenizer import Tokenizer

_CONTENT_LINE = re.compile(r"(?:\r\n|\r|\n)(?=[ \t\f\v]*[^\s])")
_HAS_CONTENT = re.compile(r"[ \t\f\v]*[^\s]")
_TERMINATOR = re.compile(r"\r\n|\r|\n")
_PROBES = [
    "def f(x):\n    return x\n\n\n    \nclass A:\n\tpass\r\n  y = 1\n",
    "a = [1,\n     2]\n# comment ✓ 😀\n\n\nb = 'x'\r\rc\n",
    "if x:\n    pass\n  \n\n  z\n",
]


@dataclass(frozen=True)
class TokenEdit:
    """Tokens `[start, end)` of the old sequence were replaced by `new_ids`."""

    start: int
    end: int
    new_ids: tuple[int, ...]

    @property
    def delta(self) -> int:
        return len(self.new_ids) - (self.end - self.start)


def _safe_points(text: str) -> list[int]:
    """Starts of lines holding non-whitespace (token boundaries for line-local tokenizers)."""
    return [m.end() for m in _CONTENT_LINE.finditer(text)]


def is_line_local(tokenizer: Tokenizer) -> bool:
    """Whether cutting text at the start of a non-blank line never changes its tokenization."""
    for probe in _PROBES:
        cuts = [0, *_safe_points(probe), len(probe)]
        pieces: list[int] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            pieces += tokenizer.encode(probe[a:b])
        if pieces != tokenizer.encode(probe):
            return False
    return True


class TokenizedText:
    """Text, its token ids and each token's start offset, updated edit by edit."""

    def __init__(self, tokenizer: Tokenizer, text: str, *, line_local: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.line_local = is_line_local(tokenizer) if line_local is None else line_local
        self.text = text
        enc = tokenizer.encode_with_offsets(text)
        self.ids: list[int] = enc.ids
        self.starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def token_at(self, offset: int) -> int:
        """Index of the first token that ends after `offset` (len(self) if none)."""
        ends = np.append(self.starts[1:], len(self.text))
        return int(np.searchsorted(ends, offset, side="right"))

    def first_token_at_or_after(self, offset: int) -> int:
        """Index of the first token starting at or after `offset`."""
        return int(np.searchsorted(self.starts, offset, side="left"))

    def update(self, new_text: str, start: int, old_end: int) -> TokenEdit | None:
        """The text changed from `self.text` to `new_text`, chars `[start, old_end)` replaced.

        Returns the minimal token edit (None when the ids did not change).
        """
        old_text = self.text
        new_end = old_end + len(new_text) - len(old_text)
        if self.line_local:
            window = self._window(old_text, new_text, start, old_end, new_end)
        else:
            window = None
        if window is None:
            ws, we_old, we_new = 0, len(old_text), len(new_text)
        else:
            ws, we_old, we_new = window
        # A character split over several byte-level tokens leaves zero-width pieces at its end,
        # so the text's end is not found by offset: take the ends by index.
        a = 0 if ws == 0 else self.first_token_at_or_after(ws)
        b = len(self.ids) if we_old >= len(old_text) else self.first_token_at_or_after(we_old)
        enc = self.tokenizer.encode_with_offsets(new_text[ws:we_new])
        new_ids = enc.ids
        if new_ids and faults.hit("tokenize") == "mismatch":  # an injected tokenizer bug: a wrong id
            new_ids = [(new_ids[0] + 1) % self.tokenizer.vocab_size, *new_ids[1:]]
        new_starts = np.array([s + ws for s, _ in enc.offsets], dtype=np.int64)
        shift = len(new_text) - len(old_text)
        old_ids = self.ids[a:b]
        old_starts = self.starts[a:b]
        # Trim the common prefix and suffix (same id at the same place in the text).
        lo = 0
        common = min(len(old_ids), len(new_ids))
        while lo < common and old_ids[lo] == new_ids[lo] and old_starts[lo] == new_starts[lo]:
            lo += 1
        hi = 0
        while (
            hi < min(len(old_ids), len(new_ids)) - lo
            and old_ids[-1 - hi] == new_ids[-1 - hi]
            and old_starts[-1 - hi] + shift == new_starts[-1 - hi]
        ):
            hi += 1
        self.text = new_text
        self.ids[a:b] = new_ids
        self.starts = np.concatenate([self.starts[:a], new_starts, self.starts[b:] + shift])
        replaced = tuple(new_ids[lo : len(new_ids) - hi])
        if lo == len(old_ids) - hi and not replaced:
            return None
        return TokenEdit(a + lo, b - hi, replaced)

    def _window(self, old: str, new: str, start: int, old_end: int, new_end: int) -> tuple[int, int, int] | None:
        """Whole-line window around the change: (start, old end, new end), or None for everything."""
        # Left edge: a safe point at least one line above the change; that line is unchanged,
        # so the point is a boundary of both tokenizations.
        line_start = _last_line_start(old, start)
        ws = _safe_point_before(old, line_start - 1) if line_start > 0 else 0
        # Right edge: a safe point past the end of the change's last line, in the new text;
        # the text from there on is the old text shifted.
        we_new = len(new)
        after = _TERMINATOR.search(new, new_end)
        if after is not None:
            m = _CONTENT_LINE.search(new, after.start())
            we_new = m.end() if m else len(new)
        we_old = we_new - (len(new) - len(old))
        # Both edges must be token starts of the old tokenization (or the text's ends).
        if not (ws == 0 or self._is_start(ws)) or not (we_old == len(old) or self._is_start(we_old)):
            return None
        return ws, we_old, we_new

    def _is_start(self, offset: int) -> bool:
        i = self.first_token_at_or_after(offset)
        return i < len(self.starts) and self.starts[i] == offset


def _last_line_start(text: str, pos: int) -> int:
    """Start of the line holding index `pos`."""
    return max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1


def _safe_point_before(text: str, pos: int) -> int:
    """The last start of a non-blank line at or before `pos` (0 if none)."""
    while pos > 0:
        line = _last_line_start(text, pos)
        if line == 0:
            return 0
        if _HAS_CONTENT.match(text, line) and not (text[line - 1] == "\r" and text.startswith("\n", line)):
            return line
        pos = line - 1
    return 0
