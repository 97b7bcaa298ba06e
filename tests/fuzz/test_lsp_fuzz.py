"""Hypothesis stateful tests: random LSP sessions through a real `editkv lsp` process.

Two servers per module, each shared by every example (a long-lived server, as an editor's is):
the fake engine (`--fake`: text sync only, fast) and the real model path on a tiny random
checkpoint (tokens, KV against a fresh prefill, memory bounds, reloads). Each example opens
its own documents under a fresh prefix and closes them at the end. The default profile is
small; `-m fuzz_long` runs the long one (EDITKV_FUZZ_EXAMPLES, EDITKV_FUZZ_STEPS), and the
seeded 100,000-operation run is `test_long_random_run` (EDITKV_FUZZ_OPS, EDITKV_FUZZ_SEED).
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from helpers import make_checkpoint
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from lspfuzz import Fuzzer, HypothesisDraw, Session, run_random

QUICK = settings(max_examples=6, stateful_step_count=25, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=int(os.environ.get("EDITKV_FUZZ_EXAMPLES", "200")),
                stateful_step_count=int(os.environ.get("EDITKV_FUZZ_STEPS", "100")), deadline=None,
                suppress_health_check=list(HealthCheck))
MODEL_OPTIONS = {"maxTokens": 4, "numDrafts": 2, "idleRefreshMs": 20, "kvBudgetMb": 1}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen2 (FIM tokens) whose context, 128 tokens, the longer documents pass."""
    return make_checkpoint(tmp_path_factory.mktemp("fuzz-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def fake_session():
    session = Session("--fake")
    yield session
    assert session.close() == 0, session.client.stderr_text()


@pytest.fixture(scope="module")
def model_session(tiny_checkpoint):
    session = Session("--device", "cpu", options={"model": str(tiny_checkpoint), **MODEL_OPTIONS})
    yield session
    assert session.close() == 0, session.client.stderr_text()


def machine(session: Session, *, fake: bool, kv_every: int, reloads: bool) -> type[RuleBasedStateMachine]:
    """A state machine whose rules are the fuzzer's operations on `session`."""
    examples = iter(range(10**9))

    class LspSession(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.fuzzer = Fuzzer(session, fake=fake, prefix=f"file:///fuzz/{'f' if fake else 'm'}{next(examples)}/",
                                 kv_every=kv_every, reloads=reloads)

        @initialize(data=st.data())
        def start(self, data):
            self.fuzzer.op_configure(HypothesisDraw(data))  # settings carry over from earlier examples: draw anew
            self.fuzzer.op_open(HypothesisDraw(data))

        @rule(data=st.data())
        def change(self, data):
            self.fuzzer.op_change(HypothesisDraw(data))

        @rule(data=st.data())
        def undo(self, data):
            self.fuzzer.op_undo(HypothesisDraw(data))

        @rule(data=st.data())
        def out_of_range(self, data):
            self.fuzzer.op_out_of_range(HypothesisDraw(data))

        @rule(data=st.data())
        def resync(self, data):
            self.fuzzer.op_resync(HypothesisDraw(data))

        @rule(data=st.data())
        def complete(self, data):
            self.fuzzer.op_complete(HypothesisDraw(data))

        @rule(data=st.data())
        def cancel(self, data):
            self.fuzzer.op_cancel(HypothesisDraw(data))

        @rule(data=st.data())
        def supersede(self, data):
            self.fuzzer.op_supersede(HypothesisDraw(data))

        @rule(data=st.data())
        def open_or_reopen(self, data):
            self.fuzzer.op_open(HypothesisDraw(data))

        @rule(data=st.data())
        def configure(self, data):
            self.fuzzer.op_configure(HypothesisDraw(data))

        @rule(data=st.data())
        def mixed(self, data):  # the long run's weighting: mostly changes and completions
            self.fuzzer.step(HypothesisDraw(data))

        @precondition(lambda self: reloads)
        @rule()
        def reload(self):
            self.fuzzer.op_reload(None)

        @invariant()
        def every_document_agrees(self):
            if self.fuzzer.docs:
                self.fuzzer.check_all()

        def teardown(self):
            self.fuzzer.close_all()

    return LspSession


def test_text_sync_fuzz_through_the_fake_engine(fake_session):
    run_state_machine_as_test(machine(fake_session, fake=True, kv_every=0, reloads=False), settings=QUICK)


def test_tokens_kv_and_memory_fuzz_through_the_real_model_path(model_session):
    run_state_machine_as_test(machine(model_session, fake=False, kv_every=3, reloads=True),
                              settings=settings(QUICK, max_examples=4, stateful_step_count=20))


@pytest.mark.fuzz_long
def test_text_sync_fuzz_long(fake_session):
    run_state_machine_as_test(machine(fake_session, fake=True, kv_every=0, reloads=False), settings=LONG)


@pytest.mark.fuzz_long
def test_real_model_fuzz_long(model_session):
    run_state_machine_as_test(machine(model_session, fake=False, kv_every=5, reloads=True), settings=LONG)


@pytest.mark.fuzz_long
@pytest.mark.parametrize("engine", ["model", "default", "fake"])
def test_long_random_run(tiny_checkpoint, engine):
    """EDITKV_FUZZ_OPS operations (100,000 by default) from EDITKV_FUZZ_SEED, the invariants after
    every one: on the real model path (tiny random model, or "default": the embedded default
    model the server loads when no model is set; CPU; the KV check every 25th operation,
    reloads) or the fake engine (text sync and answers only); writes a summary to
    EDITKV_FUZZ_REPORT (JSON) if set."""
    ops = int(os.environ.get("EDITKV_FUZZ_OPS", "100000"))
    seed = int(os.environ.get("EDITKV_FUZZ_SEED", "20260101"))
    fake = engine == "fake"
    if fake:
        session = Session("--fake")
    elif engine == "default":
        session = Session("--device", "cpu", options=MODEL_OPTIONS)
    else:
        session = Session("--device", "cpu", options={"model": str(tiny_checkpoint), **MODEL_OPTIONS})
    fuzzer = Fuzzer(session, fake=fake, prefix="file:///fuzz/long/", kv_every=25, reloads=not fake)
    started = time.monotonic()
    report = os.environ.get("EDITKV_FUZZ_REPORT")

    def progress(f: Fuzzer) -> None:
        if report:
            with open(report, "w") as out:
                json.dump(summary(f, seed, started, session, done=False), out, indent=1)

    try:
        run_random(fuzzer, random.Random(seed), ops, progress_s=30, on_progress=progress)
    finally:
        result = summary(fuzzer, seed, started, session, done=True)
        if report:
            with open(report, "w") as out:
                json.dump(result, out, indent=1)
        print(json.dumps(result))
    assert session.close() == 0


def summary(f: Fuzzer, seed: int, started: float, session: Session, *, done: bool) -> dict:
    c = f.counters
    engine = "fake" if f.fake else "model" if "model" in f.s.options else "default"
    return {"engine": engine, "seed": seed, "ops": c.ops,
            "seconds": round(time.monotonic() - started, 1), "done": done,
            "checks": c.checks, "kv_checks": c.kv_checks,
            "kv_checks_all_layers": c.kv_checks_all_layers, "max_kv_diff": c.max_kv_diff,
            "completions": c.completions, "errors_expected": c.errors_expected, "out_of_sync": c.out_of_sync,
            "by_op": c.by_op, "server_rss_mb": round(session.rss_mb(), 1)}
