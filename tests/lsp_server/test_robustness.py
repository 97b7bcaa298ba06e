"""Bad input over raw JSON-RPC: each gets a proper error or is dropped, and the server lives on.

Malformed JSON, undecodable params, unknown methods, out-of-range positions, unknown URIs, a
10 MB file, NUL bytes, a cancel storm at 50 keystrokes/s. After each, other documents are
intact (checked through the word a completion replaces, which the server reads from its copy
of the text) and memory stays bounded.
"""

import asyncio
import time

import pytest
import pytest_asyncio
from editkv.lsp_server.lsp_client import LspClient, LspError
from lsp_testing import SERVER_ENV, lsp_command

pytestmark = pytest.mark.asyncio
A = "file:///work/a.py"
B = "file:///work/b.py"


async def started(*args: str, options: dict | None = None) -> LspClient:
    client = await LspClient.start(lsp_command("--fake", *args), env=SERVER_ENV)
    await client.initialize(options={"statsFile": False, "debounceMs": 0, **(options or {})})
    await client.wait_ready(30)
    return client


@pytest_asyncio.fixture
async def client():
    client = await started()
    yield client
    assert await client.close() == 0, client.stderr_text()


def open_doc(client: LspClient, uri: str, text: str) -> None:
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 0,
                                                            "text": text}})


def change(client: LspClient, uri: str, version: int, line: int, char: int, text: str,
           end: tuple[int, int] | None = None) -> None:
    end_line, end_char = end or (line, char)
    client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": [
        {"range": {"start": {"line": line, "character": char}, "end": {"line": end_line, "character": end_char}},
         "text": text}]})


def inline_params(uri: str, line: int, char: int, kind: int = 1) -> dict:
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": char},
            "context": {"triggerKind": kind}}


async def word_before(client: LspClient, uri: str, line: int, char: int) -> str:
    """The identifier before (line, char) in the server's copy of the document."""
    result = await client.request("textDocument/completion", {"textDocument": {"uri": uri},
                                                              "position": {"line": line, "character": char}})
    new_text = result["items"][0]["textEdit"]["newText"]
    return new_text[: new_text.index("<fake")]


