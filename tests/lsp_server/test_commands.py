"""`editkv lsp --tcp` and `editkv demo` as subprocesses (bench/lsp_replay.py: tests/bench/)."""

import asyncio
import gzip
import json
import socket
import subprocess
import sys

import pytest
from lsp_testing import ROOT, SERVER_ENV, lsp_command


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=SERVER_ENV, cwd=ROOT)


def test_demo_types_the_bundled_example():
    proc = run("-m", "editkv.lsp_server.cli", "demo", "--fake", "--interval-ms", "0", "--max-keys", "12")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "server ready: fake backend" in out and "inventory.py: 12 keystrokes" in out
    assert "'<fake 34:1>'" in out  # the second keystroke's suggestion, line 34 of inventory.py
    assert "3 suggestion(s) to cycle through" in out and "p50 ms" in out and "p95 ms" in out


def test_demo_on_a_real_model(tiny_model):
    proc = run("-m", "editkv.lsp_server.cli", "demo", "--model", str(tiny_model), "--device", "cpu",
               "--interval-ms", "0", "--max-keys", "8")
    assert proc.returncode == 0, proc.stderr
    assert f"server ready: {tiny_model} on cpu" in proc.stdout and "keystrokes" in proc.stdout


def test_demo_with_a_bad_model_is_one_clear_line(tmp_path):
    proc = run("-m", "editkv.lsp_server.cli", "demo", "--model", str(tmp_path / "nope"), "--device", "cpu")
    assert proc.returncode == 2
    assert "editkv: error: could not load the model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture()
def records(tmp_path):
    before = "import os\n\n\ndef main():\n    print(os.getcwd())\n"
    record = {"id": "example/repo@abc1234:tool.py", "repo": "example/repo", "path": "tool.py", "before": before,
              "edits": [{"range": {"start": {"line": 4, "character": 10}, "end": {"line": 4, "character": 22}},
                         "text": "sorted(os.listdir())"}]}
    path = tmp_path / "edits.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(record) + "\n")
    return path


def test_demo_replays_realedits_records(records):
    proc = run("-m", "editkv.lsp_server.cli", "demo", "--fake", "--data", str(records), "--interval-ms", "0")
    assert proc.returncode == 0, proc.stderr
    assert "example/repo@abc1234:tool.py: 21 keystrokes" in proc.stdout  # 1 deletion + 20 characters
    assert "<del>" in proc.stdout


def test_lsp_over_tcp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(lsp_command("--fake", "--tcp", "--port", str(port)), env=SERVER_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        result = asyncio.run(_tcp_initialize(port))
        assert result["result"]["capabilities"]["inlineCompletionProvider"] is not None
    finally:
        server.kill()
        server.wait(10)


async def _tcp_initialize(port: int) -> dict:
    for _ in range(200):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"processId": None, "rootUri": None, "capabilities": {}}}).encode()
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 30)).strip():
        if line.lower().startswith(b"content-length"):
            length = int(line.split(b":")[1])
    message = json.loads(await reader.readexactly(length))
    writer.close()
    return message


def test_lsp_help_documents_the_flags():
    proc = run("-m", "editkv.lsp_server.cli", "lsp", "--help")
    assert proc.returncode == 0
    for flag in ("--tcp", "--host", "--port", "--model", "--device", "--fake"):
        assert flag in proc.stdout
    assert "testing only" in proc.stdout and "--fake-delay-ms" not in proc.stdout
