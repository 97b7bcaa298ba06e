"""Model drafts -> suggestions an editor can show as they are.

raw draft -> clean (undecodable bytes, line endings) -> cut at the end of the line, or of the
block for multi-line suggestions (tree-sitter for Python, indentation otherwise) -> cut what
repeats the text after the cursor -> drop empty ones and duplicates -> rank: drafts that keep
the file's syntax tree as healthy as it was first (Python), then by model score.

Pure functions of (document text, cursor, draft): no model, no LSP types. Offsets are str
indices; tree-sitter works in UTF-8 bytes, converted here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

OPENERS = (":", "{", "(", "[")
CLOSERS = ("}", ")", "]")
_CLOSING_CHARS = set(")]}>'\":;,")
_TERMINATOR = re.compile(r"\r\n|\r|\n")
_PY_COMPOUND = {
    "function_definition", "class_definition", "decorated_definition", "if_statement", "for_statement",
    "while_statement", "try_statement", "with_statement", "match_statement",
}
WINDOW_LINES = 300


@dataclass(frozen=True)
class CursorContext:
    """Where a suggestion goes: the document, the cursor (str index) and the policy."""

    text: str
    cursor: int
    python: bool = False
    multiline: bool = False
    max_lines: int = 8

    @functools.cached_property
    def line_start(self) -> int:
        return max(self.text.rfind("\n", 0, self.cursor), self.text.rfind("\r", 0, self.cursor)) + 1

    @functools.cached_property
    def before(self) -> str:
        """The cursor's line up to the cursor."""
        return self.text[self.line_start : self.cursor]

    @functools.cached_property
    def after(self) -> str:
        """The cursor's line from the cursor on, without its terminator."""
        m = _TERMINATOR.search(self.text, self.cursor)
        return self.text[self.cursor : m.start() if m else len(self.text)]

    @functools.cached_property
    def eol(self) -> str:
        m = _TERMINATOR.search(self.text)
        return m.group(0) if m else "\n"

    def following_lines(self, n: int) -> list[str]:
        """Up to `n` non-blank lines after the cursor's line, stripped."""
        m = _TERMINATOR.search(self.text, self.cursor)
        out: list[str] = []
        pos = m.end() if m else len(self.text)
        while m is not None and len(out) < n:
            m = _TERMINATOR.search(self.text, pos)
            line = self.text[pos : m.start() if m else len(self.text)]
            if line.strip():
                out.append(line.strip())
            pos = m.end() if m else len(self.text)
        return out


@dataclass(frozen=True)
class Suggestion:
    """A finished suggestion: text to insert at the cursor, its score, whether it parses."""

    text: str
    score: float
    parses: bool = True


def is_python(uri: str, language_id: str | None) -> bool:
    """Whether tree-sitter Python applies to a document."""
    return (language_id or "").lower() == "python" or uri.endswith((".py", ".pyi"))


def wants_multiline(policy: str, ctx: CursorContext) -> bool:
    """"auto": several lines only at the end of a line that is blank or opens a block."""
    if policy == "never":
        return False
    if policy == "always":
        return True
    if ctx.after.strip():
        return False
    before = ctx.before.rstrip()
    return not before or before.endswith(OPENERS)


def finish(drafts: list[tuple[str, float]], ctx: CursorContext) -> list[Suggestion]:
    """Trim, dedupe and rank raw (text, score) drafts; best first."""
    baseline = _error_count_at(ctx, "") if ctx.python else 0
    out: list[Suggestion] = []
    seen: set[str] = set()
    for raw, score in drafts:
        text = trim(raw, ctx)
        key = text.strip()
        if not key or key in seen:
            continue
        seen.add(key)
        parses = _error_count_at(ctx, text) <= baseline if ctx.python else True
        out.append(Suggestion(text.replace("\n", ctx.eol) if ctx.eol != "\n" else text, score, parses))
    out.sort(key=lambda s: (not s.parses, -s.score))
    return out


def trim(draft: str, ctx: CursorContext) -> str:
    """One draft cut to what should be inserted at the cursor (with "\\n" line ends)."""
    text = draft.replace("\r\n", "\n").replace("\r", "\n")
    bad = text.find("\ufffd")  # a byte sequence the tokenizer could not decode: garbage from here
    if bad >= 0:
        text = text[:bad]
    text = text.replace("\x00", "")
    if ctx.before and ctx.before[-1] in " \t" and ctx.before.strip() and text[:1] in (" ", "\t"):
        text = text.lstrip(" \t")
    if not ctx.multiline:
        text = text.split("\n", 1)[0]
    else:
        cut = _python_block_end(ctx, text) if ctx.python else None
        text = cut if cut is not None else cut_block_by_indent(ctx.before, text, ctx.max_lines)
        lines = text.split("\n")
        text = "\n".join(lines[: ctx.max_lines])
    text = cut_overlap(text, ctx)
    lines = text.split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines).rstrip(" \t")


