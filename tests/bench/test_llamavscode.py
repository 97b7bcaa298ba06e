"""The llama.vscode client the replay bench drives llama-server with: its requests, rules and scheduling."""

import asyncio
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from peers.llamavscode import (  # noqa: E402
    LlamaVscodeClient,
    ResultCache,
    Ring,
    Settings,
    document_lines,
    fim_context,
    infill_payload,
    parse_response,
    prefetches,
    should_discard,
    suggestion_lines,
    update_suggestion,
    warm_payload,
)

S = Settings()


def test_context_takes_256_lines_above_64_below_and_the_typed_part_of_the_line():
    lines = [f"line{i}" for i in range(400)]
    lines[300] = "    x = fo"
    ctx = fim_context(lines, 300, 10, S)
    assert ctx.input_prefix == "\n".join(f"line{i}" for i in range(44, 300)) + "\n"
    assert ctx.input_suffix == "\n" + "\n".join(f"line{i}" for i in range(301, 365)) + "\n"
    assert (ctx.prompt, ctx.line_suffix, ctx.n_indent) == ("    x = fo", "", 4)
    mid = fim_context(lines, 300, 6, S)  # cursor mid-line: the rest of the line opens the suffix
    assert (mid.prompt, mid.line_suffix) == ("    x ", "= fo")
    assert mid.input_suffix.startswith("= fo\nline301\n")


def test_context_near_the_edges_and_utf16_columns():
    lines = document_lines("a\r\nb😀c\nlast")
    assert lines == ["a", "b😀c", "last"]
    ctx = fim_context(lines, 1, 3, S)  # the emoji is two UTF-16 units
    assert (ctx.prompt, ctx.line_suffix) == ("b😀", "c")
    assert ctx.input_prefix == "a\n" and ctx.input_suffix == "c\nlast\n"
    top = fim_context(lines, 0, 0, S)
    assert top.input_prefix == "\n"  # no line above: llama.vscode still sends the "\n"
    bottom = fim_context(lines, 2, 4, S)
    assert bottom.input_suffix == "\n\n"


def test_infill_body_has_llama_vscode_fields():
    chunks = [{"text": "def f():\n", "time": 1, "filename": "a.py"}]
    body = infill_payload("pre\n", "\nsuf\n", "    ret", chunks, 4, S)
    assert body == {"input_prefix": "pre\n", "input_suffix": "\nsuf\n", "input_extra": chunks, "prompt": "    ret",
                    "n_predict": 128, "top_k": 40, "top_p": 0.99, "stream": False,
                    "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
                    "t_max_prompt_ms": 500, "t_max_predict_ms": 500}
    assert "n_indent" not in infill_payload("", "", "", [], 0, S)
    warm = warm_payload(chunks, S)
    assert warm["n_predict"] == 0 and warm["samplers"] == [] and warm["t_max_predict_ms"] == 1
    assert warm["input_extra"] == chunks and warm["cache_prompt"] is True


def test_answers_lose_trailing_blank_lines_and_repeats_are_discarded():
    assert suggestion_lines("a\r\nb\n\n  \n") == ["a", "b"]
    doc = ["def f(x):", "    ", "", "    return x", "y = 1"]
    assert should_discard([], doc, 1, "    ", "")
    assert should_discard(["   "], doc, 1, "    ", "")
    assert should_discard(["return x"], doc, 1, "    ", "")  # the next non-blank line again
    assert not should_discard(["return x + 1"], doc, 1, "    ", "")
    assert should_discard(["return x", "y = 1"], doc, 1, "    ", "")  # and the line after it
    assert should_discard(["", "", "    return x"], doc, 1, "    ", "")  # blank first line, then the lines below
    assert should_discard(["= 2"], ["x = 2", "z"], 0, "x ", "= 2")  # only the text right of the cursor
    assert not should_discard(["anything"], doc, 4, "y = 1", "")  # the last line: never discarded
    # a rule reading past the end fails in llama.vscode and shows nothing
    assert should_discard(["return x", "more"], ["def f(x):", "    ", "    return x"], 1, "    ", "")


def test_text_right_of_the_cursor_keeps_only_the_first_line():
    assert update_suggestion(["foo(a)", "bar"], ")") == "foo(a"
    assert update_suggestion(["foo(a", "bar"], ")") == "foo(a"
    assert update_suggestion(["foo(a", "bar"], "") == "foo(a\nbar"
    assert update_suggestion(["foo(a", "bar"], "  ") == "foo(a\nbar"


