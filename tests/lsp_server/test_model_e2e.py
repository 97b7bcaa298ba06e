"""The real path: client -> `editkv lsp` -> ModelBackend (edit_cache + engine) on a tiny model.

The checkpoint is random, so these tests check that requests go through the model (FIM view,
decoded tokens, PIE repair after edits) and how loading problems are handled, not what the
suggestions say.
"""

import asyncio

import pytest
import pytest_lsp
from lsp_testing import SERVER_ENV, lsp_command
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities
from test_protocol import complete, inline, open_doc, plain, server_stats, start, type_at, wait_loaded

pytestmark = pytest.mark.asyncio


@pytest_lsp.fixture(config=ClientServerConfig(server_command=lsp_command("--device", "cpu"), server_env=SERVER_ENV))
async def client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


@pytest.mark.parametrize("caps", ["visual-studio-code", "neovim"])
async def test_completions_from_a_real_model(client: LanguageClient, caps: str, tiny_model):
    await start(client, caps, {"model": str(tiny_model), "debounceMs": 0, "maxTokens": 8, "multiline": "always"})
    [reports] = client.progress_reports.values()
    assert str(tiny_model) in reports[-1].message and "cpu" in reports[-1].message
    # which view `view: auto` serves and why: no calibration, so the model's FIM tokens decide
    assert "view auto = fim: the model has FIM tokens; `editkv calibrate --view`" in reports[-1].message
    open_doc(client)
    type_at(client, 12, 0, "    def norm(self):\n        return ", 1)
    for i, ch in enumerate("sel"):  # keystrokes: each is a pending edit, repaired lazily
        type_at(client, 13, 15 + i, ch, 2 + i)
    result = await inline(client, 13, 18, invoked=True)
    assert result is not None and all("\ufffd" not in item.insert_text for item in result.items)
    stats = await server_stats(client)
    last = stats["backend"]["last_request"]
    assert last["view"] == "fim" and last["decode_tokens"] > 0 and last["forwards"] >= 1
    assert last["view_why"].startswith("auto: the model has FIM tokens")
    # from its arrival to the worker's start, within its latency; made after the 4 changes
    assert 0 <= last["wait_ms"] <= stats["latency_ms"]["p50"] and last["edits"] == 4
    assert last["total_ms"] <= last["worker_ms"] <= stats["latency_ms"]["p50"]
    assert stats["backend"]["view"]["auto"] == "fim"
    assert stats["backend"]["view"]["why"].startswith("the model has FIM tokens")
    assert stats["requests"]["inline"]["served"] == 1
    # where its time went: the backend's share and its decode within it, all within the latency
    phases = stats["phases_ms"]
    assert 0 < phases["decode"]["p50"] <= phases["backend"]["p50"] <= stats["latency_ms"]["p50"]
    assert phases["waiting"]["p50"] == pytest.approx(stats["latency_ms"]["p50"] - phases["backend"]["p50"], abs=0.2)
    # one more keystroke: the cache is repaired (PIE), not rebuilt, before the next view
    type_at(client, 13, 18, "f", 5)
    dropdown = await complete(client, 13, 19)
    assert dropdown.is_incomplete is True
    stats = await server_stats(client)
    assert stats["backend"]["completed"] == 2 and stats["requests"]["completion"]["served"] == 1
    assert stats["backend"]["last_request"]["view_encoded_tokens"] < 40  # the file itself was not re-read


async def test_bad_model_path_is_reported_then_a_good_one_loads(client: LanguageClient, tiny_model, tmp_path):
    options = {"model": str(tmp_path / "missing"), "statsFile": False, "debounceMs": 0}
    await client.initialize_session(types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), initialization_options=options))
    await wait_loaded(client)
    for _ in range(200):
        if client.messages:
            break
        await asyncio.sleep(0.02)
    error = client.messages[0]
    assert error.type == types.MessageType.Error and "missing" in error.message
    open_doc(client)
    assert list((await inline(client, 1, 0)).items) == []  # alive, nothing to suggest with
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"editkv": {"model": str(tiny_model), "cacheMode": "recompute", "maxTokens": 4}}))
    await wait_loaded(client, loads=2)
    assert (await server_stats(client))["backend"]["ready"]
    assert await inline(client, 1, 0, invoked=True) is not None
    stats = await server_stats(client)
    assert stats["backend"]["completed"] == 1 and stats["backend"]["last_request"]["decode_tokens"] > 0
    assert stats["settings"]["cache_mode"] == "recompute"


async def test_decoding_strategies_and_their_counters_reach_editkv_stats(client: LanguageClient, tiny_model):
    """One draft: n-gram speculation; several: superposed decoding; the settings switch both off."""
    await start(client, "visual-studio-code", {"model": str(tiny_model), "debounceMs": 0, "maxTokens": 6})
    open_doc(client)

    async def last_request():
        return (await server_stats(client))["backend"]["last_request"]

    assert await inline(client, 1, 0) is not None  # typing: one draft
    last = await last_request()
    assert last["strategy"] == "speculative"
    assert {"spec_drafted", "spec_accepted", "spec_bonus", "spec_forwards"} <= set(last)
    assert last["spec_forwards"] == last["forwards"]
    await complete(client, 1, 0)  # the dropdown: numDrafts suggestions
    last = await last_request()
    assert last["strategy"] == "superposed" and last["superposed_steps"] >= 1
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"editkv": {"speculation": False, "superposed": False}}))
    assert await inline(client, 1, 0) is not None
    assert (await last_request())["strategy"] == "greedy"
    await complete(client, 1, 0)
    assert (await last_request())["strategy"] == "top_first"
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"editkv": {"beamSearch": True}}))
    await complete(client, 1, 0)
    assert (await last_request())["strategy"] == "beam"
    assert (await server_stats(client))["settings"]["speculation"] is False


async def test_documents_restored_at_once_are_read_at_first_use_then_in_the_background(client: LanguageClient,
                                                                                        tiny_model):
    """An editor restoring its tabs opens them all before its first request: that request is
    answered with only its own document read; background work reads the others (with their
    edits), and `editkv/stats` counts them."""
    await start(client, "visual-studio-code", {"model": str(tiny_model), "debounceMs": 0, "maxTokens": 4,
                                               "idleRefreshMs": 200})
    tabs = [f"file:///w/tab{i}.py" for i in range(4)]
    for i, uri in enumerate(tabs):
        open_doc(client, f"def tab{i}(x):\n    return x + {i}\n", uri)
    type_at(client, 1, 15, " * 2", 1, uri=tabs[2])
    assert await inline(client, 1, 4, invoked=True, uri=tabs[0]) is not None
    assert (await server_stats(client))["backend"]["last_request"]["view"]
    for _ in range(300):
        backend = (await server_stats(client))["backend"]
        if backend["unread_documents"] == 0:
            break
        await asyncio.sleep(0.05)
    assert backend["unread_documents"] == 0 and backend["idle_reads"] == 3
    debug = plain(await client.protocol.send_request_async("editkv/debugDocument", {"uri": tabs[2]}))
    assert debug["modelled"] and debug["backend"]["text_sha256"] == debug["text_sha256"]