def cut_overlap(text: str, ctx: CursorContext) -> str:
    """Drop the end of `text` that repeats what already follows the cursor."""
    lines = text.split("\n")
    if len(lines) > 1:
        following = ctx.following_lines(len(lines))
        for j in range(1, len(lines)):
            tail = [line.strip() for line in lines[j:] if line.strip()]
            if tail and tail == following[: len(tail)]:
                lines = lines[:j]
                break
    rest = ctx.after.strip()
    if rest:
        last = lines[-1].rstrip()
        for k in range(len(rest), 0, -1):
            piece = rest[:k]
            if k < len(rest) and not set(piece) <= _CLOSING_CHARS:
                continue
            if last.endswith(piece):
                last = last[: len(last) - k].rstrip(" \t") if len(lines) == 1 else last[: len(last) - k]
                break
        lines[-1] = last
    return "\n".join(lines)


def _indent(line: str) -> int:
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip())


def cut_block_by_indent(before: str, text: str, max_lines: int) -> str:
    """Keep the first line and the block it opens (or the statements at its level)."""
    lines = text.split("\n")
    first = before + lines[0]
    base = _indent(first) if first.strip() else len(before.expandtabs(8))
    opens = first.rstrip().endswith(OPENERS)
    kept = [lines[0]]
    deeper = False
    for line in lines[1:]:
        if len(kept) >= max_lines:
            break
        if not line.strip():
            kept.append(line)
            continue
        ind = _indent(line)
        if ind > base:
            deeper = True
            kept.append(line)
        elif ind == base and not (opens or deeper):
            kept.append(line)
        elif ind == base and line.lstrip().startswith(CLOSERS):
            kept.append(line)
            break
        else:
            break
    return "\n".join(kept)


# ---- tree-sitter (Python) ---------------------------------------------------------------------


@functools.cache
def _parser():
    import tree_sitter
    import tree_sitter_python

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))


_CONTINUATION = re.compile(r"[ \t\r\n#)\]}]|(else|elif|except|finally|case)\b")


def _top_level_at(text: str, pos: int) -> bool:
    """Whether the line starting at `pos` starts a new top-level statement."""
    return pos >= len(text) or not _CONTINUATION.match(text, pos)


def _window(text: str, cursor: int, lines: int = WINDOW_LINES) -> tuple[int, int]:
    """Whole top-level statements around the cursor, about `lines` lines each way: big files parse fast."""
    start = text.rfind("\n", 0, cursor) + 1
    n = 0
    while start > 0 and (n < lines or not _top_level_at(text, start)):
        start = text.rfind("\n", 0, start - 1) + 1
        n += 1
    end, n = cursor, 0
    while True:
        nl = text.find("\n", end)
        if nl < 0:
            return start, len(text)
        end, n = nl + 1, n + 1
        if n >= lines and _top_level_at(text, end):
            return start, end


def error_count(source: bytes) -> int:
    """ERROR and MISSING nodes in the parse of `source` (Python)."""
    tree = _parser().parse(source)
    count = 0
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            count += 1
        if node.has_error:
            stack.extend(node.children)
    return count


def _error_count_at(ctx: CursorContext, insertion: str) -> int:
    start, end = _window(ctx.text, ctx.cursor)
    return error_count((ctx.text[start : ctx.cursor] + insertion + ctx.text[ctx.cursor : end]).encode())


def _python_block_end(ctx: CursorContext, text: str) -> str | None:
    """`text` cut where the statement (or block) it writes ends; None if the tree can't tell."""
    stripped = len(text) - len(text.lstrip())
    if stripped == len(text):
        return ""
    start, end = _window(ctx.text, ctx.cursor)
    head = ctx.text[start : ctx.cursor].encode()
    body = text.encode()
    source = head + body + ctx.text[ctx.cursor : end].encode()
    b0, b1 = len(head), len(head) + len(body)
    line_start = len(ctx.text[start : ctx.line_start].encode())
    p = b0 + len(text[:stripped].encode())
    tree = _parser().parse(source)
    node = tree.root_node.descendant_for_byte_range(p, p + 1)
    outer = None
    while node is not None and node.parent is not None:
        if node.is_error:
            return None
        if node.parent.type in ("block", "module") and node.start_byte >= line_start:
            outer = node
        node = node.parent
    if outer is None or outer.has_error:
        return None
    cut = outer.end_byte
    if outer.type not in _PY_COMPOUND:
        sibling = outer.next_named_sibling
        in_module = outer.parent.type == "module"
        while sibling is not None and sibling.start_byte < b1:
            if in_module and sibling.type in _PY_COMPOUND or sibling.has_error:
                break
            cut = sibling.end_byte
            sibling = sibling.next_named_sibling
    if cut >= b1:
        return text
    cut = max(cut, b0)
    return body[: cut - b0].decode("utf-8", errors="ignore")
