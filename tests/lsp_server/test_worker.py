"""The engine worker on its own: one thread for every backend call, stale jobs never reach the
backend, failures (loading, out of memory, bad changes) become messages, not crashes."""

import contextlib
import threading
import time

import pytest
from editkv.edit_cache.positions import Position, Range
from editkv.lsp_server.backend import CompletionResult, Draft, FakeBackend
from editkv.lsp_server.settings import Settings
from editkv.lsp_server.worker import EngineWorker, Job

URI = "file:///w/a.py"


class Clock:
    """The worker's clock in tests that move it by hand (idleness is measured on it)."""

    now = 1000.0

    def __call__(self):
        return self.now


class RecordingBackend(FakeBackend):
    """A FakeBackend that notes which thread made each call."""

    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.fail = fail
        self.dropped = False

    def open(self, uri, text):
        self.calls.append(("open", threading.get_ident()))
        super().open(uri, text)

    def change(self, uri, changes, encoding="utf-16"):
        self.calls.append(("change", threading.get_ident()))
        super().change(uri, changes, encoding)

    def close(self, uri):
        self.calls.append(("close", threading.get_ident()))
        super().close(uri)

    def complete(self, request, should_stop=lambda: False):
        self.calls.append(("complete", threading.get_ident()))
        if self.fail is not None:
            raise self.fail
        return super().complete(request, should_stop)

    def drop_caches(self):
        self.dropped = True


@pytest.fixture()
def worker():
    messages: list[tuple[str, str]] = []
    backend = RecordingBackend()
    w = EngineWorker(lambda settings: backend, lambda level, text: messages.append((level, text)))
    w.messages, w.fake = messages, backend
    assert w.load(Settings()).result(10) == (True, "fake backend")
    yield w
    w.stop()


@contextlib.contextmanager
def _serving_a_file(backend, settings: Settings, clock: Clock):
    """A worker on `backend` (its clock `clock`) with a 20-function file open and one completion
    on its third line answered (the text after the cursor left for background work): (worker,
    the backend's document)."""
    w = EngineWorker(lambda s: backend, lambda level, text: None, clock=clock)
    try:
        assert w.load(settings).result(30)[0]
        w.open(URI, "def add(a, b):\n    return a + b\n" * 20, "python").result(10)
        w.complete(job(0, line=2, character=4)).result(30)
        yield w, backend.cache.get(URI)
    finally:
        w.stop()


def _tiny_backend(tmp_path, settings: Settings):
    """A ModelBackend on a tiny random checkpoint, with `settings`' cache options."""
    from editkv.engine.loading import load_model
    from editkv.lsp_server.backend import ModelBackend
    from editkv.lsp_server.worker import cache_options
    from helpers import make_checkpoint

    return ModelBackend(load_model(make_checkpoint(tmp_path / "m", "llama")), **cache_options(settings))


def _wait_while(busy, deadline: float) -> None:
    """Poll `busy()` until it is false or time.monotonic() passes `deadline`."""
    while busy() and time.monotonic() < deadline:
        time.sleep(0.02)


def job(edits: int, line: int = 0, character: int = 0, **kw) -> Job:
    return Job(URI, "inline", line, character, "utf-16", edits, 1, Settings(), **kw)


def at(line: int, character: int) -> Range:
    return Range(Position(line, character), Position(line, character))


def test_every_backend_call_runs_on_the_one_worker_thread(worker):
    worker.open(URI, "x = 1\n", "python")
    assert worker.complete(job(0, 0, 5)).result(10).status == "served"  # the backend reads it at its first request
    worker.change(URI, [(at(0, 5), "0")], "utf-16")
    outcome = worker.complete(job(1, 0, 6)).result(10)
    worker.close(URI).result(10)
    assert outcome.status == "served" and outcome.suggestions[0].text == "<fake 0:6>"
    assert outcome.word == "10" and outcome.cursor == Position(0, 6)  # "x = 10": the word before the cursor
    threads = {tid for _, tid in worker.fake.calls}
    assert [name for name, _ in worker.fake.calls] == ["open", "complete", "change", "complete", "close"]
    assert threads == {worker.thread_id} and threading.get_ident() not in threads


def test_jobs_for_an_older_version_or_stopped_never_reach_the_backend(worker):
    worker.open(URI, "x = 1\n", "python")
    worker.change(URI, [(at(0, 5), "0")], "utf-16")
    stale = worker.complete(job(0)).result(10)  # made before the change: the text moved on
    stopped = worker.complete(job(1, stop=True)).result(10)  # superseded / cancelled while queued
    assert stale.status == stopped.status == "dropped"
    assert "complete" not in [name for name, _ in worker.fake.calls]


