"""k suggestions per request (k = 3): superposed decoding vs greedy, 3 separate decodes, beam search.

Targets are bench/default_model.py's: the document is realedits' `after` with the target
line's text after its indentation removed, the cursor after the indentation, the answer is
the line (stop at its end; token healing on). Each target's prompt (FIM by default, the
prefix's last --max-prefix-tokens and the suffix's first --max-suffix-tokens tokens) is
prefilled once into a DecodeState; every method then decodes from that same state, one
after the other, so latency is decode time only (prefill is the same for all; reported).
Methods:
  greedy            one greedy decode (the baseline for latency and EM)
  superposed        engine.decoding.superposed, k drafts, one forward per step, n-grams from
                    the document's workspace index + the corpus table shipped with the model
  superposed-host   the same with every step scored on the host (where the static forward serves
                    the view, superposed steps otherwise run in device chains: --served)
  superposed-no-ng  the same with alpha = 0 (model alone), an ablation
  top-k x greedy    k greedy decodes, each forced to start with one of the k best first tokens
  nucleus x k       k sampled decodes (--nucleus-temperature, top-p --top-p)
  beam k            beam search (engine.decoding.beam), k beams batched in one forward per step
  beam k early      the same, stopping once k beams have finished
With --served each target's document is opened in the edit cache and every method decodes
from its view (the whole document, the server's path; on CUDA its forwards replay graphs,
captured by an untimed run of every method first), instead of a capped prompt.
Quality: best-of-k EM/ES (any draft right), first-draft EM/ES, distinct drafts per target and
their mean pairwise edit distance (characters). The workspace index holds the document only
(other files of the repository may be later versions that contain the answer).

    python bench/multidraft.py --limit 100 --json /tmp/multidraft.json
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import (
    edit_similarity,
    exact_match,
    levenshtein,
    load_records,
    machine,
    parser,
    sync,
    table,
    write_json,
)
from default_model import build_cases, build_prompt
from editkv.edit_cache.document import Document
from editkv.edit_cache.tokens import TokenEdit
from editkv.edit_cache.views import fill_in_middle, left_to_right
from editkv.engine.decoding.beam import beam_search
from editkv.engine.decoding.ngram_index import NgramIndex
from editkv.engine.decoding.superposed import SuperposedParams, superposed_drafts
from editkv.engine.generate import DecodeState, DecodeStats, StopRules, decode
from editkv.engine.healing import healer_for
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model
from editkv.engine.ngram import NgramTable
from editkv.engine.prompting import doc_start_ids
from editkv.engine.sampling import SamplingParams


@dataclass
class Run:
    """One method's drafts for one target, best first, and what they cost."""

    texts: list[str]
    ms: float
    forwards: int
    extra: dict = field(default_factory=dict)


def run_greedy(state: DecodeState, rules: StopRules) -> Run:
    stats = DecodeStats()
    t0 = time.perf_counter()
    out = decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                 next_position=state.next_position, rules=rules, scratch=state.scratch,
                 scratch_used=state.scratch_used, stats=stats, heal=state.heal)
    return Run([out.text], 1000 * (time.perf_counter() - t0), stats.forwards)


def run_top_first(state: DecodeState, k: int, rules: StopRules) -> Run:
    """k greedy decodes, the i-th forced to start with the i-th best first token (healing respected)."""
    t0 = time.perf_counter()
    first = state.first_logits
    if state.heal:
        first = healer_for(state.tokenizer).mask(first, state.heal)
    top = [t for t in first[0].topk(k).indices.tolist() if first[0, t] > float("-inf")]
    stats = DecodeStats()
    scored = []
    for token in top:
        forced = torch.full_like(first, float("-inf"))
        forced[0, token] = 0.0
        out = decode(state.model, state.tokenizer, forced, context=state.context, next_position=state.next_position,
                     rules=rules, scratch=state.scratch, scratch_used=state.scratch_used, stats=stats,
                     heal=state.heal)
        scored.append((out.logprob + float(first.log_softmax(-1)[0, token]), out.text))
    texts = [t for _, t in sorted(scored, key=lambda s: -s[0])]
    return Run(texts, 1000 * (time.perf_counter() - t0), stats.forwards)


