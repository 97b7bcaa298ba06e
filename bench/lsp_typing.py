"""Keystroke -> inline suggestion through the real server: edit_cache (PIE) vs full recompute.

Replays realedits records keystroke by keystroke (a replaced range is deleted in one
keystroke, then the new text is typed a character at a time) into `editkv lsp` subprocesses,
one per cache mode, same model, same records, same pacing, alternating record by record so
machine noise falls on both. Each keystroke is a didChange plus an automatic
inlineCompletion request; a request still open at the next keystroke is cancelled, as VS
Code does. Reported per mode: latency from keystroke to the answer (p50/p95/p99, answered
requests only), and the fraction of requests that were stale (dropped by the server because
a newer edit arrived, or cancelled) instead of answered.

Modes are the server's `editkv.cacheMode`: "recompute" drops the document's KV before every
request (re-reads the whole file, the baseline), "pie" repairs it (ours); "prefix_reuse"
(re-encode from the first changed token) and "conflict" can be added with --modes.

    python bench/lsp_typing.py --limit 5 --model engine/default_model --device cpu
"""

from __future__ import annotations

import asyncio
import sys
import time

from common import load_records, machine, parser, table, write_json
from editkv.lsp_server.lsp_client import LspClient, LspError, server_command, server_env
from editkv.lsp_server.replay import record_session, summarize, type_session


def _args():
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(limit=5)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--modes", default="recompute,pie", help="cache modes, baseline first (recompute,pie)")
    p.add_argument("--interval-ms", type=float, default=100.0,
                   help="time between keystrokes (100, a fast typist); 0 = each key after the last answer")
    p.add_argument("--max-keys", type=int, default=60, help="keystrokes per record at most (60)")
    p.add_argument("--max-file-chars", type=int, default=None, help="skip records with larger files")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per suggestion at most (16)")
    p.add_argument("--debounce-ms", type=int, default=40, help="the server's debounce (40)")
    p.add_argument("--fake", action="store_true", help="smoke test: the server's fake engine, no model")
    return p.parse_args()


async def _start(args, mode: str) -> LspClient:
    flags = ["--device", args.device] + (["--model", args.model] if args.model else [])
    flags += ["--dtype", args.dtype] if args.dtype else []
    flags += ["--fake"] if args.fake else []
    client = await LspClient.start(server_command(*flags), env=server_env())
    await client.initialize(options={"cacheMode": mode, "statsFile": False, "maxTokens": args.max_tokens,
                                     "debounceMs": args.debounce_ms, "multiline": "never"})
    try:
        await client.wait_ready()
    except LspError as err:
        await client.close()
        sys.exit(f"lsp_typing: the server could not load the model: {err.message}")
    return client


async def _warm_up(client: LspClient) -> None:
    """One request on a throwaway document, so first-call costs land outside the measurement."""
    uri = "file:///warmup.py"
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 0,
                                                            "text": "def f(x):\n    return x\n"}})
    await client.request("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                         "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}}, timeout=600)
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


async def _run(args) -> dict:
    records = load_records(args.data, args.limit, args.max_file_chars)
    sessions = [record_session(r) for r in records]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    clients = {}
    for mode in modes:
        print(f"starting editkv lsp with cacheMode={mode} ...", file=sys.stderr)
        clients[mode] = await _start(args, mode)
        await _warm_up(clients[mode])
    description = (await clients[modes[0]].request("editkv/stats"))["backend"]["description"]
    per_mode = {mode: [] for mode in modes}
    started = time.perf_counter()
    try:
        for i, session in enumerate(sessions):
            for mode in modes:
                per_mode[mode] += await type_session(clients[mode], session, interval_s=args.interval_ms / 1000,
                                                     max_keys=args.max_keys)
            print(f"  record {i + 1}/{len(sessions)} {session.name} ({min(len(session.keys), args.max_keys)} keys, "
                  f"{len(session.text)} chars) done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
        server_side = {mode: await clients[mode].request("editkv/stats") for mode in modes}
    finally:
        for client in clients.values():
            await client.close()
    return {"modes": modes, "model": description, "records": len(sessions),
            "summary": {mode: summarize(per_mode[mode]) for mode in modes},
            "server": {mode: {"requests": s["requests"], "latency_ms": s["latency_ms"]}
                       for mode, s in server_side.items()}}


def _print(args, result: dict) -> None:
    modes, summary = result["modes"], result["summary"]
    rows = []
    for mode in modes:
        s = summary[mode]
        rows.append([mode, s["keystrokes"], s["shown"] + s["empty"], s["dropped"], s["cancelled"],
                     100 * s["stale_fraction"], _ms(s["answered_p50_ms"]), _ms(s["answered_p95_ms"]),
                     _ms(s["answered_p99_ms"])])
    base, ours = summary[modes[0]], summary[modes[-1]]
    if len(modes) > 1:
        rows.append([f"ratio {modes[0]}/{modes[-1]}", "", "", "", "",
                     _ratio(base["stale_fraction"], ours["stale_fraction"]),
                     _ratio(base["answered_p50_ms"], ours["answered_p50_ms"]),
                     _ratio(base["answered_p95_ms"], ours["answered_p95_ms"]),
                     _ratio(base["answered_p99_ms"], ours["answered_p99_ms"])])
    pace = (f"one keystroke every {args.interval_ms:.0f} ms" if args.interval_ms > 0
            else "each keystroke after the answer")
    title = (f"keystroke -> inline completion through `editkv lsp` ({result['records']} realedits records, "
             f"{pace}, debounce {args.debounce_ms} ms, max {args.max_tokens} tokens)\n"
             f"model: {result['model']}; machine: {machine(args.device)}")
    print(table(["cache mode", "keystrokes", "answered", "dropped stale", "cancelled", "stale %",
                 "p50 ms", "p95 ms", "p99 ms"], rows, title))


def _ms(x: float | None) -> float | str:
    return round(x, 1) if x is not None else "-"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main() -> None:
    args = _args()
    if not args.data.exists():
        sys.exit(f"lsp_typing: no data at {args.data}; pass --data PATH (a realedits .jsonl.gz)")
    result = asyncio.run(_run(args))
    _print(args, result)
    write_json(args.json, {"machine": machine(args.device), **result})


if __name__ == "__main__":
    main()
