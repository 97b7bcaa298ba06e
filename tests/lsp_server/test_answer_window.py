"""A big file just opened is answered from a window around the cursor (lsp_server/backend.py WINDOW)
while background work encodes it; the default model on the CPU, through a ModelBackend."""

import pytest
from editkv.edit_cache.positions import Position, Range, to_position
from editkv.engine.loading import load_model
from editkv.lsp_server.backend import WINDOW, CompletionRequest, ModelBackend
from editkv.lsp_server.settings import Settings
from editkv.lsp_server.worker import cache_options

URI = "file:///big.py"


def _function(i: int) -> str:
    return (f"def measure_{i}(values, scale={i % 5 + 1}):\n"
            f"    \"\"\"The scaled sum of values above {i % 9}.\"\"\"\n"
            f"    total = 0\n"
            f"    for value in values:\n"
            f"        if value > {i % 9}:\n"
            f"            total += value * scale\n"
            f"    return total\n\n\n")


TEXT = "import math\n\n\n" + "".join(_function(i) for i in range(160))


@pytest.fixture(scope="module")
def loaded():
    return load_model(None)


def _ask(backend, text, cursor, **kw):
    pos = to_position(text, cursor)
    return backend.complete(CompletionRequest(URI, pos.line, pos.character, max_tokens=12, **kw))


def test_a_big_file_is_answered_from_a_window_until_its_text_has_keys(loaded):
    before, after = WINDOW["cpu"]
    backend = ModelBackend(loaded)
    backend.open(URI, TEXT)
    doc = backend.cache.get(URI)
    cursor = TEXT.index("def measure_120(") + len("def measure_120(")
    upto = doc.tokens.first_token_at_or_after(cursor)
    assert upto > 2 * (before + after)
    first = _ask(backend, TEXT, cursor)
    window, lo, line = backend._windows[URI]
    assert 0 < first.stats["window_tokens"] == len(window.ids) <= before + after + 100
    assert first.stats["encoded_tokens"] < upto / 2 and doc.frontier == 0 and doc.cache is not None
    assert window.text == TEXT[lo : lo + len(window.text)] and TEXT[:lo].count("\n") == line
    # exactly what a file holding only the window's text answers
    alone = ModelBackend(loaded)
    alone.open(URI, window.text)
    assert [d.text for d in first.drafts] == [d.text for d in _ask(alone, window.text, cursor - lo).drafts]

    # typing inside the window edits the window (kept), in step with the file
    text, at = TEXT, cursor
    for ch in "data":
        pos = to_position(text, at)
        backend.change(URI, [(Range(pos, pos), ch)], "utf-16")
        text, at = text[:at] + ch + text[at:], at + 1
        answer = _ask(backend, text, at)
        assert answer.stats["window_tokens"] and backend._windows[URI][0] is window
    assert window.text == text[lo : lo + len(window.text)] and backend.cache.get(URI).text == text

    # with most of the text before the cursor encoded in the background, the window still serves
    # (no request encodes more than a few chunks of the file itself) ...
    doc = backend.cache.get(URI)
    upto = doc.tokens.first_token_at_or_after(at)
    while upto - doc.frontier > 600:
        assert backend.refresh_idle(256, lambda: False)
    middle = _ask(backend, text, at)
    assert middle.stats["window_tokens"] and middle.stats["document_encoded_tokens"] < 50
    # ... and once it has encoded the file, requests use its own cache
    while backend.refresh_idle(256, lambda: False):
        pass
    again = _ask(backend, text, at)
    assert again.stats["window_tokens"] == 0 and URI not in backend._windows


def test_an_edit_outside_the_window_drops_it_and_small_files_never_take_one(loaded):
    backend = ModelBackend(loaded)
    backend.open(URI, TEXT)
    cursor = TEXT.index("def measure_120(")
    _ask(backend, TEXT, cursor)
    assert URI in backend._windows
    backend.change(URI, [(Range(Position(0, 0), Position(0, 0)), "# top\n")], "utf-16")  # above it
    assert URI not in backend._windows
    text = "# top\n" + TEXT
    answer = _ask(backend, text, cursor + 6)  # a new window where the cursor is
    window, lo, _ = backend._windows[URI]
    assert answer.stats["window_tokens"] and window.text == text[lo : lo + len(window.text)]

    small = TEXT[: TEXT.index("def measure_20(")]
    backend.open(URI, small)
    assert _ask(backend, small, len(small)).stats["window_tokens"] == 0 and URI not in backend._windows


def test_the_window_setting(loaded):
    """`windowTokens`: unset the device's, a size (a quarter of it after the cursor), 0 none; a new
    value drops the windows held."""
    assert ModelBackend(loaded, **cache_options(Settings())).window == WINDOW["cpu"]
    backend = ModelBackend(loaded, **cache_options(Settings(window_tokens=512)))
    assert backend.window == (512, 128)
    backend.open(URI, TEXT)
    answer = _ask(backend, TEXT, TEXT.index("def measure_120("))
    assert 0 < answer.stats["window_tokens"] < 512 + 128 + 60 and URI in backend._windows
    backend.configure(**cache_options(Settings(window_tokens=0)))
    assert backend.window is None and not backend._windows
    assert _ask(backend, TEXT, TEXT.index("def measure_120(")).stats["window_tokens"] == 0
