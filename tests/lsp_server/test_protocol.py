"""`editkv lsp --fake` over real stdio JSON-RPC, as VS Code and Neovim see it (pytest-lsp).

The fake backend answers `<fake line:col>` instantly (or after --fake-delay-ms, polling its
stop callback), so these tests check the protocol, scheduling and bookkeeping, not a model.
"""

import asyncio
import time

import pytest
from lsp_testing import SOURCE
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import LanguageClient, client_capabilities

pytestmark = pytest.mark.asyncio
URI = "file:///work/example.py"
CLIENTS = ["visual-studio-code", "neovim"]


async def start(client: LanguageClient, capabilities: str, options: dict | None = None) -> types.InitializeResult:
    params = types.InitializeParams(capabilities=client_capabilities(capabilities),
                                    initialization_options={"statsFile": False, **(options or {})})
    result = await client.initialize_session(params)
    await wait_loaded(client)
    return result


async def wait_loaded(client: LanguageClient, loads: int = 1) -> None:
    """Until `loads` model loads have reported `$/progress` end (60 s: a loaded 2-core machine
    took over 10 s to import and build a tiny model)."""
    for _ in range(2400):
        ends = [r for reports in client.progress_reports.values() for r in reports
                if isinstance(r, types.WorkDoneProgressEnd)]
        if len(ends) >= loads:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"model not loaded; progress: {client.progress_reports}")


def open_doc(client: LanguageClient, text: str = SOURCE, uri: str = URI) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=0, text=text)))


def type_at(client: LanguageClient, line: int, character: int, text: str, version: int, uri: str = URI) -> None:
    at = types.Position(line=line, character=character)
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=text)]))


def inline(client: LanguageClient, line: int, character: int, invoked: bool = False, uri: str = URI):
    kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
    return client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=kind)))


def complete(client: LanguageClient, line: int, character: int, uri: str = URI, invoked: bool | None = None):
    context = None if invoked is None else types.CompletionContext(
        trigger_kind=types.CompletionTriggerKind.Invoked if invoked else types.CompletionTriggerKind.TriggerCharacter,
        trigger_character=None if invoked else ".")
    return client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=character),
        context=context))


async def server_stats(client: LanguageClient) -> dict:
    return plain(await client.protocol.send_request_async("editkv/stats", None))


