"""The `editkv` command line: `complete` one position of a file, `lsp` (the language server),
`demo` (an editor session against `editkv lsp`, typed keystroke by keystroke).

Errors the user can fix print one line on stderr and exit with status 2; nothing here prints
a traceback for a bad path, a broken model folder or a missing device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from editkv.lsp_server import server_version

SWITCH_INTERVAL_S = 0.0005  # `editkv lsp`'s GIL switch interval (Python's default: 0.005)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `editkv` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # engine.errors imports torch (engine/__init__); `editkv lsp --fake` never needs it
        errors = sys.modules.get("editkv.engine.errors")
        if errors is not None and isinstance(err, errors.EngineError):
            print(f"editkv: error: {err}", file=sys.stderr)
            return 2
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editkv",
        description=(
            "editkv: a code-completion backend that keeps each open file's KV cache alive "
            "across edits. Subcommands: lsp (the language server), demo (watch it serve an editing "
            "session), complete (one completion from a file)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"editkv {server_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    complete = sub.add_parser(
        "complete",
        help="complete a file at a line/column and print the completion with timings",
        description="Load a model, read FILE, and complete it at --line/--col (1-based, "
        "as editors show them; the column counts characters).",
    )
    complete.add_argument("file", type=Path, help="the source file to complete in")
    complete.add_argument("--line", type=int, required=True, help="1-based line of the cursor")
    complete.add_argument("--col", type=int, required=True, help="1-based column of the cursor")
    _model_args(complete)
    complete.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (64)")
    complete.add_argument(
        "--lines", type=int, default=1, help="stop after this many line ends (1; 0 = no limit)"
    )
    complete.add_argument(
        "--mode", choices=("auto", "fim", "l2r"), default="auto",
        help="fill-in-the-middle with the text after the cursor, left-to-right, or auto: the view "
        "`editkv calibrate --view` measured better for this model, else its editkv.json's preferred_view, "
        "else FIM when the model has FIM tokens",
    )
    complete.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    complete.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    complete.add_argument("--seed", type=int, default=None, help="seed for sampling")
    complete.add_argument("--json", action="store_true", help="print one JSON object instead")
    complete.set_defaults(func=_cmd_complete)

    lsp = sub.add_parser(
        "lsp",
        help="run the language server (LSP over stdio, or --tcp)",
        description="Serve inline completions (textDocument/inlineCompletion) and completion items "
        "over the Language Server Protocol. Settings come from the client (initializationOptions "
        "and workspace/didChangeConfiguration, section \"editkv\"); --model/--device/--dtype are "
        "their starting values. The model loads after the client's `initialized`; problems are "
        "shown with window/showMessage and the server keeps running.",
    )
    lsp.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default)")
    lsp.add_argument("--tcp", action="store_true", help="listen on TCP (--host, --port) instead of stdio")
    lsp.add_argument("--host", default="127.0.0.1", help="address to bind with --tcp (127.0.0.1)")
    lsp.add_argument("--port", type=int, default=2087, help="port to listen on with --tcp (2087)")
    _lsp_model_args(lsp)
    lsp.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                     help="what to log on stderr (warning)")
    lsp.set_defaults(func=_cmd_lsp)

    demo = sub.add_parser(
        "demo",
        help="start `editkv lsp`, type an edit keystroke by keystroke, print suggestions and latencies",
        description="Runs `editkv lsp` as a subprocess and drives it like an editor over JSON-RPC: "
        "opens a file, types an edit one keystroke at a time, asks for an inline completion after "
        "each, and prints the suggestions and a latency table (p50/p95). Without --data it edits "
        "an example bundled with editkv (adds a method to inventory.py).",
    )
    _lsp_model_args(demo)
    demo.add_argument("--data", type=Path, default=None,
                      help="replay the edits of realedits records (.jsonl.gz) instead of the example")
    demo.add_argument("--limit", type=int, default=3, help="records to replay with --data (3)")
    demo.add_argument("--interval-ms", type=float, default=0.0,
                      help="time between keystrokes; 0 (default) types the next key once the last one is "
                      "answered, so every keystroke gets its suggestion; e.g. 150 types like a person, and "
                      "requests the model can't keep up with are dropped as stale")
    demo.add_argument("--max-keys", type=int, default=200, help="most keystrokes per edited file (200)")
    demo.add_argument("--json", type=Path, default=None, help="also write every keystroke's record here")
    demo.set_defaults(func=_cmd_demo)
    _add_calibrate_parser(sub)
    return parser


def _add_calibrate_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    calibrate = sub.add_parser(
        "calibrate",
        help="fit a model's AdaDec entropy threshold tau on reference code and store it; with --view, "
        "measure which view (left-to-right or FIM) completes your code better",
        description="Teacher-force the model on Python files (--data: folders or files; use code that is "
        "not in your evaluation set), record each position's entropy and whether the true token ranked "
        "first, fit a class-balanced logistic regression and keep the cutoff with the best held-out "
        "accuracy as tau. Stored next to the embedded model's weights, else in "
        "~/.cache/editkv/adadec/<fingerprint>.json, or at --out. "
        "With --view: mask lines of a seeded sample of the files (--view-files files, --view-lines lines "
        "each), complete each masked line in both views as the server serves them, and store the view "
        "with more exact matches in ~/.cache/editkv/view/<fingerprint>.json (or at --out); the server's "
        "`view: auto` then serves it.",
    )
    _model_args(calibrate)
    calibrate.add_argument("--data", action="append", required=True, type=Path,
                           help="folder (searched for *.py) or file of reference code; repeatable")
    calibrate.add_argument("--out", type=Path, default=None, help="write the calibration JSON here instead")
    calibrate.add_argument("--max-files", type=int, default=200, help="files sampled from --data (200)")
    calibrate.add_argument("--max-file-tokens", type=int, default=1024, help="tokens read per file (1024)")
    calibrate.add_argument("--max-tokens", type=int, default=100_000, help="positions recorded in all (100000)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the file sample (0)")
    calibrate.add_argument("--view", action="store_true",
                           help="measure left-to-right vs FIM on masked lines instead, and store the better view")
    calibrate.add_argument("--view-files", type=int, default=24, help="--view: files sampled from --data (24)")
    calibrate.add_argument("--view-lines", type=int, default=4, help="--view: lines masked per file (4)")
    calibrate.add_argument("--view-max-chars", type=int, default=20_000,
                           help="--view: skip files longer than this many characters (20000)")
    calibrate.add_argument("--progress", action="store_true", help="--view: print a line per masked line")
    calibrate.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.view:
        return _cmd_calibrate_view(args)
    from editkv.engine.calibrate import run

    result, path = run(args.model, args.data, out=args.out, device=args.device, dtype=args.dtype,
                       max_files=args.max_files, max_file_tokens=args.max_file_tokens,
                       max_tokens=args.max_tokens, seed=args.seed)
    fit = result.fit
    print(f"tau = {result.tau:.3f} nats (cutoff P(top1) = {fit['cutoff']:.3f}, held-out accuracy "
          f"{fit['heldout_accuracy']:.3f}, balanced {fit['heldout_balanced_accuracy']:.3f}; "
          f"{result.data['positions']} positions from {result.data['files']} files; gate fires at "
          f"{100 * fit['gate_rate_at_tau']:.1f}% of them) -> {path}")
    return 0


def _cmd_calibrate_view(args: argparse.Namespace) -> int:
    from editkv.lsp_server.calibrate_view import run

    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None
    result, path = run(args.model, args.data, out=args.out, device=args.device, dtype=args.dtype,
                       max_files=args.view_files, lines_per_file=args.view_lines, max_chars=args.view_max_chars,
                       seed=args.seed, progress=progress)
    scores = ", ".join(f"{view} EM {s.em:.1f}% ES {s.es:.1f} (empty {s.empty:.1f}%)"
                       for view, s in sorted(result.scores.items()))
    print(f"view = {result.view} ({scores}; {result.data['lines']} masked lines of {result.data['files']} "
          f"files) -> {path}")
    return 0


def _lsp_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None,
        help="model folder, .gguf file or Hugging Face hub id (default: the embedded model)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    from editkv.lsp_server.settings import CPU_WEIGHTS

    p.add_argument("--cpu-weights", default="auto", choices=CPU_WEIGHTS,
                   help="on the CPU: the projections' weights as fp32, or weight-only int8/int4 (default: auto; "
                   "$EDITKV_CPU_WEIGHTS overrides)")
    p.add_argument("--fake", action="store_true",
                   help="testing only: no model; every suggestion is '<fake line:col>'")
    p.add_argument("--fake-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--fake-load-ms", type=float, default=0.0, help=argparse.SUPPRESS)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf file or Hugging Face hub id (default: the embedded model)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")


def _read_source(path: Path) -> str:
    from editkv.engine.errors import EngineError

    try:
        data = path.read_bytes()
    except OSError as err:
        raise EngineError(f"cannot read {path}: {err.strerror}") from None
    if b"\x00" in data[:8192]:
        raise EngineError(f"{path} looks binary (it has NUL bytes); editkv completes text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EngineError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _cursor_offset(text: str, line: int, col: int) -> int:
    from editkv.engine.errors import EngineError

    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise EngineError(f"--line {line} is outside the file (it has {len(lines)} lines)")
    row = lines[line - 1].rstrip("\r")
    if not 1 <= col <= len(row) + 1:
        raise EngineError(f"--col {col} is outside line {line} (it has {len(row)} characters)")
    return sum(len(s) + 1 for s in lines[: line - 1]) + col - 1


def _cmd_lsp(args: argparse.Namespace) -> int:
    import logging

    from editkv.lsp_server.features import create_server
    from editkv.lsp_server.server import fake_factory, model_factory
    from editkv.lsp_server.settings import Settings, parse_settings

    base, problems = parse_settings({"model": args.model, "device": args.device, "dtype": args.dtype,
                                     "cpuWeights": args.cpu_weights}, Settings())
    if problems:
        print(f"editkv: error: {problems[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="editkv %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # pygls logs (with tracebacks) what editkv answers and logs itself
        logging.getLogger("pygls").setLevel(logging.CRITICAL)
    factory = (fake_factory(args.fake_delay_ms / 1000, args.fake_load_ms / 1000) if args.fake
               else model_factory())
    server = create_server(base, factory)
    if args.tcp:
        logging.getLogger(__name__).info("editkv lsp listening on %s:%d", args.host, args.port)
        server.start_tcp(args.host, args.port)
        return 0
    # The event loop answers what needs no model (typed-along suggestions, stats) while the engine
    # worker's thread runs Python between torch ops: a thread waiting for the GIL gets it after the
    # switch interval (5 ms by default), which was most of such an answer's time.
    sys.setswitchinterval(float(os.environ.get("EDITKV_SWITCH_INTERVAL", SWITCH_INTERVAL_S)))
    # stdout carries the protocol only: anything a library prints goes to stderr instead.
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    server.start_io(sys.stdin.buffer, out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from editkv.lsp_server.demo import run_demo

    return run_demo(args)


def _cmd_complete(args: argparse.Namespace) -> int:
    import torch
    from editkv.engine.errors import EngineError
    from editkv.engine.generate import DecodeStats, StopRules, decode, prefill_chunk, prefill_prompt
    from editkv.engine.loading import load_model, resolve_model
    from editkv.engine.prompting import doc_start_ids, healed_fim_ids, healed_left_to_right_ids
    from editkv.engine.sampling import SamplingParams

    text = _read_source(args.file)
    offset = _cursor_offset(text, args.line, args.col)
    if args.max_tokens < 1:
        raise EngineError("--max-tokens must be at least 1")
    try:
        params = SamplingParams(args.temperature, args.top_p, args.seed)
    except ValueError as err:
        raise EngineError(str(err)) from None
    loaded = load_model(resolve_model(args.model), device=args.device, dtype=args.dtype)
    tok, cfg = loaded.tokenizer, loaded.config
    prefix, suffix = text[:offset], text[offset:]
    head = len(doc_start_ids(tok, cfg))
    mode = args.mode
    if mode == "auto":
        from editkv.engine.calibrate import auto_view

        mode = auto_view(loaded)[0]
    if mode == "fim":
        if tok.fim is None:
            raise EngineError("--mode fim: this model has no fill-in-the-middle tokens")
        ids, heal = healed_fim_ids(tok, cfg, prefix, suffix, room=args.max_tokens)
    else:
        ids, heal = healed_left_to_right_ids(tok, cfg, prefix)
        keep = loaded.runner.config.max_position_embeddings - args.max_tokens - head
        if len(ids) - head > keep > 0:  # one-shot: read only what the attention window would reach
            ids = ids[:head] + ids[len(ids) - keep:]
    stats = DecodeStats(prefill_tokens=len(ids))
    cache = loaded.runner.new_cache(len(ids))
    started = time.perf_counter()
    # files longer than the model's context: attend at most the context back (see windowed)
    logits, context = prefill_prompt(loaded.runner, ids, cache, sink=head, room=args.max_tokens)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    stats.prefill_ms = 1000 * (time.perf_counter() - started)
    stats.forwards += -(-len(ids) // prefill_chunk(loaded.runner.config.max_position_embeddings))
    rules = StopRules(max_tokens=args.max_tokens, max_lines=args.lines or None)
    result = decode(
        loaded.runner, tok, logits, context=context, next_position=len(ids),
        params=params, rules=rules, stats=stats, heal=heal,
    )
    if args.json:
        print(json.dumps({
            "completion": result.text, "stop_reason": result.stop_reason, "mode": mode,
            "model": loaded.source, "device": str(loaded.device),
            "load_ms": round(1000 * loaded.load_seconds, 1),
            "prefill_tokens": stats.prefill_tokens, "prefill_ms": round(stats.prefill_ms, 1),
            "decode_tokens": stats.decode_tokens, "decode_ms": round(stats.decode_ms, 1),
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1),
        }))
    else:
        print(result.text)
        print(
            f"[{mode}, {loaded.device}] load {1000 * loaded.load_seconds:.0f} ms | "
            f"prefill {stats.prefill_tokens} tokens in {stats.prefill_ms:.1f} ms | "
            f"decode {stats.decode_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s "
            f"(stop: {result.stop_reason})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
