"""replay.editor_session: realedits records as an editor with auto-indent types them, and the lines to score."""

import pytest
from editkv.edit_cache.positions import Position, Range, apply_change
from editkv.lsp_server.replay import editor_session, record_session


def _record(before: str, *edits: tuple[tuple[int, int], tuple[int, int], str]) -> dict:
    """A realedits-shaped record; edits in list order (bottom to top), `after` computed."""
    after = before
    changes = []
    for start, end, text in edits:
        changes.append({"range": {"start": {"line": start[0], "character": start[1]},
                                  "end": {"line": end[0], "character": end[1]}}, "text": text})
        after = apply_change(after, Range(Position(*start), Position(*end)), text)[0]
    return {"id": "t/t@0:t.py", "repo": "t/t", "path": "t.py", "before": before, "after": after, "edits": changes}


def _replay(session) -> str:
    text = session.text
    for key in session.keys:
        text = apply_change(text, Range(Position(*key.start), Position(*key.end)), key.text)[0]
    return text


def _typed(session) -> list[str]:
    return [k.text if k.start == k.end else f"<{k.start}-{k.end}:{k.text!r}>" for k in session.keys]


def test_lines_inserted_in_a_block_are_typed_from_the_line_above_with_its_indentation():
    before = "def f(x):\n    a = 1\n    return a\n"
    rec = _record(before, ((2, 0), (2, 0), "    b = 2\n    c = 3\n"))
    s = editor_session(rec)
    assert _replay(s) == rec["after"]
    # Enter at the end of "    a = 1" brings its four spaces: no indentation is typed
    assert _typed(s) == ["\n    ", *"b = 2", "\n    ", *"c = 3"]
    assert s.keys[0].start == (1, 9) and s.keys[0].cursor == (2, 4) and s.keys[0].label == "⏎␣␣␣␣"
    assert [(p.key, p.line, p.expected) for p in s.probes] == [(0, 2, "b = 2"), (6, 3, "c = 3")]


def test_more_indentation_is_typed_and_less_is_one_deletion():
    before = "def f(x):\n    pass\n"
    rec = _record(before, ((1, 4), (1, 8), "if x:\n        return 1\n    return 2"))
    s = editor_session(rec)
    assert _replay(s) == rec["after"]
    keys = _typed(s)
    assert keys[0] == "<(1, 4)-(1, 8):''>"  # the old text, one keystroke
    enter = keys.index("\n    ")
    assert keys[enter + 1 : enter + 5] == [" "] * 4  # 4 -> 8: typed
    assert "<(3, 4)-(3, 8):''>" in keys  # 8 -> 4: the surplus deleted at once
    expected = [(p.line, p.expected) for p in s.probes]
    assert expected == [(1, "if x:"), (2, "return 1"), (3, "return 2")]
    assert s.probes[0].key == 0  # the deletion leaves the cursor at the end of the indentation
    assert s.keys[s.probes[1].key].text == " " and s.keys[s.probes[1].key].cursor == (2, 8)
    assert s.keys[s.probes[2].key].cursor == (3, 4) and s.keys[s.probes[2].key].end == (3, 8)


def test_a_blank_line_costs_one_enter_that_trims_the_auto_indentation():
    before = "class A:\n    x = 1\n"
    rec = _record(before, ((2, 0), (2, 0), "\n    y = 2\n"))
    s = editor_session(rec)
    assert _replay(s) == rec["after"] and "\n\n    y = 2\n" in rec["after"]
    keys = _typed(s)
    # Enter (auto-indent 4), Enter again on the still-empty line: its 4 spaces go in the same change
    assert keys[:2] == ["\n    ", "<(2, 0)-(2, 4):'\\n    '>"]
    assert keys[2:] == list("y = 2")
    assert [(p.key, p.expected) for p in s.probes] == [(1, "y = 2")]


def test_text_ending_in_a_line_break_at_the_top_deletes_the_last_auto_indentation():
    before = "    x = 1\n"
    rec = _record(before, ((0, 0), (0, 0), "    y = 2\n"))  # line 0: there is no line above to start from
    s = editor_session(rec)
    assert _replay(s) == rec["after"] == "    y = 2\n    x = 1\n"
    assert _typed(s) == [*"    y = 2", "\n    ", "<(1, 0)-(1, 4):''>"]
    assert [(p.key, p.expected) for p in s.probes] == [(3, "y = 2")]  # after the 4th space


def test_mid_line_edits_blank_and_comment_lines_are_not_scored():
    before = "def f(x):\n    return x + 1\n"
    rec = _record(before, ((1, 15), (1, 16), "2  # two\n    # done\n\n    z"), ((0, 6), (0, 7), "y"))
    s = editor_session(rec)
    assert _replay(s) == rec["after"]
    assert [(p.line, p.expected) for p in s.probes] == [(4, "z")]
    assert {k.hunk for k in s.keys} == {0, 1} and s.keys[-1].hunk == 1 and s.keys[-2].hunk == 1
    assert _typed(s)[-2:] == ["<(0, 6)-(0, 7):''>", "y"]  # the second edit typed after the first


def test_windows_line_breaks_are_kept():
    before = "if a:\r\n    b()\r\n"
    rec = _record(before, ((2, 0), (2, 0), "    c()\r\n"))
    s = editor_session(rec)
    assert _replay(s) == rec["after"] and s.keys[0].text == "\r\n    "


def test_every_record_keystroke_model_gives_the_same_text():
    before = "import os\n\n\ndef main():\n    print(os.getcwd())\n"
    rec = _record(before, ((4, 10), (4, 22), "sorted(os.listdir())"), ((3, 0), (3, 0), "# entry point\n"))
    assert _replay(editor_session(rec)) == _replay(record_session(rec)) == rec["after"]


def test_a_record_that_does_not_add_up_is_an_error():
    rec = _record("a = 1\n", ((0, 4), (0, 5), "2"))
    rec["after"] = "a = 3\n"
    with pytest.raises(ValueError, match="did not give its `after`"):
        editor_session(rec)
