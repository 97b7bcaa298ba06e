"""The replay bench's copy of the VS Code extension's typing along (bench/vscode_client.py): the
same cases as vscode-extension/test/unit/inline.test.ts, and a replay through a real server."""

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from vscode_client import ExtensionClient  # noqa: E402

pytestmark = pytest.mark.asyncio
URI = "file:///a.py"


class Recorder:
    """What the extension passes on to the server: notifications, and requests it answers later."""

    def __init__(self):
        self.notified, self.requests, self.cancelled = [], [], []

    def notify(self, method, params=None):
        self.notified.append(method)

    def send_request(self, method, params=None):
        future = asyncio.get_running_loop().create_future()
        self.requests.append((method, params, future))
        return len(self.requests), future

    def cancel(self, msg_id):
        self.cancelled.append(msg_id)


def _change(client, version, line, character, text, end=None):
    end = end or {"line": line, "character": character}
    client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version}, "contentChanges": [
        {"range": {"start": {"line": line, "character": character}, "end": end}, "text": text}]})


def _ask(client, line, character, trigger=2):
    return client.send_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": URI}, "position": {"line": line, "character": character},
        "context": {"triggerKind": trigger}})


async def _shown(text="return a + b"):
    """An extension that showed `text` at (4, 8) of version 3."""
    inner = Recorder()
    client = ExtensionClient(inner)
    client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "version": 0, "text": ""}})
    for v in (1, 2, 3):
        _change(client, v, 0, 0, "")
    _, future = _ask(client, 4, 8)
    spot = {"line": 4, "character": 8}
    inner.requests[-1][2].set_result({"items": [{"insertText": text, "range": {"start": spot, "end": spot},
                                                 "command": {"command": "editkv.accept", "arguments": ["id-1"]}}]})
    await future
    await asyncio.sleep(0)  # the done callback
    return client, inner


async def test_typing_along_is_answered_without_the_server():
    client, inner = await _shown()
    _change(client, 4, 4, 8, "re")
    msg_id, future = _ask(client, 4, 10)
    assert msg_id < 0 and future.done() and len(inner.requests) == 1  # no request went out
    item = future.result()["items"][0]
    assert item["insertText"] == "turn a + b" and item["command"]["arguments"] == ["id-1"]
    assert item["range"]["start"] == {"line": 4, "character": 10}
    _change(client, 5, 4, 10, "t")
    assert _ask(client, 4, 11)[1].result()["items"][0]["insertText"] == "urn a + b"
    client.cancel(-1)  # its own answers: nothing to cancel on the server
    assert inner.cancelled == [] and client.answered_here == 2
    assert inner.notified.count("textDocument/didChange") == 5  # every change still reaches the server
    _ask(client, 4, 11, trigger=1)  # an explicit invocation always asks the server
    assert len(inner.requests) == 2


@pytest.mark.parametrize(("what", "change"), [
    ("a different character", (4, 4, 8, "x")),
    ("somewhere else", (4, 3, 0, "r")),
    ("a line break", (4, 4, 8, "\n")),
    ("all of the rest", (4, 4, 8, "return a + b")),
    ("a change it did not see", (5, 4, 8, "r")),
    ("a deletion", (4, 4, 7, "", {"line": 4, "character": 8})),
])
async def test_any_other_change_forgets_the_ghost_text(what, change):
    client, inner = await _shown()
    _change(client, *change)
    for character in range(7, 21):
        _ask(client, 4, character)
    assert client.answered_here == 0 and len(inner.requests) == 15, what


async def test_an_answer_to_an_older_version_is_not_typed_along():
    inner = Recorder()
    client = ExtensionClient(inner)
    _, future = _ask(client, 0, 0)
    _change(client, 1, 0, 0, "x")  # typed while the request ran
    inner.requests[-1][2].set_result({"items": [{"insertText": "xyz"}]})
    await future
    await asyncio.sleep(0)
    _ask(client, 0, 1)
    assert client.answered_here == 0 and len(inner.requests) == 2


async def test_typing_along_the_default_models_suggestion_through_a_real_server():
    """The embedded model behind a real `editkv lsp`: its ghost text, typed one character, is
    answered by the extension; the server served one request and typed nothing along itself."""
    from editkv.lsp_server.lsp_client import LspClient, server_command, server_env

    server = await LspClient.start(server_command("--device", "cpu"), env=server_env())
    try:
        await server.initialize(options={"debounceMs": 0, "maxTokens": 8, "statsFile": False})
        await server.wait_ready(120)
        client = ExtensionClient(server)
        text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return "
        client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python",
                                                                "version": 0, "text": text}})
        shown = (await _ask(client, 5, 11)[1])["items"][0]["insertText"]
        assert len(shown) >= 2 and "\n" not in shown[:1], shown
        _change(client, 1, 5, 11, shown[0])
        msg_id, future = _ask(client, 5, 12)
        assert msg_id < 0 and (await future)["items"][0]["insertText"] == shown[1:]
        stats = (await client.request("editkv/stats"))["backend"]
        assert stats["completed"] == 1 and stats["typed_along"] == 0 and client.answered_here == 1
    finally:
        assert await server.close() == 0