def test_a_change_that_does_not_fit_puts_the_document_out_of_sync_until_its_whole_text_comes(worker):
    worker.open(URI, "x = 1\n", "python")
    assert worker.complete(job(0)).result(10).status == "served"
    worker.change(URI, [(at(9, 0), "boom")], "utf-16")
    worker.change(URI, [(at(0, 0), "y")], "utf-16")  # to a text we no longer trust: not applied
    outcome = worker.complete(job(2)).result(10)
    assert outcome.status == "out_of_sync" and "did not fit" in outcome.stats["reason"]
    assert worker.docs[URI].text == "x = 1\n" and worker.fake.texts[URI] == "x = 1\n"
    assert [m[0] for m in worker.messages] == ["error"] and "did not fit" in worker.messages[0][1]
    # a full-text change resyncs; changes after it in the same batch apply on top
    worker.change(URI, [(at(0, 0), "ignored"), (None, "z = 2\n"), (at(0, 0), "# ")], "utf-16")
    assert worker.complete(job(3)).result(10).status == "served"
    assert worker.docs[URI].text == "# z = 2\n" and worker.fake.texts[URI] == "# z = 2\n"
    assert worker.messages[-1][0] == "info" and "in sync again" in worker.messages[-1][1]
    worker.change(URI, [(at(0, 2), "w")], "utf-16")
    assert worker.complete(job(4)).result(10).status == "served"
    assert worker.fake.texts[URI] == "# wz = 2\n"


def test_out_of_memory_while_completing_drops_caches_and_reports(worker):
    worker.open(URI, "x = 1\n", "python")
    worker.fake.fail = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert worker.complete(job(0)).result(10).status == "dropped"
    assert worker.fake.dropped and worker.messages[-1][0] == "error" and "kvBudgetMb" in worker.messages[-1][1]
    worker.fake.fail = ValueError("a backend bug")
    with pytest.raises(ValueError):  # the handler turns it into an InternalError response
        worker.complete(job(0)).result(10)


def test_failed_load_rebuilds_the_previous_backend(worker):
    """The old backend is freed before the new one is built (a reload peaks at one model); when
    the new one fails, the previous one is built again from its settings."""
    worker.open(URI, "x = 1\n", "python")
    working = worker.factory
    built = []

    def big_fails(settings):
        built.append(settings.model)
        if settings.model == "big":
            raise MemoryError
        return working(settings)

    worker.factory = big_fails
    ok, message = worker.load(Settings(model="big")).result(10)
    assert not ok and "out of memory loading big" in message and "Still using fake backend" in message
    assert built == ["big", None]
    assert worker.complete(job(0)).result(10).status == "served"

    def always_fails(settings):
        raise MemoryError

    worker.factory = always_fails
    ok, message = worker.load(Settings(model="big")).result(10)
    assert not ok and "did not load again either" in message
    assert worker.complete(job(0)).result(10).status == "not_ready"  # alive, nothing to serve with


def test_documents_opened_before_the_model_are_handed_over_when_it_loads():
    backend = RecordingBackend()
    w = EngineWorker(lambda settings: backend, lambda level, text: None)
    try:
        w.open(URI, "x = 1\n", "python")
        assert w.complete(job(0)).result(10).status == "not_ready"
        w.load(Settings()).result(10)
        assert w.complete(job(0)).result(10).status == "served" and backend.texts[URI] == "x = 1\n"
    finally:
        w.stop()


def test_oversized_and_binary_documents_are_not_modelled(worker):
    worker.settings = Settings(max_file_kb=1)
    worker.open(URI, "x" * 2000, "python")
    worker.open("file:///w/bin.py", "a\x00b", "python")
    assert worker.complete(job(0)).result(10).status == "refused"
    assert URI not in worker.fake.texts and "file:///w/bin.py" not in worker.fake.texts
    assert "files over 1 KB" in worker.messages[0][1] and "NUL" in worker.messages[1][1]


def test_backend_result_draft_scores_rank_suggestions(worker):
    class Scored(RecordingBackend):
        def complete(self, request, should_stop=lambda: False):
            return CompletionResult([Draft("x +", -0.1), Draft("x + 1", -2.0), Draft("x + 1", -3.0)])

    worker.factory = lambda settings: Scored()
    worker.load(Settings()).result(10)
    worker.open(URI, "def f(x):\n    return \n", "python")
    outcome = worker.complete(job(0, 1, 11)).result(10)
    assert [s.text for s in outcome.suggestions] == ["x + 1", "x +"]


