"""A real headless Neovim attaches to `editkv lsp`, edits a file and asks for completions.

Neovim's own LSP client does the talking (initialize, incremental didChange from buffer
edits, completion and inlineCompletion through vim.lsp.buf_request_sync): see
nvim/editkv_session.lua. Skipped where `nvim` is not installed (scripts/test.sh installs
Debian's package).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lsp_testing import SERVER_ENV, SOURCE, lsp_command

NVIM = shutil.which("nvim")
SCRIPT = Path(__file__).parent / "nvim" / "editkv_session.lua"
pytestmark = pytest.mark.skipif(NVIM is None, reason="needs Neovim (apt-get install neovim)")


def run_neovim(tmp_path: Path, server: list[str]) -> dict:
    source = tmp_path / "shapes.py"
    source.write_text(SOURCE)
    out = tmp_path / "result.json"
    env = {**SERVER_ENV, "EDITKV_CMD": json.dumps(server), "EDITKV_FILE": str(source), "EDITKV_OUT": str(out),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.run([NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {SCRIPT}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert out.exists(), f"neovim wrote nothing (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["error"] is None, result["error"]
    return result


def test_neovim_gets_completions_and_inline_completions(tmp_path):
    result = run_neovim(tmp_path, lsp_command("--fake"))
    assert result["backend"] == "fake backend" and result["encoding"] == "utf-16"
    assert result["progress"][0] == "begin" and result["progress"][-1] == "end"
    line, col = result["cursor"]
    assert result["line"] == "    return sum"
    items = result["completion"]["items"]
    # the server's copy of the buffer matches Neovim's: the word it replaces is "sum"
    assert items[0]["textEdit"]["newText"] == f"sum<fake {line}:{col}>"
    assert items[0]["textEdit"]["range"]["start"] == {"line": line, "character": col - 3}
    inline = result["inline"]["items"]
    assert [i["insertText"] for i in inline] == [f"<fake {line}:{col}>", f"<fake {line}:{col}>#1"]
    # Neovim batches the buffer edits into incremental didChange notifications
    assert result["stats"]["documents"][(tmp_path / "shapes.py").as_uri()]["edits"] >= 1


def test_neovim_with_a_real_model(tmp_path, tiny_model):
    result = run_neovim(tmp_path, lsp_command("--model", str(tiny_model), "--device", "cpu"))
    assert str(tiny_model) in result["backend"]
    assert result["line"] == "    return sum"
    assert isinstance(result["completion"]["items"], list) and isinstance(result["inline"]["items"], list)
    last = result["stats"]["backend"]["last_request"]
    # the request reached the model: its FIM view was encoded (what a random model then decodes
    # may end at once: since FIM prompts are no longer token-healed, its first token is free)
    assert last["view"] == "fim" and last["view_encoded_tokens"] > 0 and last["strategy"] == "superposed"
    assert os.environ.get("EDITKV_CMD") is None  # nothing leaked into this process
