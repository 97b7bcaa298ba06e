"""Typing along the ghost text: a keystroke that types the start of the suggestion shown last is
answered with the rest of it, without the model (setting `typeAlong`, on by default); anything
else goes to the model. The fake engine makes every answer name its position, so an answer from
the model and one from the shown text tell themselves apart; then the same through the embedded model."""

import asyncio

import pytest
import pytest_lsp
from lsp_testing import SERVER_ENV, lsp_command
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient
from test_protocol import URI, inline, open_doc, server_stats, start, type_at

pytestmark = pytest.mark.asyncio

TEXT = "def add(a, b):\n    return a + b\n\n\n"


@pytest_lsp.fixture(config=ClientServerConfig(server_command=lsp_command("--device", "cpu"), server_env=SERVER_ENV))
async def model_client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def _texts(client, line, character):
    result = await inline(client, line, character)
    return [item.insert_text for item in result.items]


async def test_typing_the_shown_text_is_answered_from_it(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 0})
    open_doc(client, TEXT)
    assert await _texts(client, 4, 0) == ["<fake 4:0>"]  # the model's (fake engine's) answer
    type_at(client, 4, 0, "<", 1)
    assert await _texts(client, 4, 1) == ["fake 4:0>"]  # the rest of what was shown
    type_at(client, 4, 1, "f", 2)
    assert await _texts(client, 4, 2) == ["ake 4:0>"]
    stats = await server_stats(client)
    # answered on the event loop: neither the worker nor the model saw these two requests
    assert stats["backend"]["typed_along"] == 2 and stats["requests"]["inline"]["typed_along"] == 2
    assert stats["backend"]["completed"] == 1
    assert stats["latency_ms"]["count"] == 3  # the two typed along are in the server's latency too
    # a character the suggestion does not have: the model again
    type_at(client, 4, 2, "x", 3)
    assert await _texts(client, 4, 3) == ["<fake 4:3>"]
    # an edit elsewhere between the answer and the keystroke: the model again
    type_at(client, 4, 3, "<", 4)
    type_at(client, 0, 0, "#", 5)
    assert await _texts(client, 4, 4) == ["<fake 4:4>"]
    # typed to the end: nothing left to show from it, the model again
    type_at(client, 4, 4, "<fake 4:4>"[:1], 6)  # (answered from the shown text)
    assert await _texts(client, 4, 5) == ["fake 4:4>"]
    assert (await server_stats(client))["backend"]["typed_along"] == 3


async def test_typing_along_in_changes_the_event_loop_does_not_follow_is_answered_by_the_worker(client: LanguageClient):
    """Two characters of the ghost text in one didChange (two content changes): the event loop
    forgets what was shown, the worker compares texts and still answers from it; an insertion
    elsewhere on the line, of the right character, is no typing along."""
    await start(client, "visual-studio-code", {"debounceMs": 0})
    open_doc(client, TEXT)
    assert await _texts(client, 4, 0) == ["<fake 4:0>"]
    at, after = types.Position(line=4, character=0), types.Position(line=4, character=1)
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=1),
        content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text="<"),
                         types.TextDocumentContentChangePartial(range=types.Range(start=after, end=after), text="f")]))
    assert await _texts(client, 4, 2) == ["ake 4:0>"]
    stats = await server_stats(client)
    assert stats["backend"]["typed_along"] == 1 and stats["backend"]["last_request"]["strategy"] == "typed_along"
    assert "typed_along" not in stats["requests"]["inline"]
    type_at(client, 4, 0, "a", 2)  # the next ghost character, typed before the cursor
    assert await _texts(client, 4, 3) == ["<fake 4:3>"]


async def test_type_along_off_and_the_recompute_baseline_always_ask_the_model(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 0, "typeAlong": False})
    open_doc(client, TEXT)
    assert await _texts(client, 4, 0) == ["<fake 4:0>"]
    type_at(client, 4, 0, "<", 1)
    assert await _texts(client, 4, 1) == ["<fake 4:1>"]
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"editkv": {"typeAlong": True, "cacheMode": "recompute"}}))
    type_at(client, 4, 1, "<", 2)
    assert await _texts(client, 4, 2) == ["<fake 4:2>"]
    assert (await server_stats(client))["backend"]["typed_along"] == 0


async def test_typing_along_the_default_models_suggestion(model_client: LanguageClient):
    """The embedded model: its ghost text, typed one character, answered from what was shown."""
    text = TEXT + "def sub(a, b):\n    return "
    await start(model_client, "visual-studio-code", {"debounceMs": 0, "maxTokens": 8})
    open_doc(model_client, text)
    shown = await _texts(model_client, 5, 11)
    assert shown and len(shown[0]) >= 2, shown
    type_at(model_client, 5, 11, shown[0][0], 1)
    assert await _texts(model_client, 5, 12) == [shown[0][1:]]
    stats = await server_stats(model_client)
    assert stats["backend"]["typed_along"] == 1 and stats["backend"]["completed"] == 1


async def test_a_request_superseded_by_typing_at_its_cursor_finishes_for_typing_along(slow_client: LanguageClient):
    """A slow engine (2 s a request) and a keystroke every few ms: the request running when
    characters are typed at its cursor runs to its end (its own answer is dropped: the editor moved
    on), and the next request, whose typed text starts that suggestion, is answered from it
    without the engine. A keystroke elsewhere stops the running request, as before."""
    client = slow_client
    await start(client, "visual-studio-code", {"debounceMs": 0})
    open_doc(client, TEXT)
    first = asyncio.ensure_future(inline(client, 4, 0))
    await asyncio.sleep(0.2)  # the worker has started it
    type_at(client, 4, 0, "<", 1)
    assert await first is None  # superseded: dropped for the editor
    type_at(client, 4, 1, "f", 2)
    assert await _texts(client, 4, 2) == ["ake 4:0>"]  # the finished suggestion, typed along
    stats = await server_stats(client)
    assert stats["backend"]["typed_along"] == 1 and stats["backend"]["completed"] == 1

    # a request superseded by an edit elsewhere stops (nothing finished, nothing to type along)
    type_at(client, 4, 2, "x", 3)  # not the suggestion's next character: the engine again
    second = asyncio.ensure_future(inline(client, 4, 3))
    await asyncio.sleep(0.2)
    type_at(client, 0, 0, "#", 4)
    assert await second is None
    type_at(client, 4, 3, "<", 5)
    assert await _texts(client, 4, 4) == ["<fake 4:4>"]  # from the engine: nothing was kept
    stats = await server_stats(client)
    assert stats["backend"]["typed_along"] == 1 and stats["backend"]["completed"] == 2