def test_cache_answers_the_rest_of_a_suggestion_being_typed_and_evicts_oldest():
    cache = ResultCache(2)
    cache.put("p|s|x = ", "foo(1)")
    assert cache.lookup("p", "s", "x = ") == "foo(1)"
    assert cache.lookup("p", "s", "x = fo") == "o(1)"
    assert cache.lookup("p", "s", "x = fa") is None  # typed text disagrees with the suggestion
    assert cache.lookup("q", "s", "x = fo") is None
    cache.put("a|b|", "1")
    cache.lookup("p", "s", "x = ")  # used: stays
    cache.put("c|d|", "2")
    assert cache.get("a|b|") is None and cache.get("p|s|x = ") == "foo(1)"


def test_prefetches_after_a_one_line_and_a_multi_line_answer():
    ctx = fim_context(["def f():", "    ret", "x"], 1, 7, S)
    one = prefetches(ctx, ["urn 1"], S.n_prefix)
    assert len(one) == 1 and one[0].prompt == "    return 1" and one[0].input_prefix == ctx.input_prefix
    assert one[0].n_indent == 4 and one[0].content is None
    two = prefetches(ctx, ["urn (", "    1)"], S.n_prefix)
    assert two[0].input_prefix == "def f():\n    return (\n" and two[0].prompt == "    1)"
    assert (two[1].input_prefix, two[1].prompt, two[1].content) == ("def f():\n    return (\n", "", "    1)")
    short = prefetches(ctx, ["urn (", "    1)"], 1)  # the longer prefix is cut to n_prefix lines
    assert short[0].input_prefix == "    return (\n"


def test_ring_chunks_are_half_windows_deduplicated_and_capped():
    ring = Ring(Settings(ring_n_chunks=2), random.Random(1))
    ring.pick(["a", "b"], "f.py", True, 0)
    assert not ring.queued  # fewer than 3 lines
    long = [f"l{i}" for i in range(100)]
    ring.pick(long, "g.py", True, 0)
    assert len(ring.queued_lines[0]) == 32 and ring.queued[0]["filename"] == "g.py"
    text = ring.queued[0]["text"]
    assert text.endswith("\n") and text == "\n".join(ring.queued_lines[0]) + "\n"
    ring.pick(["x", "y", "z"], "h.py", True, 0)
    ring.pick(["x", "y", "z"], "h.py", True, 0)  # the same text again: not queued twice
    assert len(ring.queued) == 2
    ring.pick(["p", "q", "r"], "i.py", False, 0)
    while ring.promote():
        pass
    assert [c["filename"] for c in ring.chunks] == ["h.py", "i.py"]  # at most ring_n_chunks, oldest out
    ring.pick(["x", "y", "z", "w"], "j.py", True, 0)  # 3/4 similar: not enough to evict
    ring.pick(["p", "q", "r"], "k.py", True, 0)  # the same text as a ring chunk: not queued
    assert [c["filename"] for c in ring.queued] == ["j.py"]
    ring.pick(["p", "q", "r", "r"], "k.py", True, 0)  # the same set of lines: evicts i.py's chunk
    assert [c["filename"] for c in ring.chunks] == ["h.py"] and ring.evicted == 1


def test_chunks_near_the_cursor_only_after_moving_far():
    ring = Ring(S, random.Random(0))
    doc = [f"l{i}" for i in range(2000)]
    ring.pick_near_cursor(doc, 1000, "f.py", 0)
    assert len(ring.queued) == 2
    assert all(line in doc[0:745] for line in ring.queued_lines[0])  # [line - 1024, line - 256]
    assert all(line in doc[1064:1129] for line in ring.queued_lines[1])  # [line + 64, line + 128]
    ring.pick_near_cursor(doc, 1030, "f.py", 0)
    assert len(ring.queued) == 2


def test_http_responses_with_length_or_chunks():
    assert parse_response(b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"content":1}') == (200, {"content": 1})
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
    assert parse_response(chunked) == (200, {"a": 1})


# ---- the client against a fake llama-server ------------------------------------------------------


