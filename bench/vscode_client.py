"""editkv's VS Code extension, as far as the replay bench sees it: typing along answered in the editor.

The extension (vscode-extension/src/inline.ts, `TypeAlong`) keeps the ghost text it showed last
and, while the user types its next characters at its spot, answers the inline request itself with
the rest, without a round trip to the server. `ExtensionClient` wraps the bench's LspClient with
the same rule, so that a replay through it measures what a VS Code user gets (as the llama.cpp
peer's client, bench/peers/llamavscode.py, answers from llama.vscode's own cache):

  didChange ── TypeAlong.changed: one insertion at the spot, the next characters of the ghost
               text, no line break, shorter than what is left: the spot moves on; else forgotten
  inlineCompletion (automatic, no dropdown selection) at the spot, in the version the last
  change left ── answered at once with the rest (no request) | else sent to the server; its
               first suggestion, if the document did not change meanwhile, is the new ghost text

Everything else passes through to the wrapped client. The extension's unit tests pin the rule
(vscode-extension/test/unit/inline.test.ts); tests/bench/test_vscode_client.py pins this copy
to the same cases.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

INLINE = "textDocument/inlineCompletion"
AUTOMATIC = 2  # InlineCompletionTriggerKind.Automatic


@dataclass
class _Ghost:
    uri: str
    version: int
    line: int
    character: int
    rest: str
    command: dict | None


class ExtensionClient:
    """An LspClient (or anything with its notify / send_request / cancel) behind the extension's typing along."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ghost: _Ghost | None = None
        self.versions: dict[str, int] = {}
        self.answered_here = 0  # requests the extension answered itself
        self._ids = itertools.count(-1, -1)  # ids of those answers (the server's are positive)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def notify(self, method: str, params: Any = None) -> None:
        doc = (params or {}).get("textDocument", {})
        uri = doc.get("uri")
        if method == "textDocument/didOpen":
            self.versions[uri] = doc.get("version", 0)
        elif method == "textDocument/didClose":
            self.versions.pop(uri, None)
            self.ghost = None
        elif method == "textDocument/didChange":
            self.versions[uri] = doc.get("version", self.versions.get(uri, 0) + 1)
            self._changed(uri, self.versions[uri], params.get("contentChanges", []))
        self.client.notify(method, params)

    def _changed(self, uri: str, version: int, changes: list[dict]) -> None:
        ghost = self.ghost
        if ghost is None or ghost.uri != uri:
            return
        self.ghost = None
        if len(changes) != 1 or "range" not in changes[0] or version != ghost.version + 1:
            return
        start, end, text = changes[0]["range"]["start"], changes[0]["range"]["end"], changes[0]["text"]
        spot = {"line": ghost.line, "character": ghost.character}
        if (start == spot and end == spot and text and "\n" not in text and "\r" not in text
                and len(text) < len(ghost.rest) and ghost.rest.startswith(text)):
            # characters count in UTF-16 code units, as VS Code's (and the server's default encoding)
            ghost.version, ghost.character = version, ghost.character + len(text.encode("utf-16-le")) // 2
            ghost.rest = ghost.rest[len(text):]
            self.ghost = ghost

    def send_request(self, method: str, params: Any = None) -> tuple[int, asyncio.Future]:
        if method != INLINE:
            return self.client.send_request(method, params)
        uri = params["textDocument"]["uri"]
        line, character = params["position"]["line"], params["position"]["character"]
        context = params.get("context") or {}
        along = context.get("triggerKind") == AUTOMATIC and context.get("selectedCompletionInfo") is None
        version = self.versions.get(uri)
        ghost = self.ghost
        if (along and ghost is not None and (ghost.uri, ghost.version, ghost.line, ghost.character)
                == (uri, version, line, character)):
            self.answered_here += 1
            future = asyncio.get_running_loop().create_future()
            spot = {"line": line, "character": character}
            future.set_result({"items": [{"insertText": ghost.rest, "range": {"start": spot, "end": spot},
                                          **({"command": ghost.command} if ghost.command else {})}]})
            return next(self._ids), future
        msg_id, future = self.client.send_request(method, params)
        if along:
            future.add_done_callback(lambda f: self._answered(f, uri, version, line, character))
        return msg_id, future

    def _answered(self, future: asyncio.Future, uri: str, version: int | None, line: int, character: int) -> None:
        if future.cancelled() or future.exception() is not None or version is None:
            return
        result = future.result()
        items = result.get("items", []) if isinstance(result, dict) else (result or [])
        if not items or self.versions.get(uri) != version:
            return
        item = items[0]
        text = item.get("insertText", "")
        text = text if isinstance(text, str) else text.get("value", "")
        start = (item.get("range") or {}).get("start")
        if start is not None and (start["line"], start["character"]) != (line, character):
            return  # an item that replaces text before the cursor: the extension's rule needs the spot
        self.ghost = _Ghost(uri, version, line, character, text, item.get("command")) if text else None

    def cancel(self, msg_id: int) -> None:
        if msg_id >= 0:
            self.client.cancel(msg_id)
