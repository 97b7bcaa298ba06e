"""Drafts -> suggestions: line/block ends, overlap with the text after the cursor, ranking."""

import pytest
from editkv.lsp_server.postprocess import CursorContext, error_count, finish, trim, wants_multiline


def ctx(marked: str, *, multiline: bool = False, python: bool = True, max_lines: int = 8) -> CursorContext:
    """A context from text with `|` at the cursor."""
    i = marked.index("|")
    return CursorContext(marked.replace("|", "", 1), i, python=python, multiline=multiline, max_lines=max_lines)


def test_single_line_stops_at_line_end():
    assert trim("x + 1\n    y = 2", ctx("def f(x):\n    return |\n")) == "x + 1"


@pytest.mark.parametrize(("rest", "draft", "want"), [
    (")", "x)", "x"),  # the closing bracket is already there
    ("):", "x, y):", "x, y"),
    ("):", "x, y)", "x, y"),  # a prefix of the rest made of closers
    (")", "x) + 1", "x) + 1"),  # not at the end: kept (ranking decides)
    (" + b", "a + b", "a"),
])
def test_text_already_after_the_cursor_is_cut(rest, draft, want):
    assert trim(draft, ctx(f"y = f(|{rest}\n")) == want


def test_multiline_block_ends_by_tree_sitter():
    c = ctx("class A:\n    def f(self):|\n\n    def g(self):\n        pass\n", multiline=True)
    draft = "\n        x = 1\n        return x\n\n    def h(self):\n        pass"
    assert trim(draft, c) == "\n        x = 1\n        return x"


def test_tree_sitter_follows_brackets_that_indentation_would_cut():
    c = ctx("def f():\n    |\n", multiline=True)
    draft = "total = add(1,\n2)\n    return total\n\ndef g():\n    pass"
    assert trim(draft, c) == "total = add(1,\n2)\n    return total"
    # indentation rules alone stop at the dedented continuation line
    c_text = ctx("def f():\n    |\n", multiline=True, python=False)
    assert trim(draft, c_text) == "total = add(1,"


def test_statements_in_a_body_continue_until_the_block_ends():
    c = ctx("def f(x):\n    |\n\ndef g():\n    pass\n", multiline=True)
    assert trim("y = x + 1\n    return y\n\ndef h():\n    pass", c) == "y = x + 1\n    return y"


def test_top_level_definition_is_one_block():
    c = ctx("import os\n|\n", multiline=True)
    assert trim("def count(self):\n    return 1\n\ndef other():\n    pass\n", c) == "def count(self):\n    return 1"


def test_indentation_rules_for_other_languages():
    c = ctx("function f() {|\n}\n", multiline=True, python=False)
    assert trim("\n  return 1;\n}\nfunction g() {}", c) == "\n  return 1;"  # "}" repeats the next line
    c = ctx("if (x) {|\n", multiline=True, python=False)
    assert trim("\n  y();\n}\nz();", c) == "\n  y();\n}"


def test_lines_repeating_the_following_lines_are_dropped():
    c = ctx("def f(x):\n    |\n    return y\n", multiline=True)
    assert trim("y = x + 1\n    return y", c) == "y = x + 1"


def test_max_lines_caps_a_multiline_suggestion():
    c = ctx("def f():\n    |\n", multiline=True, max_lines=2)
    assert trim("a = 1\n    b = 2\n    c = 3\n    d = 4", c).count("\n") == 1


def test_undecodable_bytes_and_double_spaces_are_cleaned():
    assert trim("abc\ufffd\ufffd", ctx("x = |\n")) == "abc"
    assert trim(" 1", ctx("x = |\n")) == "1"


def test_finish_dedupes_drops_empty_and_prefers_drafts_that_parse():
    c = ctx("def f(x):\n    return |\n")
    out = finish([("x +", -0.1), ("x + 1", -2.0), ("x + 1 ", -3.0), ("", 0.0), ("   ", 0.0)], c)
    assert [s.text for s in out] == ["x + 1", "x +"]  # the better-scored draft breaks the tree
    assert [s.parses for s in out] == [True, False]


def test_parse_check_compares_with_the_document_as_it_is():
    # the line is already broken before the cursor: a draft that doesn't fix it still "parses"
    c = ctx("def f(x:\n    return |\n")
    assert finish([("x", 0.0)], c)[0].parses
    assert error_count(b"def f(:\n  pass\n") > 0 and error_count(b"def f():\n  pass\n") == 0


def test_crlf_documents_get_crlf_suggestions():
    c = ctx("x = 1\r\ndef f():|\r\n    pass\r\n", multiline=True)
    assert finish([("\n    return 1\n", 0.0)], c)[0].text == "\r\n    return 1"


@pytest.mark.parametrize(("marked", "want"), [
    ("def f():|\n", True), ("    |\n", True), ("|", True),
    ("x = f(|)\n", False), ("    x = |\n", False),
])
def test_auto_multiline_policy(marked, want):
    assert wants_multiline("auto", ctx(marked)) is want
    assert wants_multiline("never", ctx(marked)) is False
    assert wants_multiline("always", ctx(marked)) is True


def test_big_files_parse_a_window_only():
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(3000))
    text = body + "def target():\n    return |\n" + body
    c = ctx(text)
    assert finish([("1", 0.0)], c)[0].parses