def run_nucleus(state: DecodeState, k: int, rules: StopRules, temperature: float, top_p: float, seed: int) -> Run:
    t0 = time.perf_counter()
    stats = DecodeStats()
    outs = []
    for i in range(k):
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed + i)
        outs.append(decode(state.model, state.tokenizer, state.first_logits, context=state.context,
                           next_position=state.next_position, params=params, rules=rules, scratch=state.scratch,
                           scratch_used=state.scratch_used, stats=stats, heal=state.heal))
    texts = [o.text for o in sorted(outs, key=lambda o: -o.logprob)]
    return Run(texts, 1000 * (time.perf_counter() - t0), stats.forwards)


def run_beam(state: DecodeState, num_beams: int, rules: StopRules, early_stopping: bool = False) -> Run:
    """engine.decoding.beam: summed log-probs, distinct non-empty finished beams, best first
    (`early_stopping`: done once k beams finished, not when no live beam can beat them)."""
    t0 = time.perf_counter()
    result = beam_search(state, num_beams, rules, early_stopping=early_stopping)
    return Run([b.text for b in result.beams], 1000 * (time.perf_counter() - t0), result.stats.forwards)


def run_superposed(state, k, rules, index, corpus, params) -> Run:
    t0 = time.perf_counter()
    result = superposed_drafts(state, k, rules, ngram_index=index, corpus=corpus, params=params)
    ms = 1000 * (time.perf_counter() - t0)
    s = result.stats
    return Run([d.text for d in result.drafts], ms, s.forwards,
               {"steps": s.steps, "resets": s.resets, "reset_tokens": s.reset_tokens, "ngram_ms": s.ngram_ms,
                "forward_ms": s.forward_ms, "ngram_lookups": s.ngram_lookups, "device_steps": s.device_steps})


def _run_method(method: str, state: DecodeState, k: int, rules: StopRules, index, corpus, args, seed: int) -> Run:
    if method == "greedy":
        return run_greedy(state, rules)
    tuned = {"top_tokens": args.top_tokens, "finish_ratio": args.finish_ratio or None}
    if args.temperature is not None:
        tuned["temperature"] = args.temperature
    if method == "superposed":
        return run_superposed(state, k, rules, index, corpus, SuperposedParams(**tuned))
    if method == "superposed-host":  # every step scored on the host (the device chains' baseline)
        return run_superposed(state, k, rules, index, corpus, SuperposedParams(device_steps=0, **tuned))
    if method == "superposed-no-ng":
        return run_superposed(state, k, rules, None, None, SuperposedParams(alpha=0.0, **tuned))
    if method == "top-k x greedy":
        return run_top_first(state, k, rules)
    if method == "nucleus x k":
        return run_nucleus(state, k, rules, args.nucleus_temperature, args.top_p, seed=seed)
    if method == "beam k":
        return run_beam(state, k, rules)
    if method == "beam k early":
        return run_beam(state, k, rules, early_stopping=True)
    raise SystemExit(f"unknown method {method!r}; use {args.methods}")


def index_costs(index: NgramIndex, ids: list[int], rng: random.Random) -> dict:
    """Time a few one-token edits (and their undo) on the index."""
    if len(ids) < 2:
        return {}
    times = []
    for _ in range(4):
        i = rng.randrange(len(ids))
        t0 = time.perf_counter()
        index.apply_edit("doc", TokenEdit(i, i + 1, (rng.randrange(100, 5000),)))
        index.apply_edit("doc", TokenEdit(i, i + 1, (ids[i],)))
        times.append((time.perf_counter() - t0) / 2)
    return {"edit_us": 1e6 * statistics.mean(times)}