def plain(value):
    """pygls' client turns JSON objects into namedtuples: back to dicts."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize("caps", CLIENTS)
async def test_initialize_capabilities_and_progress(client: LanguageClient, caps: str):
    result = await start(client, caps)
    cap = result.capabilities
    assert cap.inline_completion_provider is not None
    assert cap.completion_provider is not None and "." in cap.completion_provider.trigger_characters
    assert cap.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    # VS Code offers no position encodings (UTF-16); Neovim 0.11 offers UTF-8 first
    assert cap.position_encoding == ("utf-16" if caps == "visual-studio-code" else "utf-8")
    [reports] = client.progress_reports.values()
    assert isinstance(reports[0], types.WorkDoneProgressBegin) and "loading" in reports[0].message
    assert isinstance(reports[-1], types.WorkDoneProgressEnd) and "ready" in reports[-1].message


@pytest.mark.parametrize("caps", CLIENTS)
async def test_inline_completion_one_item_automatic_several_invoked(client: LanguageClient, caps: str):
    await start(client, caps, {"debounceMs": 0, "numDrafts": 3})
    open_doc(client)
    type_at(client, 5, 18, "\n    ", 1)  # a new line in greet()
    auto = await inline(client, 6, 4)
    assert [i.insert_text for i in auto.items] == ["<fake 6:4>"]
    assert auto.items[0].range.start == auto.items[0].range.end == types.Position(line=6, character=4)
    assert auto.items[0].command.command == "editkv.suggestionAccepted"
    invoked = await inline(client, 6, 4, invoked=True)
    assert [i.insert_text for i in invoked.items] == ["<fake 6:4>", "<fake 6:4>#1", "<fake 6:4>#2"]


async def test_inline_completion_beside_an_open_dropdown_extends_its_selected_item(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 0})
    open_doc(client, "x = 1\nprint(na")
    word = types.Range(start=types.Position(line=1, character=6), end=types.Position(line=1, character=8))

    def beside(selected: types.SelectedCompletionInfo):
        return client.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=1, character=8),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic,
                                                  selected_completion_info=selected)))

    # VS Code shows ghost text beside its dropdown only when it starts with the selected item's
    # text over the item's range: the suggestion is given from the start of the word
    for selected in ("na", "na<fake"):
        result = await beside(types.SelectedCompletionInfo(range=word, text=selected))
        assert [(i.insert_text, i.range) for i in result.items] == [("na<fake 1:8>", word)]
        assert result.items[0].command.command == "editkv.suggestionAccepted"
    # a selected item the suggestion does not extend, or one over another range: nothing to show
    assert not (await beside(types.SelectedCompletionInfo(range=word, text="name"))).items
    other = types.Range(start=types.Position(line=1, character=5), end=types.Position(line=1, character=8))
    assert not (await beside(types.SelectedCompletionInfo(range=other, text="(na"))).items


@pytest.mark.parametrize("caps", CLIENTS)
async def test_completion_items_replace_the_word_and_sort_after_others(client: LanguageClient, caps: str):
    await start(client, caps, {"debounceMs": 0})
    text = "x = 1\nnamé = 2\nprint(na"
    open_doc(client, text)
    # UTF-8 (Neovim) counts "é" as 2 units, UTF-16 (VS Code) as 1: the position after it differs
    after_e = 4 if caps == "visual-studio-code" else 5
    type_at(client, 1, after_e, "x", 1)  # "naméx = 2" in either encoding
    result = await complete(client, 2, 8)
    assert result.is_incomplete is True
    first = result.items[0]
    assert first.text_edit.new_text == "na<fake 2:8>"
    assert first.text_edit.range.start == types.Position(line=2, character=6)  # the word "na" is replaced
    assert first.label.startswith("na<fake") and first.filter_text.startswith("na")
    assert first.sort_text.startswith("~") and first.detail.startswith("editkv")
    assert first.label_details.description == "editkv"
    assert first.kind == types.CompletionItemKind.Snippet
    assert first.insert_text_format == types.InsertTextFormat.PlainText
    # the change after the é went where the client meant it: the word before a cursor there is "naméx"
    on_line_1 = await complete(client, 1, after_e + 1)
    assert on_line_1.items[0].text_edit.new_text.startswith("naméx<fake")


async def test_invalid_settings_are_reported_and_defaults_used(client: LanguageClient):
    await start(client, "visual-studio-code",
                {"maxTokens": "lots", "multiline": "sometimes", "bogus": True, "debounceMs": 0})
    for _ in range(100):
        if len(client.messages) >= 3:
            break
        await asyncio.sleep(0.02)
    text = "\n".join(m.message for m in client.messages)
    assert "editkv.maxTokens" in text and "editkv.multiline" in text and "editkv.bogus" in text
    assert all(m.type == types.MessageType.Warning for m in client.messages)
    stats = await server_stats(client)
    assert stats["settings"]["max_tokens"] == 64 and stats["settings"]["multiline"] == "auto"
    open_doc(client)
    assert (await inline(client, 0, 0)).items  # still serving


async def test_did_change_configuration_applies_and_validates(client: LanguageClient):
    await start(client, "neovim", {"debounceMs": 0})
    open_doc(client)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"editkv": {"numDrafts": 2, "debounceMs": -5}}))
    for _ in range(100):
        if client.messages:
            break
        await asyncio.sleep(0.02)
    assert "editkv.debounceMs" in client.messages[0].message
    assert len((await inline(client, 0, 0, invoked=True)).items) == 2
    # settings pulled with workspace/configuration when the notification carries none
    client.set_configuration({"numDrafts": 1}, section="editkv")
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    for _ in range(100):
        if (await server_stats(client))["settings"]["num_drafts"] == 1:
            break
        await asyncio.sleep(0.02)
    assert len((await inline(client, 0, 0, invoked=True)).items) == 1


async def test_suggestion_events_become_statistics(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 0})
    open_doc(client)
    items = (await inline(client, 3, 0, invoked=True)).items
    ids = [item.command.arguments[0] for item in items]
    for sid in ids:
        client.protocol.notify("editkv/suggestionEvent", {"id": sid, "event": "shown"})
    client.protocol.notify("editkv/suggestionEvent", {"id": ids[1], "event": "rejected"})
    client.protocol.notify("editkv/suggestionEvent", {"id": 5, "event": "exploded"})  # malformed: ignored
    await client.workspace_execute_command_async(types.ExecuteCommandParams(
        command=items[0].command.command, arguments=items[0].command.arguments))
    stats = await server_stats(client)
    s = stats["suggestions"]
    assert (s["shown"], s["accepted"], s["rejected"]) == (3, 1, 1)
    assert s["acceptance_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["by_kind"]["inline"]["accepted"] == 1
    assert stats["requests"]["inline"]["served"] == 1


async def test_newer_request_supersedes_older_one_for_the_same_document(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 1000})
    open_doc(client)
    open_doc(client, "other = 1\n", uri="file:///work/other.py")
    for version, uri in ((1, URI), (2, URI), (1, "file:///work/other.py"), (2, "file:///work/other.py")):
        type_at(client, 0, 0, " ", version, uri=uri)  # a burst: keystrokes far less than 1 s apart
    started = time.perf_counter()
    first = asyncio.ensure_future(inline(client, 1, 0))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(inline(client, 2, 0))
    elsewhere = asyncio.ensure_future(inline(client, 0, 0, uri="file:///work/other.py"))
    dropdown = asyncio.ensure_future(complete(client, 2, 0))  # another kind: not superseded
    assert await first is None  # dropped, answered as soon as the second arrived, not after its debounce
    assert time.perf_counter() - started < 0.6
    assert [i.insert_text for i in (await second).items] == ["<fake 2:0>"]
    assert [i.insert_text for i in (await elsewhere).items] == ["<fake 0:0>"]
    assert (await dropdown).items
    stats = await server_stats(client)
    assert stats["requests"]["inline"]["dropped"] == 1 and stats["backend"]["completed"] == 3


async def test_the_debounce_holds_requests_only_in_a_burst_of_keystrokes(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 300})
    open_doc(client)
    type_at(client, 0, 0, "#", 1)
    await asyncio.sleep(0.4)  # slower than the debounce: a typing pace the server keeps up with
    type_at(client, 0, 1, " ", 2)
    assert (await inline(client, 0, 2)).items
    assert "debounced" not in (await server_stats(client))["requests"]["inline"]
    type_at(client, 0, 2, "a", 3)  # right after the last one: a burst, held for its end
    assert (await inline(client, 0, 3)).items
    assert (await server_stats(client))["requests"]["inline"]["debounced"] == 1


async def test_an_invoked_dropdown_is_not_debounced_in_a_burst_but_a_trigger_character_is(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 300})
    open_doc(client)
    type_at(client, 0, 0, "#", 1)
    type_at(client, 0, 1, ".", 2)  # a burst
    assert (await complete(client, 0, 2, invoked=False)).items
    assert (await server_stats(client))["requests"]["completion"]["debounced"] == 1
    type_at(client, 0, 2, "a", 3)  # a burst again, and Ctrl+Space
    type_at(client, 0, 3, "b", 4)
    assert (await complete(client, 0, 4, invoked=True)).items
    assert (await server_stats(client))["requests"]["completion"]["debounced"] == 1


async def test_edit_during_a_running_decode_drops_its_result(slow_client: LanguageClient):
    await start(slow_client, "visual-studio-code", {"debounceMs": 0})
    open_doc(slow_client)
    running = asyncio.ensure_future(inline(slow_client, 5, 4, invoked=True))
    await asyncio.sleep(0.2)  # the decode is running on the worker now
    started = time.perf_counter()
    type_at(slow_client, 5, 4, "x", 1)
    assert await running is None  # never the result for the old version
    assert time.perf_counter() - started < 1.0
    # the stopped decode freed the worker at its next step: a new request takes ~2 s, not ~3.8 s
    started = time.perf_counter()
    fresh = await inline(slow_client, 5, 5, invoked=True)
    assert fresh.items[0].insert_text == "<fake 5:5>"
    assert time.perf_counter() - started < 3.0


async def test_cancel_request_stops_the_running_decode(slow_client: LanguageClient):
    await start(slow_client, "neovim", {"debounceMs": 0})
    open_doc(slow_client)
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=1, character=0),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))
    request = asyncio.wrap_future(slow_client.protocol.send_request(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="to-cancel"))
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    slow_client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="to-cancel"))
    with pytest.raises(JsonRpcException) as err:
        await request
    assert err.value.code == -32800  # RequestCancelled
    fresh = await inline(slow_client, 2, 0, invoked=True)
    assert fresh.items[0].insert_text == "<fake 2:0>"
    assert time.perf_counter() - started < 3.0  # ~2 s: the cancelled decode did not run its remaining ~1.8 s
    stats = await server_stats(slow_client)
    assert stats["requests"]["inline"]["cancelled"] == 1 and stats["backend"]["completed"] == 1


async def test_unknown_document_and_bad_position_are_invalid_params(client: LanguageClient):
    await start(client, "visual-studio-code", {"debounceMs": 0})
    with pytest.raises(JsonRpcException, match="not open"):
        await inline(client, 0, 0, uri="file:///nowhere.py")
    open_doc(client)
    with pytest.raises(JsonRpcException, match="past the end"):
        await complete(client, 500, 0)
    # a character past the end of its line means the end of the line (LSP)
    items = (await inline(client, 0, 99)).items
    assert items[0].range.start == types.Position(line=0, character=9)
    client.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=URI)))
    with pytest.raises(JsonRpcException, match="not open"):
        await inline(client, 0, 0)
