"""cProfile of editkv's served completion path, in process, on realedits keystrokes.

The LSP server runs model work on a worker thread, which cProfile (main thread only) does not
see; this script builds the same backend the server builds (lsp_server.server.model_factory,
default settings plus --model) and, per keystroke of a record typed as lsp_replay types it
(replay.editor_session), applies the change and asks for a completion the way the worker
asks (same CompletionRequest fields), one after the other (service pace, nothing dropped). It
prints the per-request stats the backend reports and cProfile's top functions.

    python bench/profile_served.py --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf \\
        --record 'pallets/itsdangerous@...:path.py' --max-keys 20 --top 30
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from common import load_records, parser
from editkv.edit_cache.positions import Position, Range, to_offset
from editkv.lsp_server.backend import CompletionRequest
from editkv.lsp_server.postprocess import CursorContext, is_python, wants_multiline
from editkv.lsp_server.replay import editor_session
from editkv.lsp_server.server import model_factory
from editkv.lsp_server.settings import Settings
from editkv.lsp_server.stats import percentile


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--record", default=None, help="record id (default: the first record of --data)")
    p.add_argument("--max-keys", type=int, default=20)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sort", default="cumulative", help="pstats sort key (cumulative, tottime)")
    p.add_argument("--fim-suffix-cache", action="store_true",
                   help="fimSuffixCache on: the window kept between requests")
    args = p.parse_args()
    records = load_records(args.data)
    record = next(r for r in records if args.record in (None, r["id"]))
    settings = Settings(model=args.model, device=args.device,
                        **({"fim_suffix_cache": True} if args.fim_suffix_cache else {}))
    started = time.perf_counter()
    backend = model_factory()(settings)
    print(f"model loaded in {time.perf_counter() - started:.1f} s: {backend.description}")
    session = editor_session(record)
    backend.open(session.uri, session.text)
    first = session.keys[0]
    backend.complete(CompletionRequest(session.uri, *first.start))  # the file read once, untimed (as the bench)
    rows = []
    profile = cProfile.Profile()
    for key in session.keys[: args.max_keys]:
        profile.enable()
        t0 = time.perf_counter()
        backend.change(session.uri, [(Range(Position(*key.start), Position(*key.end)), key.text)])
        text = backend.text(session.uri)
        ctx = CursorContext(text, to_offset(text, Position(*key.cursor)), python=is_python(session.uri, "python"))
        multiline = wants_multiline(settings.multiline, ctx)
        result = backend.complete(CompletionRequest(
            session.uri, *key.cursor, max_tokens=settings.max_tokens,
            max_lines=settings.max_lines if multiline else 1, view=settings.view))
        ms = 1000 * (time.perf_counter() - t0)
        profile.disable()
        s = result.stats
        rows.append((ms, s))
        print(f"{key.label!r:>12} {ms:8.0f} ms  repair {s.get('repair_ms', 0):6.0f}  view {s.get('view_ms', 0):6.0f}  "
              f"encoded {s.get('encoded_tokens', 0):5} (view {s.get('view_encoded_tokens', 0):3})  "
              f"decoded {s.get('decode_tokens', 0):3}  "
              f"forwards {s.get('forwards', 0):3}  {s.get('view')}")
    lat = [ms for ms, _ in rows]
    print(f"\n{len(rows)} keystrokes: p50 {percentile(lat, 50):.0f} ms, p95 {percentile(lat, 95):.0f} ms; "
          f"{record['id']} ({len(session.text)} chars)")
    for name in ("view_ms", "view_encoded_tokens", "repair_ms", "encoded_tokens", "total_ms"):
        values = [s[name] for _, s in rows if isinstance(s.get(name), int | float)]
        if values:
            print(f"  {name}: mean {sum(values) / len(values):.1f}, p50 {percentile(values, 50):.1f}")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
