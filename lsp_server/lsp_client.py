"""A small LSP client over a subprocess's pipes, for `editkv demo`, benchmarks and tests.

It speaks plain JSON-RPC (dicts in, dicts out), so it can also send what a real editor never
would (malformed JSON, unknown methods). Server-to-client requests are answered as an
editor would (progress tokens accepted, configuration from `configuration`), notifications
are kept in order, and every response is stamped with its arrival time on the reader task,
so latencies don't include the caller's scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

EDITOR_CAPABILITIES: dict = {
    "general": {"positionEncodings": ["utf-16"]},
    "window": {"workDoneProgress": True, "showMessage": {}},
    "workspace": {"configuration": True, "didChangeConfiguration": {"dynamicRegistration": False}},
    "textDocument": {
        "synchronization": {"didSave": True, "dynamicRegistration": False},
        "completion": {"completionItem": {"snippetSupport": False, "insertTextModeSupport": {"valueSet": [1, 2]}},
                       "contextSupport": True},
        "inlineCompletion": {"dynamicRegistration": False},
    },
}


class LspError(Exception):
    """An error response: `code` and `message` as the server sent them."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def server_command(*args: str) -> list[str]:
    """`editkv lsp ARGS` with this interpreter, runnable from any folder."""
    return [sys.executable, "-m", "editkv.lsp_server.cli", "lsp", *args]


def server_env() -> dict[str, str]:
    """The environment a server subprocess gets: this one (editkv is imported as installed, from
    any folder; the repository root on PYTHONPATH would add nothing but bare folder names)."""
    return dict(os.environ)


class LspClient:
    """One language server subprocess and the JSON-RPC conversation with it."""

    def __init__(self, proc: asyncio.subprocess.Process, configuration: dict | None = None) -> None:
        self.proc = proc
        self.configuration = configuration or {}
        self.notifications: list[tuple[str, Any]] = []
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.arrived: dict[int | str, float] = {}  # request id -> perf_counter() of its response
        self._ids = itertools.count(1)
        self._waiting: dict[int | str, asyncio.Future] = {}
        self._notified = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        self._stderr = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(cls, command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                    configuration: dict | None = None) -> LspClient:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env or server_env(), cwd=cwd, limit=2**26,
        )
        return cls(proc, configuration)

    # ---- sending ------------------------------------------------------------------------------

    def send_raw(self, body: bytes) -> None:
        """Send `body` as one message, whatever it contains."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def _send(self, message: dict) -> None:
        self.send_raw(json.dumps(message).encode("utf-8"))

    def notify(self, method: str, params: Any = None) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def send_request(self, method: str, params: Any = None) -> tuple[int, asyncio.Future]:
        """Send a request without waiting: (id, future of the result or LspError)."""
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        self._send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id, future

    async def request(self, method: str, params: Any = None, timeout: float = 60.0) -> Any:
        _, future = self.send_request(method, params)
        return await asyncio.wait_for(future, timeout)

    def cancel(self, msg_id: int) -> None:
        self.notify("$/cancelRequest", {"id": msg_id})

    # ---- receiving ----------------------------------------------------------------------------

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                length = None
                while True:
                    line = await stdout.readline()
                    if not line:
                        return
                    line = line.strip()
                    if not line:
                        break
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                if length is None:
                    continue
                message = json.loads(await stdout.readexactly(length))
                self._dispatch(message, time.perf_counter())
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"server exited: {self.stderr_text()[-2000:]}"))

    def _dispatch(self, message: dict, now: float) -> None:
        if "method" in message and "id" in message:
            self._answer(message)
        elif "method" in message:
            self.notifications.append((message["method"], message.get("params")))
            self._notified.set()
        else:
            msg_id = message.get("id")
            self.arrived[msg_id] = now
            future = self._waiting.pop(msg_id, None)
            if future is None:
                self.notifications.append(("<response>", message))
                self._notified.set()
            elif not future.done():
                if "error" in message:
                    err = message["error"] or {}
                    future.set_exception(LspError(err.get("code", 0), err.get("message", "")))
                else:
                    future.set_result(message.get("result"))

    def _answer(self, message: dict) -> None:
        """Reply to a server-to-client request as an editor would."""
        method, params = message["method"], message.get("params") or {}
        if method == "workspace/configuration":
            result: Any = [self.configuration.get(item.get("section") or "", None) for item in params.get("items", [])]
        elif method in ("window/workDoneProgress/create", "client/registerCapability", "window/showMessageRequest"):
            result = None
        else:
            self._send({"jsonrpc": "2.0", "id": message["id"],
                        "error": {"code": -32601, "message": f"client does not handle {method}"}})
            return
        self.notifications.append((method, params))
        self._send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail.append(line.decode("utf-8", errors="replace").rstrip())

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_tail)

    async def wait_for(self, predicate: Callable[[str, Any], bool], timeout: float = 30.0) -> Any:
        """The first notification (past or future) for which `predicate(method, params)` holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for method, params in self.notifications[seen:]:
                if predicate(method, params):
                    return params
            seen = len(self.notifications)
            self._notified.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching notification in {timeout:.0f} s; server stderr:\n"
                                   f"{self.stderr_text()[-2000:]}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._notified.wait(), left)

    def messages(self, method: str = "window/showMessage") -> list[Any]:
        return [params for m, params in self.notifications if m == method]

    # ---- session ------------------------------------------------------------------------------

    async def initialize(self, capabilities: dict | None = None, options: dict | None = None,
                         timeout: float = 60.0) -> dict:
        result = await self.request("initialize", {
            "processId": os.getpid(), "rootUri": None, "capabilities": capabilities or EDITOR_CAPABILITIES,
            "initializationOptions": options, "clientInfo": {"name": "editkv-lsp-client"},
        }, timeout=timeout)
        self.notify("initialized", {})
        return result

    async def wait_ready(self, timeout: float = 600.0) -> dict:
        """Wait until the model has loaded (or failed to: then LspError with the server's message)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.request("editkv/stats", None)
            backend = stats["backend"]
            if backend["ready"] and not backend["loading"]:
                return stats
            if backend["error"] and not backend["loading"]:
                raise LspError(0, backend["error"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"model not ready after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def close(self, timeout: float = 10.0) -> int | None:
        """shutdown + exit; kill the server if it does not leave in `timeout` s. Returns its exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.request("shutdown", None, timeout=timeout)
                self.notify("exit", None)
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        await asyncio.gather(self._stderr, return_exceptions=True)
        return self.proc.returncode
