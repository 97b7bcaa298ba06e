"""`editkv demo`: watch `editkv lsp` serve an editing session, keystroke by keystroke.

Starts `editkv lsp` (this Python, `-m editkv.lsp_server.cli lsp`) as a subprocess, initializes it as
an editor would, waits for the model (the server reports loading with `$/progress`), types
an edit one keystroke at a time with an inline-completion request after each (see
`replay.py`), then asks once explicitly (several drafts, for cycling) and once for dropdown
items. Prints each suggestion as it arrives and a latency table. The default edit is bundled
with editkv (examples/inventory.py), so it runs on a fresh clone; `--data` replays realedits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from editkv.lsp_server.lsp_client import LspClient, LspError, server_command
from editkv.lsp_server.replay import (
    KeyRecord,
    Session,
    example_session,
    load_records,
    record_session,
    summarize,
    type_session,
)


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of `editkv demo`."""
    try:
        sessions = _sessions(args)
    except (OSError, ValueError, KeyError) as err:
        print(f"editkv: error: cannot read --data {args.data}: {err}", file=sys.stderr)
        return 2
    return asyncio.run(_demo(args, sessions))


def _sessions(args: argparse.Namespace) -> list[Session]:
    if args.data is None:
        return [example_session()]
    return [record_session(r) for r in load_records(args.data, args.limit)]


def _server_args(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device]
    if args.model:
        out += ["--model", args.model]
    if args.dtype:
        out += ["--dtype", args.dtype]
    if args.fake:
        out += ["--fake", "--fake-delay-ms", str(args.fake_delay_ms)]
    return out


async def _demo(args: argparse.Namespace, sessions: list[Session]) -> int:
    client = await LspClient.start(server_command(*_server_args(args)))
    try:
        await client.initialize(options={"stats_file": False})
        print("editkv demo: waiting for the model to load ...", file=sys.stderr)
        try:
            stats = await client.wait_ready()
        except LspError as err:
            print(f"editkv: error: {err.message.removeprefix('editkv: ')}", file=sys.stderr)
            return 2
        print(f"server ready: {stats['backend']['description']}")
        everything: list[KeyRecord] = []
        for session in sessions:
            pace = f"one every {args.interval_ms:.0f} ms" if args.interval_ms > 0 else "each after the last answer"
            print(f"\n== {session.name}: {min(len(session.keys), args.max_keys)} keystrokes, {pace}")
            print(f"{'#':>4} {'key':<8} {'ms':>8}  {'outcome':<9} suggestion")
            records = await type_session(client, session, interval_s=args.interval_ms / 1000,
                                         max_keys=args.max_keys, on_record=_print_record)
            everything += records
            await _explicit(client, session, args.max_keys)
        _print_summary(summarize(everything))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in everything], indent=1))
        return 0
    finally:
        await client.close()


def _print_record(r: KeyRecord) -> None:
    text = r.suggestions[0] if r.suggestions else (r.error or "")
    shown = text if len(text) <= 70 else text[:67] + "..."
    latency = f"{r.latency_ms:8.1f}" if r.latency_ms is not None else " " * 8
    print(f"{r.index:>4} {r.label!s:<8} {latency}  {r.outcome:<9} {shown!r}" if text else
          f"{r.index:>4} {r.label!s:<8} {latency}  {r.outcome:<9}")


async def _explicit(client: LspClient, session: Session, max_keys: int) -> None:
    """Reopen the edited document at the last cursor: one explicit inline request, one dropdown."""
    keys = session.keys[:max_keys]
    if not keys:
        return
    text = _apply(session.text, keys)
    uri = session.uri + "#final"
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": session.language_id,
                                                            "version": 0, "text": text}})
    line, character = keys[-1].cursor
    position = {"line": line, "character": character}
    inline = await client.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 1}}, timeout=600)
    print(f"explicit invocation at {line + 1}:{character + 1}: {len(inline['items'])} suggestion(s) to cycle through")
    for i, item in enumerate(inline["items"]):
        print(f"  [{i}] {item['insertText']!r}")
    dropdown = await client.request("textDocument/completion", {
        "textDocument": {"uri": uri}, "position": position}, timeout=600)
    print(f"dropdown: {[item['label'] for item in dropdown['items']]}")
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


def _apply(text: str, keys: list) -> str:
    from editkv.edit_cache.positions import Position, Range, apply_change

    for key in keys:
        rng = Range(Position(*key.start), Position(*key.end))
        text = apply_change(text, rng, key.text)[0]
    return text


def _print_summary(s: dict) -> None:
    def ms(x: float | None) -> str:
        return f"{x:8.1f}" if x is not None else "       -"

    print("\nper-keystroke latency (keystroke sent -> inline completion answered)")
    print(f"{'':<28}{'count':>7}{'p50 ms':>9}{'p95 ms':>9}")
    print(f"{'answered':<28}{s['shown'] + s['empty']:>7}{ms(s['answered_p50_ms'])} {ms(s['answered_p95_ms'])}")
    print(f"{'  with a suggestion':<28}{s['shown']:>7}{ms(s['shown_p50_ms'])} {ms(s['shown_p95_ms'])}")
    print(f"{'dropped as stale':<28}{s['dropped']:>7}")
    print(f"{'cancelled by the editor':<28}{s['cancelled']:>7}")
    if s["error"]:
        print(f"{'errors':<28}{s['error']:>7}")
    print(f"{'keystrokes':<28}{s['keystrokes']:>7}")