def pairwise_distance(texts: list[str]) -> float:
    pairs = list(itertools.combinations(texts, 2))
    return statistics.mean(levenshtein(a.rstrip(), b.rstrip()) for a, b in pairs) if pairs else 0.0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--subset", type=int, default=None, help="a fixed subset of N targets spread over the data")
    p.add_argument("--offset", type=int, default=0, help="the subset starts at this target (another subset: tuning)")
    p.add_argument("--top-tokens", type=int, default=None, help="superposed: extensions per draft (default k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="superposed: the model distribution's temperature (default SuperposedParams')")
    p.add_argument("--finish-ratio", type=float, default=1.5,
                   help="superposed: latency budget after the first finished draft (0: until k finish)")
    p.add_argument("--view", choices=("fim", "l2r"), default="fim")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-prefix-tokens", type=int, default=1024)
    p.add_argument("--max-suffix-tokens", type=int, default=256)
    p.add_argument("--nucleus-temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-corpus", action="store_true", help="superposed: workspace n-grams only")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--methods", default="greedy,superposed,superposed-no-ng,top-k x greedy,nucleus x k,beam k")
    p.add_argument("--served", action="store_true",
                   help="decode from the edit cache's view of the whole document, as the server does (on CUDA "
                        "its forwards replay graphs; each target's graphs are captured by an untimed run of "
                        "every method first) instead of a capped prompt prefilled on its own")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = load_records(args.data)
    cases = build_cases(records, args.subset, args.limit, args.offset)
    loaded = load_model(args.model, device=args.device)
    tok, cfg, model = loaded.tokenizer, loaded.config, loaded.runner
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    corpus_path = model_dir / "ngram.npz"
    corpus = None if args.no_corpus or not corpus_path.is_file() else NgramTable.load(corpus_path)
    k = args.k
    rules = StopRules(max_tokens=args.max_tokens, max_lines=1)
    methods = args.methods.split(",")
    print(f"multidraft bench: {len(cases)} targets, k = {k}, {args.view} view "
          f"({'served: the edit cache view of the whole document' if args.served else 'capped prompt'}), model "
          f"{'' if args.model is None else args.model}, corpus n-grams {'on' if corpus else 'off'}, "
          f"{machine(args.device)}", flush=True)
    healer_for(tok)  # built once, outside the timings
    rng = random.Random(0)
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    side: dict[str, list[float]] = {"prefill_ms": [], "index_build_ms": [], "index_tokens": [], "edit_us": [],
                                    "index_bytes_per_token": []}
    for n, (_rec, _target, prefix, suffix) in enumerate(cases):
        ids, heal = build_prompt(tok, cfg, prefix, suffix, args.view, args.max_prefix_tokens, args.max_suffix_tokens)
        doc_ids = tok.encode(prefix + "\n" + suffix)
        t0 = time.perf_counter()
        index = NgramIndex()
        index.add("doc", doc_ids)
        side["index_build_ms"].append(1000 * (time.perf_counter() - t0))
        side["index_tokens"].append(len(doc_ids))
        side["index_bytes_per_token"].append(index.nbytes() / max(len(doc_ids), 1))
        side["edit_us"].append(index_costs(index, doc_ids, rng).get("edit_us", 0.0))
        sync(args.device)
        t0 = time.perf_counter()
        if args.served:
            doc = Document(model, tok, prefix + "\n" + suffix, head=doc_start_ids(tok, cfg))
            doc.ensure_ready()
            make = fill_in_middle if args.view == "fim" else left_to_right
            # room for beam search's k lanes in the scratch, as the server leaves it (lsp_server/backend.py)
            lanes = k if any(m.startswith("beam") for m in methods) else 1
            view = make(doc, len(prefix), max_new_tokens=args.max_tokens * lanes)
            state_of = view.state  # each method decodes into the view's scratch from the same state
        else:
            state = DecodeState.from_prompt(model, tok, ids, heal=heal, max_new_tokens=args.max_tokens)
            state_of = lambda state=state: state  # noqa: E731
        sync(args.device)
        side["prefill_ms"].append(1000 * (time.perf_counter() - t0))
        for warm in ((True, False) if args.served and model.static is not None else (False,)):
            for method in methods:
                run = _run_method(method, state_of(), k, rules, index, corpus, args, seed=1000 * n)
                sync(args.device)
                if not warm:
                    runs[method].append(run)
        if (n + 1) % 10 == 0:
            print(f"  {n + 1}/{len(cases)} targets", flush=True)

    expected = [c[1]["expected"] for c in cases]
    greedy_ms = sum(r.ms for r in runs["greedy"]) if "greedy" in runs else None
    greedy_em = None
    rows, payload = [], {}
    for method, rs in runs.items():
        best_em = 100 * np.mean([max(exact_match(t, e) for t in r.texts) if r.texts else 0.0
                                 for r, e in zip(rs, expected, strict=True)])
        best_es = 100 * np.mean([max(edit_similarity(t, e) for t in r.texts) if r.texts else 0.0
                                 for r, e in zip(rs, expected, strict=True)])
        first_em = 100 * np.mean([exact_match(r.texts[0], e) if r.texts else 0.0
                                  for r, e in zip(rs, expected, strict=True)])
        first_es = 100 * np.mean([edit_similarity(r.texts[0], e) if r.texts else 0.0
                                  for r, e in zip(rs, expected, strict=True)])
        distinct = np.mean([len({t.rstrip() for t in r.texts}) for r in rs])
        spread = np.mean([pairwise_distance(r.texts) for r in rs])
        ms = sum(r.ms for r in rs)
        if method == "greedy":
            greedy_em = best_em
        ratio = f"{ms / greedy_ms:.2f}x" if greedy_ms else "-"
        rows.append([method, np.mean([r.ms for r in rs]), statistics.median(r.ms for r in rs), ratio,
                     np.mean([r.forwards for r in rs]), best_em, best_es, first_em, first_es, distinct, spread])
        payload[method] = {"ms_mean": ms / len(rs), "ms_vs_greedy": ms / greedy_ms if greedy_ms else None,
                           "forwards": float(np.mean([r.forwards for r in rs])), "best_em": best_em,
                           "best_es": best_es, "first_em": first_em, "first_es": first_es,
                           "distinct": float(distinct), "pairwise_edit_distance": float(spread),
                           "texts": [r.texts for r in rs], "ms": [r.ms for r in rs],
                           "forwards_per_target": [r.forwards for r in rs]}
    print(table(["method", "ms/target", "median ms", "time vs greedy", "forwards", f"best-of-{k} EM",
                 f"best-of-{k} ES", "first EM", "first ES", "distinct drafts", "pairwise edit dist"], rows,
                title=f"{len(cases)} targets, decode time only (prefill {np.mean(side['prefill_ms']):.0f} ms/target "
                      f"shared by all methods)"))
    if "superposed" in runs:
        sp = runs["superposed"]
        sp_ms = sum(r.ms for r in sp)
        steps = sum(r.extra["steps"] for r in sp)
        lookups = sum(r.extra["ngram_lookups"] for r in sp)
        ngram_ms = sum(r.extra["ngram_ms"] for r in sp)
        forward_ms = sum(r.extra["forward_ms"] for r in sp)
        forwards = sum(r.forwards for r in sp)
        lines = [["superposed vs greedy latency", f"{sp_ms / greedy_ms:.2f}x" if greedy_ms else "-", "<= 1.3x"]]
        separate = [m for m in ("top-k x greedy", "nucleus x k") if m in runs]
        for m in separate:
            lines.append([f"speed-up vs {m}", f"{sum(r.ms for r in runs[m]) / sp_ms:.2f}x", ">= 2x"])
        if greedy_em is not None:
            lines.append(["best-of-k EM - greedy EM", f"{payload['superposed']['best_em'] - greedy_em:+.1f} points",
                          ">= +3"])
        lines += [
            ["resets per target", f"{np.mean([r.extra['resets'] for r in sp]):.2f}", ""],
            ["steps run in device chains", f"{np.mean([r.extra['device_steps'] for r in sp]):.1f} per target", ""],
        ]
        if not any(r.extra["device_steps"] for r in sp):  # host-scored steps: their n-gram time is the host's
            lines += [
                ["n-gram lookup per draft", f"{1000 * ngram_ms / max(lookups, 1):.0f} us", ""],
                ["n-gram time per step / forward time per forward",
                 f"{ngram_ms / max(steps, 1):.2f} ms / {forward_ms / max(forwards, 1):.2f} ms "
                 f"({100 * ngram_ms / max(forward_ms, 1e-9):.1f}%)", ""],
            ]
        lines += [
            ["workspace index build", f"{np.mean(side['index_build_ms']):.1f} ms for "
                                      f"{np.mean(side['index_tokens']):.0f} tokens", ""],
            ["workspace index one-token edit", f"{np.mean(side['edit_us']):.0f} us", ""],
            ["workspace index memory", f"{np.mean(side['index_bytes_per_token']):.0f} bytes/token", ""],
        ]
        print(table(["superposed", "measured", "target"], lines))
    write_json(args.json, {"results": payload, "side": {k: float(np.mean(v)) for k, v in side.items()},
                           "targets": len(cases), "view": args.view, "k": k, "machine": machine(args.device),
                           "ids": [c[0]["id"] + f":{c[1]['line']}" for c in cases]})


if __name__ == "__main__":
    main()
