"""Shared pieces of the language-server tests: server commands and environment, a document."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Servers under test keep their suggestion statistics here, not in the user's cache folder.
SERVER_ENV = {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="editkv-test-cache-")}
SOURCE = (
    "import os\n"
    "\n"
    "\n"
    "def greet(name):\n"
    "    message = 'hello ' + name\n"
    "    return message\n"
    "\n"
    "\n"
    "class Point:\n"
    "    def __init__(self, x, y):\n"
    "        self.x = x\n"
    "        self.y = y\n"
)


def lsp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "editkv.lsp_server.cli", "lsp", *args]