def rss_mb(client: LspClient) -> float:
    with open(f"/proc/{client.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_malformed_messages_get_json_rpc_errors(client: LspClient):
    open_doc(client, B, "beta = 1\n")
    client.send_raw(b"{not json")
    client.send_raw(b"\xff\xfe\x00 not utf-8")
    client.send_raw(b"[" * 100000 + b"]" * 100000)  # nested deeper than the JSON parser goes
    client.send_raw(b'{"jsonrpc": "2.0", "id": 77, "method": "textDocument/inlineCompletion", "params": {"x": 5}}')
    client.send_raw(b'{"id": 78, "method": "editkv/stats"}')
    client.send_raw(b"[1, 2, 3]")
    client.send_raw(b'"just a string"')
    errors = await client.wait_for(lambda m, p: m == "<response>" and p.get("id") == 78, timeout=10)
    responses = {}
    for method, message in client.notifications:
        if method == "<response>":
            responses.setdefault(message["id"], []).append(message["error"]["code"])
    assert responses[None] == [-32700, -32700, -32700]  # parse errors answer with id null
    assert responses[77] == [-32602]  # params that don't fit the method
    assert errors["error"]["code"] == -32600  # no "jsonrpc": "2.0"
    assert await word_before(client, B, 0, 4) == "beta"  # alive, state intact


async def test_unknown_methods(client: LspClient):
    with pytest.raises(LspError) as err:
        await client.request("textDocument/teleport", {"where": "mars"})
    assert err.value.code == -32601
    client.notify("editkv/noSuchNotification", {"x": 1})  # ignored
    client.notify("$/setTrace", {"value": "off"})
    assert (await client.request("editkv/stats"))["backend"]["ready"]


async def test_positions_out_of_range(client: LspClient):
    open_doc(client, A, "alpha = 1\nbeta = 2\n")
    for bad in ({"line": 99, "character": 0}, {"line": -1, "character": 0}, {"line": 0, "character": -3}):
        with pytest.raises(LspError) as err:
            await client.request("textDocument/inlineCompletion",
                                 {**inline_params(A, 0, 0), "position": bad})
        assert err.value.code == -32602, bad
    # a change whose range is not in the document is reported once; the document is then out of
    # sync: completions are refused with a reason, incremental changes wait for the whole text
    change(client, A, 1, 40, 0, "zzz")
    error = await client.wait_for(lambda m, p: m == "window/showMessage" and "did not fit" in p["message"])
    assert error["type"] == 1 and "reopen" in error["message"]
    for method in ("textDocument/inlineCompletion", "textDocument/completion"):
        with pytest.raises(LspError) as err:
            await client.request(method, inline_params(A, 1, 4))
        assert err.value.code == -32803 and "resync" in err.value.message, method
    change(client, A, 2, 1, 4, "ta")  # applies to a text the server no longer trusts: ignored
    with pytest.raises(LspError):
        await word_before(client, A, 1, 6)
    # the whole text (what editors send for a reload) resyncs it
    client.notify("textDocument/didChange", {"textDocument": {"uri": A, "version": 3},
                                             "contentChanges": [{"text": "alpha = 1\nbetamax = 2\n"}]})
    await client.wait_for(lambda m, p: m == "window/showMessage" and "in sync again" in p["message"])
    assert await word_before(client, A, 1, 7) == "betamax"
    change(client, A, 4, 1, 7, "_x")  # and incremental changes apply again
    assert await word_before(client, A, 1, 9) == "betamax_x"
    # a failed change inside a batch leaves none of the batch applied; a new didOpen also resyncs
    client.notify("textDocument/didChange", {"textDocument": {"uri": A, "version": 5}, "contentChanges": [
        {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"},
        {"range": {"start": {"line": 9, "character": 0}, "end": {"line": 9, "character": 0}}, "text": "y"}]})
    with pytest.raises(LspError):
        await word_before(client, A, 0, 6)
    open_doc(client, A, "gamma = 3\n")
    assert await word_before(client, A, 0, 5) == "gamma"


async def test_unknown_uris(client: LspClient):
    change(client, "file:///ghost.py", 1, 0, 0, "x")  # notifications for unknown documents: ignored
    client.notify("textDocument/didClose", {"textDocument": {"uri": "file:///ghost.py"}})
    for method in ("textDocument/inlineCompletion", "textDocument/completion"):
        with pytest.raises(LspError) as err:
            await client.request(method, inline_params("file:///ghost.py", 0, 0))
        assert err.value.code == -32602 and "not open" in err.value.message


async def test_request_before_initialize_is_refused():
    client = await LspClient.start(lsp_command("--fake"), env=SERVER_ENV)
    try:
        with pytest.raises(LspError) as err:
            await client.request("textDocument/inlineCompletion", inline_params(A, 0, 0))
        assert err.value.code == -32002
    finally:
        await client.close()


async def test_ten_megabyte_file_is_refused_and_others_stay_intact(client: LspClient):
    open_doc(client, B, "beta = 1\n")
    base = rss_mb(client)
    line = "value_%07d = compute(value_%07d) + 1  # padding padding padding\n"
    big = "".join(line % (i, i) for i in range(10 * 2**20 // len(line % (0, 0)) + 1))
    assert len(big) > 10 * 2**20
    open_doc(client, A, big)
    warning = await client.wait_for(lambda m, p: m == "window/showMessage" and "a.py" in p["message"])
    assert "MB" in warning["message"] and "maxFileKb" in warning["message"]
    assert (await client.request("textDocument/inlineCompletion", inline_params(A, 5, 3)))["items"] == []
    started_at = time.perf_counter()
    for i in range(20):  # typing into it stays cheap: its text is not kept
        change(client, A, i + 1, 3, 0, "x")
    assert await word_before(client, B, 0, 4) == "beta"
    assert time.perf_counter() - started_at < 2.0
    client.notify("textDocument/didClose", {"textDocument": {"uri": A}})
    assert await word_before(client, B, 0, 4) == "beta"
    assert rss_mb(client) - base < 250, (base, rss_mb(client))


async def test_binary_content_is_refused(client: LspClient):
    open_doc(client, A, "header\x00\x01\x02\x03payload\n")
    warning = await client.wait_for(lambda m, p: m == "window/showMessage" and "NUL" in p["message"])
    assert "a.py" in warning["message"]
    assert (await client.request("textDocument/inlineCompletion", inline_params(A, 0, 2)))["items"] == []
    # a NUL typed into a text document turns it off as well
    open_doc(client, B, "beta = 1\n")
    change(client, B, 1, 0, 0, "\x00")
    await client.wait_for(lambda m, p: m == "window/showMessage" and "b.py" in p["message"])
    assert (await client.request("textDocument/inlineCompletion", inline_params(B, 0, 2)))["items"] == []
    # so does half a surrogate pair, which JSON can carry but no text file holds
    client.send_raw(b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": '
                    b'{"uri": "file:///work/c.py", "languageId": "python", "version": 0, "text": "x = \\ud800\\n"}}}')
    await client.wait_for(lambda m, p: m == "window/showMessage" and "surrogates" in p["message"])
    assert (await client.request("textDocument/inlineCompletion",
                                 inline_params("file:///work/c.py", 0, 2)))["items"] == []


async def test_whole_document_changes(client: LspClient):
    open_doc(client, A, "alpha = 1\n")
    client.notify("textDocument/didChange", {"textDocument": {"uri": A, "version": 1},
                                             "contentChanges": [{"text": "gamma = 3\ndelta = 4\n"}]})
    assert await word_before(client, A, 1, 5) == "delta"


async def test_cancel_storm_at_50_keystrokes_per_second():
    client = await started("--fake-delay-ms", "100", options={"debounceMs": 40})
    try:
        open_doc(client, A, "def f():\n    \n")
        open_doc(client, B, "beta = 1\n")
        await word_before(client, B, 0, 4)
        base = rss_mb(client)
        typed = "abcdefghijklmnopqrstuvwxyz" * 6  # 156 keystrokes over ~3 s
        futures = []
        previous = None
        for i, ch in enumerate(typed):
            change(client, A, i + 1, 1, 4 + i, ch)
            if previous is not None:
                client.cancel(previous)
            previous, future = client.send_request("textDocument/inlineCompletion", inline_params(A, 1, 5 + i, kind=2))
            futures.append(future)
            await asyncio.sleep(0.02)
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        outcomes = {"served": 0, "dropped": 0, "cancelled": 0}
        for r in results:
            if isinstance(r, LspError):
                assert r.code == -32800, r
                outcomes["cancelled"] += 1
            elif r is None:
                outcomes["dropped"] += 1
            else:
                outcomes["served"] += 1
        last = results[-1]
        assert last["items"][0]["insertText"] == f"<fake 1:{4 + len(typed)}>"
        # nearly everything was stale (superseded or cancelled) before the model saw it
        assert outcomes["dropped"] + outcomes["cancelled"] >= 0.9 * len(typed), outcomes
        stats = await client.request("editkv/stats")
        assert stats["backend"]["completed"] <= 0.1 * len(typed)
        assert all(not d["pending"] for d in stats["documents"].values())
        assert await word_before(client, A, 1, 4 + len(typed)) == typed  # every change applied, in order
        assert await word_before(client, B, 0, 4) == "beta"
        assert rss_mb(client) - base < 40, (base, rss_mb(client))
    finally:
        assert await client.close() == 0, client.stderr_text()


async def test_handler_bookkeeping_is_released_after_a_long_session(client: LspClient):
    # pygls files each handler's future under the message's id; notifications (every keystroke)
    # got fresh ids nothing removed, so a long session kept one Future per keystroke
    for n in range(20):
        uri = f"file:///work/m{n}.py"
        open_doc(client, uri, "x = 1\n")
        for i in range(30):
            change(client, uri, i + 1, 0, 5 + i, "y")
        msg_id, future = client.send_request("textDocument/inlineCompletion", inline_params(uri, 0, 35))
        if n % 2:
            client.cancel(msg_id)
        await asyncio.gather(future, return_exceptions=True)
        client.notify("workspace/didChangeConfiguration", {"settings": {"editkv": {"maxTokens": 4 + n % 2}}})
        client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    stats = await client.request("editkv/stats")
    assert not stats["documents"]
    assert stats["handlers_in_flight"] <= 2, stats["handlers_in_flight"]  # was 661: one per notification


async def test_debug_memory_reports_growth_only_when_enabled(client: LspClient):
    with pytest.raises(LspError) as err:
        await client.request("editkv/debugMemory", {})
    assert err.value.code == -32602 and "EDITKV_TRACEMALLOC" in err.value.message
    traced = await LspClient.start(lsp_command("--fake"), env={**SERVER_ENV, "EDITKV_TRACEMALLOC": "1"})
    try:
        await traced.initialize(options={"statsFile": False, "debounceMs": 0})
        await traced.wait_ready(30)
        await traced.request("editkv/debugMemory", {})  # the baseline from here on
        for n in range(50):
            open_doc(traced, f"file:///work/m{n}.py", "x = 1\n" * 2000)  # the fake keeps each text
        report = await traced.request("editkv/debugMemory", {"trim": True, "top": 5})
        assert report["rss_mb"] > 0 and report["rss_mb_after_trim"] > 0 and report["traced_mb"] > 0
        assert len(report["growth"]) == 5
        assert sum(g["size_diff_kb"] for g in report["growth"]) > 50 * 12_000 / 1024 / 2  # the 50 texts' ~600 KB
        assert any(t["type"] == "DocState" and t["diff"] == 50 for t in report["types_grown"]), report["types_grown"]
    finally:
        assert await traced.close() == 0, traced.stderr_text()