class FakeServer:
    """Answers /infill with `content` after `delay` seconds; records every body."""

    def __init__(self, content: str = "return a + b", delay: float = 0.0) -> None:
        self.content, self.delay = content, delay
        self.bodies: list[dict] = []
        self.finished = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        sizes = [h.split(":")[1] for h in head.decode().split("\r\n") if h.lower().startswith("content-length")]
        length = int(sizes[0])
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        await asyncio.sleep(self.delay if body["n_predict"] else 0)
        out = json.dumps({"content": self.content if body["n_predict"] else "",
                          "timings": {"prompt_n": 7, "cache_n": 3, "predicted_n": 2}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
        await writer.drain()
        writer.close()
        self.finished += 1


def run_with_server(fake: FakeServer, scenario, settings: Settings = S):
    async def main():
        server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = LlamaVscodeClient("127.0.0.1", port, settings)
        try:
            return await scenario(client)
        finally:
            await client.close()
            server.close()

    return asyncio.run(main())


URI = "file:///t.py"


def open_doc(client, text):
    client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 0,
                                                            "text": text}})


def type_char(client, line, col, ch):
    client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": 1}, "contentChanges": [
        {"range": {"start": {"line": line, "character": col}, "end": {"line": line, "character": col}}, "text": ch}]})
    return client.send_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": URI}, "position": {"line": line, "character": col + 1}, "context": {"triggerKind": 2}})


def test_client_sends_ring_chunks_and_answers_typed_ahead_from_its_cache():
    fake = FakeServer("eturn a + b")

    async def scenario(client):
        client.begin_record([("pkg/util.py", "def helper():\n    return 1\n\n\nX = 2\n")], "rec")
        open_doc(client, "def add(a, b):\n    \n")
        _, first = type_char(client, 1, 4, "r")
        first = await first
        await client.idle()
        asked = len(fake.bodies)
        _, second = type_char(client, 1, 5, "e")
        second = await second
        stats = await client.request("editkv/stats")
        return first, second, asked, stats

    first, second, asked, stats = run_with_server(fake, scenario)
    assert first == {"items": [{"insertText": "eturn a + b"}]}
    assert second == {"items": [{"insertText": "turn a + b"}]}
    assert len(fake.bodies) == asked  # the second keystroke was answered from the cache: no request
    warm, keystroke = fake.bodies[0], fake.bodies[1]
    assert warm["n_predict"] == 0 and warm["input_extra"][0]["filename"] == "pkg/util.py"
    assert keystroke["prompt"] == "    r" and keystroke["input_prefix"] == "def add(a, b):\n"
    assert keystroke["input_extra"] == warm["input_extra"] and keystroke["n_indent"] == 4
    assert [b["prompt"] for b in fake.bodies[2:]] == ["    return a + b"]  # the prefetch: suggestion accepted
    assert stats["backend"]["encoded_tokens"] == 7 * len(fake.bodies)


def test_a_keystroke_waits_for_the_request_in_progress_and_gives_up_when_cancelled():
    fake = FakeServer("x", delay=0.5)

    async def scenario(client):
        open_doc(client, "a = 1\n\n")
        first_id, first = type_char(client, 1, 0, "b")
        await asyncio.sleep(0.05)
        second_id, second = type_char(client, 1, 1, " ")
        await asyncio.sleep(0.2)
        client.cancel(first_id)  # VS Code's token: llama.vscode does not abort the request already sent
        client.cancel(second_id)  # still waiting for the first: gives up at its next poll
        _, third = type_char(client, 1, 2, "=")
        answers = await first, await second, await third
        return answers, [c.kind for c in client.calls]

    (first, second, third), kinds = run_with_server(fake, scenario)
    assert first == {"items": [{"insertText": "x"}]}  # ran to its end although cancelled
    assert second is None  # gave up while it waited: nothing sent for it
    assert third == {"items": [{"insertText": "x"}]}  # sent once the first was done
    assert kinds == ["keystroke", "keystroke"]  # no prefetch after the cancelled first


def test_too_much_text_right_of_the_cursor_sends_nothing():
    fake = FakeServer()

    async def scenario(client):
        open_doc(client, "x = \nfoo(1, 2, 3, 4)\n")
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": 1}, "contentChanges": [
            {"range": {"start": {"line": 1, "character": 0}, "end": {"line": 1, "character": 0}}, "text": "y"}]})
        _, answer = client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": URI}, "position": {"line": 1, "character": 1}, "context": {"triggerKind": 2}})
        return await answer

    assert run_with_server(fake, scenario) is None
    assert fake.bodies == []


@pytest.mark.parametrize("bad", [{"n_prefx": 3}])
def test_unknown_settings_are_refused(bad):
    with pytest.raises(ValueError, match="n_prefx"):
        Settings.from_dict(bad)
