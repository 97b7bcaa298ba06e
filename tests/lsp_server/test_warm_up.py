"""The warm-up at load (lsp_server/warm_up.py) through a real ModelBackend on the GPU's cache layout.

On the CPU the graph path runs as the static forward (the same shapes and graph keys, run eagerly,
EDITKV_KV_POOL=1 for the pool every document shares): after the warm-up a user's session in a
file of a warmed bucket takes no graph it did not already have, where without it the same session
takes several; and the warm-up leaves no trace but the graphs.
"""

import pytest
from editkv.edit_cache.positions import Position, Range
from editkv.engine.loading import load_model
from editkv.lsp_server import warm_up
from editkv.lsp_server.backend import CompletionRequest, ModelBackend

MAX_WIDTH = 64  # (the GPU's is 256) fewer, narrower shapes: the static forward is slow on the CPU
TEXT = '''import json


def load(path):
    """Read the items of a JSON file."""
    with open(path) as f:
        return json.load(f)


class Inventory:
    def __init__(self, items):
        self.items = list(items)

    def total(self):
        return sum(item["price"] * item["count"] for item in self.items)

    def names(self):
        return sorted(item["name"] for item in self.items)
'''


@pytest.fixture
def static_backend(monkeypatch):
    """make() -> (a ModelBackend over the default model whose forwards take the static (graph) path,
    with the pool; its static forward), each over a fresh static forward and pool."""
    monkeypatch.setenv("EDITKV_KV_POOL", "1")
    loaded = load_model(None)
    made = []

    def make():
        for old in made:
            old.release()
        static = loaded.runner.enable_graphs(mode="static", max_width=MAX_WIDTH)
        backend = ModelBackend(loaded, budget_bytes=32 << 20)
        assert loaded.runner.kv_pool is not None
        made.append(backend)
        return backend, static

    yield make
    for old in made:
        old.release()


def _session(backend) -> tuple[list[int], list[list[str]]]:
    """A user's session in a ~200-token file: a suggestion, typing a line, a paste, the dropdown;
    the graphs each request captured, and its suggestions."""
    uri = "file:///inventory.py"
    backend.open(uri, TEXT)
    lines = TEXT.split("\n")
    line = next(i for i, t in enumerate(lines) if t.startswith("        return sum"))
    captured, answers = [], []

    def ask(at: Position, drafts: int = 1) -> None:
        result = backend.complete(CompletionRequest(uri, at.line, at.character, max_tokens=12, num_drafts=drafts))
        captured.append(result.stats["graph_captures"])
        answers.append([d.text for d in result.drafts])

    end = Position(line, len(lines[line]))
    ask(end)
    typed = "\n        count = len(self.items)"
    at = end
    for ch in typed:
        backend.change(uri, [(Range(at, at), ch)], "utf-32")
        at = Position(at.line + 1, 0) if ch == "\n" else Position(at.line, at.character + 1)
        ask(at)
    paste = "\n        assert count >= 0, 'no items'\n        values = [item['price'] for item in self.items]"
    backend.change(uri, [(Range(at, at), paste)], "utf-32")
    last = paste.split("\n")[-1]
    at = Position(at.line + paste.count("\n"), len(last))
    ask(at)
    ask(at, drafts=3)
    backend.close(uri)
    return captured, answers


def test_after_the_warm_up_a_session_captures_no_graph_and_gets_the_same_suggestions(static_backend):
    backend, static = static_backend()
    report = backend.warm_up(max_bucket=1024)
    pastes = len([w for w, rows in warm_up.shapes(MAX_WIDTH) if rows == "none"])  # one per repair width
    assert report["buckets"] == [1024] and report["requests"] == pastes + 3 and not report["stopped"]
    assert report["graphs"] == static.captures >= len(warm_up.shapes(MAX_WIDTH))
    # no trace of the made-up files but the graphs
    assert not backend.cache.docs and not backend.index.docs and backend.encoded_tokens == 0
    assert not backend.speculator.recent and backend.speculator.line_tokens is None
    captured, warm = _session(backend)
    assert captured and sum(captured) == 0, captured
    # (and without the warm-up the same session takes several graphs, for the same suggestions)
    backend, static = static_backend()
    captured, cold = _session(backend)
    assert sum(captured) >= 3 and static.captures == sum(captured)
    assert warm == cold and any(any(texts) for texts in warm)


def test_files_longer_than_the_models_context_find_their_graphs_warmed(static_backend):
    # A file longer than the model's context attends to a window of it, but its forwards reach the
    # slots past the context in its region: the buckets to warm are not capped by the context.
    backend, static = static_backend()
    config = backend.loaded.config  # (frozen: set and put back by hand)
    context = config.max_position_embeddings
    object.__setattr__(config, "max_position_embeddings", 64)
    try:
        assert len(backend.loaded.tokenizer.encode(TEXT)) > 64
        report = backend.warm_up(max_bucket=1024)
        assert report["buckets"] == [1024] and report["graphs"] > 0
        captured, answers = _session(backend)
    finally:
        object.__setattr__(config, "max_position_embeddings", context)
    assert sum(captured) == 0, captured
    assert any(any(texts) for texts in answers)


@pytest.mark.gpu
def test_after_the_warm_up_a_session_captures_no_cuda_graph():
    """On a GPU, real graphs: the warm-up captures them, and the session replays only those."""
    loaded = load_model(None, device="cuda")
    backend = ModelBackend(loaded)
    try:
        assert backend.graphs_replay() and loaded.runner.kv_pool is not None
        report = backend.warm_up(max_bucket=2048)
        assert report["buckets"] == [1024, 2048] and report["graphs"] > 2 * len(warm_up.shapes(256))
        captured, answers = _session(backend)
        assert sum(captured) == 0 and any(any(texts) for texts in answers)
    finally:
        backend.release()


def test_the_warm_up_stops_between_buckets_when_told_or_past_its_time(static_backend):
    backend, static = static_backend()
    assert backend.warm_up(max_seconds=0) == {"buckets": [], "requests": 0, "graphs": 0,
                                              "ms": backend.warm_up_report["ms"], "stopped": True}
    assert backend.warm_up(should_stop=lambda: True)["stopped"] and static.captures == 0


def test_shapes_cover_every_forward_kind():
    got = warm_up.shapes(256)
    assert (1, "none") in got and (1, "all") in got and (1, "last") not in got  # one row: "last" is "all"
    assert {w for w, rows in got if rows == "none"} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert {w for w, rows in got if rows == "all"} == {1, 2, 4, 8, 16}


def test_paste_text_fits_its_token_count():
    loaded = load_model(None)
    for tokens in (1, 2, 5, 17, 65, 129):
        text = warm_up.paste_text(loaded.tokenizer, tokens)
        count = len(loaded.tokenizer.encode(text))
        assert count <= tokens and (tokens == 1 or count > tokens // 2), (tokens, count)