def test_idle_refresh_runs_on_the_worker_only_when_no_work_comes(tmp_path):
    """A real model backend: stale tokens left by PIE are re-encoded once the worker has been
    idle for idle_refresh_ms, in chunks on the worker thread; busy periods get none of it.
    Idleness is measured on a clock the test moves, so a slow machine can't make it idle."""
    from editkv.engine.loading import load_model
    from editkv.lsp_server.backend import ModelBackend
    from helpers import make_checkpoint

    clock = Clock()
    backend = ModelBackend(load_model(make_checkpoint(tmp_path / "m", "llama")))
    refresh_threads = []
    inner = backend.refresh_idle

    def recording(max_tokens, should_stop):
        refresh_threads.append(threading.get_ident())
        return inner(max_tokens, should_stop)

    backend.refresh_idle = recording
    w = EngineWorker(lambda settings: backend, lambda level, text: None, clock=clock)
    try:
        assert w.load(Settings(idle_refresh_ms=20)).result(30)[0]
        text = "def add(a, b):\n    return a + b\n" * 40
        w.open(URI, text, "python").result(10)
        w.complete(job(0, line=1, character=4)).result(30)  # encodes the document
        for i in range(6):  # busy: a change and a request every 10 ms of the worker's clock
            w.change(URI, [(at(i, 0), "# \n")], "utf-16").result(10)
            w.complete(job(i + 1, line=1, character=4)).result(30)
            clock.now += 0.01
            time.sleep(0.05)  # real time passes (timers fire), the worker's clock says not idle
        doc = backend.cache.get(URI)
        assert doc.num_stale > 0 and w.idle_refreshed == 0 and not refresh_threads
        # a request cancelled while queued (the editor moved on) must not leave the worker "busy"
        blocker = w.call(time.sleep, 0.3)
        queued = w.complete(job(6, line=1, character=4))
        assert queued.cancel() and blocker.result(10) is None
        time.sleep(0.1)
        assert w.idle_refreshed == 0 and not refresh_threads  # still not idle on its clock
        clock.now += 1.0  # now idle for 50x idle_refresh_ms
        deadline = time.monotonic() + 60
        _wait_while(lambda: doc.num_stale or doc.pending_edits, deadline)
        assert doc.num_stale == 0 and w.idle_refreshed >= len(doc.ids) - 40
        assert set(refresh_threads) == {w.thread_id}
        # nothing stale is left: the worker stops looking until new work comes (no busy loop)
        _wait_while(lambda: not (w._idle_next == "done" and not w._pending), deadline)
        runs = w.idle_runs
        clock.now += 10.0
        time.sleep(0.3)
        assert w.idle_runs == runs
    finally:
        w.stop()


def test_urgent_background_work_waits_for_a_short_quiet_spell_not_for_idle(tmp_path):
    """Text past the cursor with no keys yet, or more stale tokens than the stale budget, start
    background work after URGENT_QUIET_MS of quiet (the worker's clock), not idle_refresh_ms."""
    clock = Clock()
    settings = Settings(idle_refresh_ms=600_000, stale_budget=8)
    backend = _tiny_backend(tmp_path, settings)
    with _serving_a_file(backend, settings, clock) as (w, doc):  # the text before the cursor encoded only
        assert doc.num_unencoded > 0
        time.sleep(0.1)
        assert w.idle_runs == 0  # no quiet on the worker's clock yet
        clock.now += (EngineWorker.URGENT_QUIET_MS + 1) / 1000  # far less than idle_refresh_ms
        deadline = time.monotonic() + 60
        _wait_while(lambda: doc.num_unencoded, deadline)
        assert doc.num_unencoded == 0 and w.idle_runs > 0
        # an edit at the top leaves more stale tokens than the budget: urgent again
        w.change(URI, [(at(0, 0), "# top\n")], "utf-16").result(10)
        w.complete(job(1, line=1, character=0)).result(30)
        assert doc.num_stale > 8
        clock.now += (EngineWorker.URGENT_QUIET_MS + 1) / 1000
        _wait_while(lambda: doc.num_stale, deadline)
        assert doc.num_stale == 0


def test_documents_opened_are_read_at_their_first_request_or_by_background_work(tmp_path):
    """An editor restoring its tabs sends every didOpen before its first request: the backend
    reads (tokenizes, indexes) only the requested document on the request's path, the others
    in background jobs after a short quiet spell, each with the changes made to it meanwhile."""
    clock = Clock()
    settings = Settings(idle_refresh_ms=600_000)
    backend = _tiny_backend(tmp_path, settings)
    w = EngineWorker(lambda s: backend, lambda level, text: None, clock=clock)
    others = [f"file:///w/tab{i}.py" for i in range(3)]
    try:
        assert w.load(settings).result(30)[0]
        for i, uri in enumerate(others):
            w.open(uri, f"def tab{i}():\n    return {i}\n", "python")
        w.open(URI, "def add(a, b):\n    return a + b\n", "python")
        w.change(others[1], [(at(1, 11), "1 + ")], "utf-16")  # before the backend has read it
        assert w.complete(job(0, line=1, character=4)).result(30).status == "served"
        assert list(backend.cache.docs) == [URI]  # the request read its own document only
        time.sleep(0.1)
        assert w.idle_reads == 0 and w.unread == 3  # no quiet on the worker's clock yet
        clock.now += (EngineWorker.URGENT_QUIET_MS + 1) / 1000  # far less than idle_refresh_ms
        _wait_while(lambda: len(backend.cache.docs) < 4, time.monotonic() + 60)
        assert sorted(backend.cache.docs) == sorted([URI, *others]) and w.idle_reads == 3 and w.unread == 0
        assert backend.text(others[1]) == "def tab1():\n    return 1 + 1\n" == w.docs[others[1]].text
        assert w.debug_document(others[2]).result(10)["modelled"]
    finally:
        w.stop()


