"""JSON-RPC edges pygls leaves open, closed for editkv.

- A request whose params don't fit the method's schema gets an InvalidParams error for its
  id (pygls would raise while decoding and never answer, leaving the client waiting).
- A message without `"jsonrpc": "2.0"` gets InvalidRequest when it has an id.
- A handler's future leaves pygls' `_request_futures` when it is done. pygls 2.1 files the
  future of every generator handler (its built-in didOpen/didChange/didClose/... are
  generators) and of every async or threaded one under the message's id, and only a request's
  answer takes it out: a notification's id is a fresh uuid nothing ever removes, so each
  keystroke kept a Future, its lock and condition (~2 KB) for the life of the server.
- `initialize` answers with the position encoding the server chose (UTF-8 when the client
  offers it, else UTF-16), not pygls' pick.
- Text sync does not go through pygls' workspace: the engine worker keeps the only copy of
  each document (pygls re-splits the whole text into lines on every change, which a
  10 MB file can't afford on the event loop).
Malformed JSON is answered in `EditkvServer.report_server_error` (pygls reports it there).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

log = logging.getLogger(__name__)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600


@dataclass
class RejectedRequest:
    """A request that could not be decoded; answered with `error` in `handle_message`."""

    id: Any
    method: str
    error: JsonRpcException


def choose_encoding(capabilities: types.ClientCapabilities | None) -> str:
    """UTF-8 when the client offers it, else LSP's default UTF-16."""
    general = capabilities.general if capabilities is not None else None
    offered = (general.position_encodings if general is not None else None) or []
    return "utf-8" if types.PositionEncodingKind.Utf8 in offered else "utf-16"


class EditkvProtocol(LanguageServerProtocol):
    """pygls' LSP protocol with error answers for undecodable requests."""

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as err:
            if "id" in data and "method" in data:
                return RejectedRequest(data["id"], str(data["method"]), err)
            raise

    def handle_message(self, message: Any) -> None:
        if isinstance(message, RejectedRequest):
            log.warning("rejected %s request %r: %s", message.method, message.id, message.error)
            detail = message.error.message or "the params do not match the method's schema"
            self.send_error(message.id, message.error.code, f"invalid params for {message.method}: {detail}")
            return
        if isinstance(message, dict) or getattr(message, "jsonrpc", None) != self.VERSION:
            raw = message if isinstance(message, dict) else getattr(message, "__dict__", {})
            if "id" in raw and "method" in raw:
                self.send_error(raw["id"], INVALID_REQUEST, 'not a JSON-RPC 2.0 request (needs "jsonrpc": "2.0")')
            else:
                log.warning("ignored a message that is not JSON-RPC 2.0: %.200r", raw)
            return
        super().handle_message(message)

    def _execute_handler(self, msg_id: Any, handler: Any, callback: Any, args: Any = None, kwargs: Any = None) -> None:
        super()._execute_handler(msg_id, handler, callback, args=args, kwargs=kwargs)
        future = self._request_futures.get(msg_id)
        if future is not None:  # (a request's answer may have taken it out already: then nothing to do)
            future.add_done_callback(partial(self._forget_future, msg_id))

    def _forget_future(self, msg_id: Any, future: Future | Any) -> None:
        """Drop `msg_id`'s entry when it still is this (done) future."""
        if self._request_futures.get(msg_id) is future:  # (a threaded handler's runs off the event loop,
            self._request_futures.pop(msg_id, None)  # where a cancel may pop it in between)

    def send_error(self, msg_id: Any, code: int, message: str) -> None:
        """Answer `msg_id` (any JSON value, null for unreadable messages) with an error."""
        if not isinstance(msg_id, str | int) or isinstance(msg_id, bool):
            msg_id = None
        self._send_data({"jsonrpc": self.VERSION, "id": msg_id, "error": {"code": code, "message": message}})

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams) -> Generator[Any, Any, types.InitializeResult]:
        result = yield from super().lsp_initialize(params)
        result.capabilities.position_encoding = choose_encoding(params.capabilities)
        return result

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Generator:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Generator:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Generator:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None
