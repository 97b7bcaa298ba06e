"""Injected faults through a real `editkv lsp` (tiny model, CPU): out of memory and a CUDA error
during a graph replay, a graph capture and a KV repair, a bug in a forward, a tokenizer that
goes wrong. Each is logged, told to the user once, recovered from (caches dropped; graphs off,
then a model reload), and the request and the ones after it are answered, with the documents
intact (text, tokens, KV against a fresh prefill).

EDITKV_GRAPHS=static runs the CUDA-graph path's static forward on the CPU, so the replay and
capture sites are reached here; `editkv/debugFaults` installs each fault just before its step.
On a GPU machine, EDITKV_FAULTS_DEVICE=cuda runs the same steps with real CUDA graphs.
"""

import asyncio
import os

import pytest
import pytest_asyncio
from editkv.lsp_server.lsp_client import LspClient, LspError
from lsp_testing import SERVER_ENV, lsp_command

pytestmark = pytest.mark.asyncio
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n"


@pytest_asyncio.fixture
async def client(tiny_model):
    device = os.environ.get("EDITKV_FAULTS_DEVICE", "cpu")
    env = {**SERVER_ENV, "EDITKV_FAULTS": "none", "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["EDITKV_GRAPHS"] = "static"
    client = await LspClient.start(lsp_command("--device", device), env=env)
    await client.initialize(options={"model": str(tiny_model), "dtype": "float32", "statsFile": False, "debounceMs": 0,
                                     "maxTokens": 2, "idleRefreshMs": 0, "speculation": False})
    await client.wait_ready(120)
    yield client
    assert await client.close() == 0, client.stderr_text()


class Steps:
    """Opens a fresh document per step: a new KV buffer, new graph keys, so a capture happens. (With
    a KV pool, the GPU's default, graphs are per shape, not per document: the capture step first
    changes the KV budget, which makes a new pool.)"""

    def __init__(self, client: LspClient) -> None:
        self.client = client
        self.docs = 0
        self.seen_messages = 0

    def open(self) -> str:
        uri = f"file:///w/f{self.docs}.py"
        self.docs += 1
        self.client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python",
                                                                     "version": 0, "text": TEXT}})
        return uri

    async def complete(self, uri: str, line: int = 6, character: int = 18) -> dict:
        return await self.client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}})

    async def plan(self, plan: str) -> dict:
        return await self.client.request("editkv/debugFaults", {"plan": plan})

    async def stats(self) -> dict:
        return (await self.client.request("editkv/stats"))["backend"]

    async def new_errors(self) -> list[str]:
        await self.stats()  # a round trip: messages sent before it have arrived
        errors = [m["message"] for m in self.client.messages() if m["type"] == 1]
        new, self.seen_messages = errors[self.seen_messages:], len(errors)
        return new

    async def intact(self, uri: str, text: str = TEXT) -> dict:
        import hashlib

        got = await self.client.request("editkv/debugDocument", {"uri": uri, "kv": True})
        assert got["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and not got["out_of_sync"]
        backend = got["backend"]
        assert backend["text_sha256"] == got["text_sha256"] and backend["tokens_fresh"]
        assert backend["kv_max_diff"] < 1e-3
        return backend


async def test_injected_faults_are_recovered_from_and_told_once(client: LspClient):
    steps = Steps(client)
    warm = steps.open()
    assert (await steps.complete(warm))["items"] is not None
    assert (await steps.intact(warm))["graphs"] > 0  # the static (graph) path is on

    # out of memory at a replay, a capture, a repair: caches dropped, the request answered
    for n, plan in enumerate(["replay@1=oom", "capture@1=oom", "repair@1=oom"], start=1):
        uri = steps.open()
        if plan.startswith("repair"):
            await steps.complete(uri)
            client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 1}, "contentChanges": [
                {"range": {"start": {"line": 0, "character": 4}, "end": {"line": 0, "character": 7}}, "text": "plus"}]})
        if plan.startswith("capture"):
            client.notify("workspace/didChangeConfiguration", {"settings": {"editkv": {"kvBudgetMb": 512}}})
        await steps.plan(plan)
        answer = await steps.complete(uri)
        assert answer is not None and "items" in answer
        fired = (await steps.plan("none"))["fired"]
        assert fired == [[plan.split("@")[0], 1, "oom"]], plan
        errors = await steps.new_errors()
        assert len(errors) == 1 and "out of memory" in errors[0] and "injected" in errors[0], errors
        backend = await steps.stats()
        assert backend["faults"]["oom"] == n and backend["reloads"] == 0
        text = TEXT.replace("def add", "def plus") if plan.startswith("repair") else TEXT
        assert (await steps.intact(uri, text))["graphs"] > 0
        assert (await steps.complete(uri))["items"] is not None  # and the next request
    assert "failed (oom)" in client.stderr_text() and "injected" in client.stderr_text()

    # a CUDA error at a replay: graphs off, forwards eager from now on
    uri = steps.open()
    await steps.plan("replay@1=cuda")
    assert (await steps.complete(uri))["items"] is not None
    errors = await steps.new_errors()
    # (on failure: which sites the request hit and what the server logged; on the H100 of session
    # 17 this step once saw no error while the GPU test suite ran beside it, and passed alone)
    assert len(errors) == 1 and "device error" in errors[0] and "CUDA graphs off" in errors[0], \
        (errors, await steps.plan("none"), client.stderr_text()[-4000:])
    assert (await steps.intact(uri))["graphs"] is None
    assert (await steps.stats())["faults"]["device"] == 1

    # another one, at a repair, with graphs already off: the model is reloaded (graphs back on)
    await steps.complete(uri)
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 1}, "contentChanges": [
        {"range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 4}}, "text": "x = 1; "}]})
    await steps.plan("repair@1=cuda")
    assert (await steps.complete(uri))["items"] is not None
    errors = await steps.new_errors()
    assert len(errors) == 1 and "reloaded the model" in errors[0], errors
    backend = await steps.stats()
    assert backend["faults"]["device"] == 2 and backend["reloads"] == 1 and backend["ready"]
    reloaded = TEXT.replace("    return", "    x = 1; return")
    assert (await steps.intact(uri, reloaded))["graphs"] > 0
    assert (await steps.intact(warm))["tokens"] > 0  # documents opened before the reload are still there

    # a CUDA error at a capture: graphs off again
    uri = steps.open()
    await steps.plan("capture@1=cuda")
    assert (await steps.complete(uri))["items"] is not None
    errors = await steps.new_errors()
    assert len(errors) == 1 and "CUDA graphs off" in errors[0], errors
    assert (await steps.intact(uri))["graphs"] is None

    # a bug in a forward: that request fails with an error response, the document starts over
    await steps.plan("forward@1=error")
    with pytest.raises(LspError):
        await steps.complete(uri)
    errors = await steps.new_errors()
    assert len(errors) == 1 and "engine failure" in errors[0], errors
    assert (await steps.complete(uri))["items"] is not None
    await steps.intact(uri)
    assert (await steps.stats())["faults"] == {"oom": 3, "device": 3, "error": 1}


async def test_a_tokenizer_mismatch_is_found_in_idle_time_and_repaired(client: LspClient):
    steps = Steps(client)
    uri = steps.open()
    await steps.complete(uri)
    await steps.plan("tokenize@1=mismatch")
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 1}, "contentChanges": [
        {"range": {"start": {"line": 6, "character": 18}, "end": {"line": 6, "character": 18}}, "text": " + 1"}]})
    got = await client.request("editkv/debugDocument", {"uri": uri})
    assert not got["backend"]["tokens_fresh"]  # the injected bug took
    assert (await steps.stats())["token_repairs"] == 0
    client.notify("workspace/didChangeConfiguration", {"settings": {"editkv": {"idleRefreshMs": 5}}})
    for _ in range(400):
        if (await steps.stats())["token_repairs"] == 1:
            break
        await asyncio.sleep(0.025)
    assert (await steps.stats())["token_repairs"] == 1
    await steps.intact(uri, TEXT.replace("= x\n", "= x + 1\n"))