def test_deferred_graph_captures_wait_for_idle_not_for_the_quiet_between_keys(tmp_path, monkeypatch):
    """A request's missing CUDA graphs (here the static forward's keys on the CPU) are captured by
    background work only once the user has been idle for idle_refresh_ms: a capture can't stop
    halfway, so the short quiet that urgent work takes (URGENT_QUIET_MS) is not enough."""
    from editkv.engine.loading import load_model
    from editkv.lsp_server import backend as backend_module
    from editkv.lsp_server.backend import ModelBackend
    from editkv.lsp_server.worker import cache_options
    from helpers import make_checkpoint

    monkeypatch.setattr(backend_module, "DEFER_CAPTURES", True)  # (off by default: BENCHMARKS.md)
    clock = Clock()
    settings = Settings(idle_refresh_ms=200)  # real timers fire; idleness is the test's clock's
    loaded = load_model(make_checkpoint(tmp_path / "m", "llama"))
    static = loaded.runner.enable_graphs(mode="static")
    backend = ModelBackend(loaded, **cache_options(settings))
    assert static.defer_captures  # background work on: captures wait for it
    with _serving_a_file(backend, settings, clock) as (w, doc):  # text after the cursor left for later
        pending = static.pending_captures
        assert pending > 0 and static.num_graphs == 0 and doc.num_unencoded > 0
        clock.now += (EngineWorker.URGENT_QUIET_MS + 1) / 1000  # urgent work's quiet spell
        deadline = time.monotonic() + 60
        _wait_while(lambda: doc.num_unencoded, deadline)
        time.sleep(0.3)
        assert doc.num_unencoded == 0 and w.idle_captures == 0  # the documents' work, not the captures
        clock.now += settings.idle_refresh_ms / 1000  # idle
        _wait_while(lambda: static.pending_captures, deadline)
        # (a key whose buffer moved since is dropped, not captured: count what was captured)
        assert static.pending_captures == 0 and w.idle_captures > 0 and static.num_graphs == w.idle_captures


class WarmingBackend(FakeBackend):
    """A FakeBackend whose forwards 'replay graphs' as the test says, noting its warm-ups."""

    def __init__(self, graphs: bool, fail: bool = False) -> None:
        super().__init__()
        self.graphs, self.fail, self.warm_ups = graphs, fail, []
        self.dropped = False

    def graphs_replay(self):
        return self.graphs

    def warm_up(self, **kw):
        self.warm_ups.append((kw, threading.get_ident()))
        if self.fail:
            raise RuntimeError("a kernel did not compile")
        self.warm_up_report = {"buckets": [1024], "graphs": 3}
        return self.warm_up_report

    def drop_caches(self):
        self.dropped = True


@pytest.mark.parametrize("graphs, setting, warmed", [(True, None, True), (False, None, False),
                                                     (True, False, False), (False, True, True)])
def test_the_load_warms_up_where_graphs_replay_or_the_setting_says(graphs, setting, warmed):
    backend = WarmingBackend(graphs)
    w = EngineWorker(lambda s: backend, lambda level, text: None)
    try:
        assert w.load(Settings(warm_up=setting, num_drafts=5, view="l2r")).result(10)[0]
        assert bool(backend.warm_ups) == warmed
        if warmed:  # with the user's request settings, on the worker thread, before the backend serves
            kw, thread = backend.warm_ups[0]
            assert kw["num_drafts"] == 5 and kw["view"] == "l2r" and thread == w.thread_id
    finally:
        w.stop()


def test_a_failed_warm_up_leaves_a_serving_backend_without_its_caches():
    backend = WarmingBackend(True, fail=True)
    w = EngineWorker(lambda s: backend, lambda level, text: None)
    try:
        assert w.load(Settings()).result(10) == (True, "fake backend")
        assert backend.warm_ups and backend.dropped and w.backend is backend
    finally:
        w.stop()
