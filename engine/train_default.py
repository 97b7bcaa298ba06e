"""Build editkv's embedded default model: corpus -> tokenizer -> tokens -> train -> export.

    python -m editkv.engine.train_default --work W --out O --train-minutes 14 --max-minutes 9
    python -m editkv.engine.train_default --work W --out O --resume --max-minutes 9.5
    python -m editkv.engine.train_default unpack --pack P --out O

Stages write their outputs under --work (corpus/, tokenizer/, tokens/, checkpoint.pt,
train.log) and a done.json last; a stage whose done.json exists is skipped, so a second
invocation on the same machine goes straight to training. `--max-minutes` is the wall
budget of the whole invocation: training stops early enough to evaluate, checkpoint and
export. Every run ends by exporting the Hugging Face folder --out (and, with --pack, a copy
that fits the device machine's limits on returned files; `unpack` restores it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

STARTED = time.monotonic()
EXPORT_RESERVE_S = 20.0  # wall time kept back after training for the export
SIZE_FLAGS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim")


class Logger:
    """Prints each line at once and appends it to a log file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - STARTED:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _run_stage(name: str, folder: Path, log: Logger, build) -> dict:
    """Run `build() -> (info, summary)` unless folder/done.json exists; return the info."""
    from editkv.engine.training.corpus import write_json

    done = folder / "done.json"
    if done.is_file():
        info = json.loads(done.read_text())
        log(f"[{name}] skipped: {done} exists (built in {info.get('seconds', '?')}s)")
        return info
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info, summary = build()
    info["seconds"] = round(time.monotonic() - started, 1)
    write_json(done, info)
    log(f"[{name}] {summary} in {info['seconds']}s")
    return info


def stage_corpus(args: argparse.Namespace, folder: Path, log: Logger) -> dict:
    """Permissively licensed .py files -> corpus/{train,val}.{bin,idx.npy}, manifest.json."""
    from editkv.engine.training.corpus import build_corpus, collect_sources

    def build():
        stdlib = False if args.stdlib == "none" else (Path(args.stdlib) if args.stdlib else True)
        sources = collect_sources(stdlib, args.sources)
        manifest = build_corpus(sources, folder, workers=args.workers)
        t = manifest["totals"]
        summary = (f"{t['files_kept']} files, {t['bytes_kept'] / 1e6:.1f} MB from "
                   f"{len(manifest['distributions'])} sources ({len(manifest['excluded'])} "
                   f"excluded); {t['val_files']} validation files; dropped {t['files_dropped']}")
        return {"totals": t}, summary

    return _run_stage("corpus", folder, log, build)


def stage_tokenizer(args: argparse.Namespace, corpus: Path, folder: Path, log: Logger) -> dict:
    """Train (or, with --init-from, take over) the BPE tokenizer; check locality + loading."""
    from editkv.engine.training.bpe import (
        check_locality,
        encode_texts,
        load_tokenizer,
        save_tokenizer,
        train_tokenizer,
    )
    from editkv.engine.training.corpus import DocStore, write_json
    from editkv.engine.training.export import TOKENIZER_FILES

    def build():
        store = DocStore(corpus, "train")
        if args.init_from and (args.init_from / "tokenizer.json").is_file():
            # The weights were trained with that tokenizer; a retrained one may differ.
            for name in TOKENIZER_FILES:
                if (args.init_from / name).is_file():
                    shutil.copy(args.init_from / name, folder / name)
            tok = load_tokenizer(folder)
            how = f"copied from {args.init_from}"
        else:
            ids = store.sample(int(args.tokenizer_mb * 1e6), args.seed)
            tok = train_tokenizer((store[i] for i in ids), args.vocab_size, length=len(ids))
            save_tokenizer(tok, folder, args.seq_len)
            how = f"trained on {len(ids)} files"
        val = DocStore(corpus, "val")
        sample = [val[i] for i in range(min(len(val), 300))]
        sample += [store[i] for i in store.sample(2_000_000, args.seed + 1)[:300 - len(sample)]]
        locality = check_locality(tok, sample)
        log(locality.summary())
        write_json(folder / "locality.json", locality.to_json())

        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder))
        probe = "".join(sample[0].splitlines(keepends=True)[:3]) if sample else "x = 1\n"
        if hf.encode(probe, add_special_tokens=False) != tok.encode(probe).ids:
            raise RuntimeError(f"AutoTokenizer.from_pretrained({folder}) encodes differently")
        num_bytes = sum(len(text.encode()) for text in sample)
        num_ids = sum(map(len, encode_texts(tok, sample)))
        summary = (f"vocab {tok.get_vocab_size()} ({how}); "
                   f"{num_bytes / max(num_ids, 1):.2f} bytes/token on {len(sample)} files")
        return {"vocab_size": tok.get_vocab_size(), "locality": locality.to_json()}, summary

    return _run_stage("tokenizer", folder, log, build)


def stage_tokenize(
    args: argparse.Namespace, corpus: Path, tokenizer: Path, folder: Path, log: Logger
) -> dict:
    """Corpus -> tokens/train_e*.bin (FIM redrawn per stream), val.bin, val_fim.bin, meta."""
    import numpy as np
    from editkv.engine.training.bpe import load_tokenizer, token_byte_lengths
    from editkv.engine.training.corpus import DocStore, write_json
    from editkv.engine.training.data import tokenize_stream

    def build():
        tok_path = tokenizer / "tokenizer.json"
        tok = load_tokenizer(tokenizer)
        np.save(folder / "token_bytes.npy", token_byte_lengths(tok))
        train_ids = None
        if args.tokenize_mb:
            train_ids = DocStore(corpus, "train").sample(int(args.tokenize_mb * 1e6), args.seed)
        streams = []
        for k in range(args.fim_streams):
            streams.append(tokenize_stream(
                tok_path, corpus, "train", folder / f"train_e{k}.bin", fim_rate=args.fim_rate,
                line_fim_share=args.line_fim_share, fim_tail=args.fim_tail, heal_share=args.heal_share,
                seed=[args.seed, k], shuffle=True,
                doc_ids=train_ids, workers=args.workers))
            log(f"[tokenize] stream {k}: {streams[-1]}")
        val = tokenize_stream(tok_path, corpus, "val", folder / "val.bin", fim_rate=0.0,
                              seed=[args.seed, 10_000], shuffle=False, workers=args.workers)
        val_fim = tokenize_stream(tok_path, corpus, "val", folder / "val_fim.bin", fim_rate=1.0,
                                  fim_tail=args.fim_tail, seed=[args.seed, 10_001], shuffle=False,
                                  workers=args.workers)
        val_line_fim = tokenize_stream(tok_path, corpus, "val", folder / "val_line_fim.bin",
                                       fim_rate=1.0, line_fim_share=1.0, fim_tail=args.fim_tail,
                                       seed=[args.seed, 10_002],
                                       shuffle=False, workers=args.workers)
        meta = {"vocab_size": tok.get_vocab_size(), "train_streams": streams, "val": val,
                "val_fim": val_fim, "val_line_fim": val_line_fim, "fim_rate": args.fim_rate,
                "line_fim_share": args.line_fim_share, "fim_tail": args.fim_tail,
                "heal_share": args.heal_share}
        write_json(folder / "meta.json", meta)
        s0 = streams[0]
        seconds = sum(s["seconds"] for s in streams) + val["seconds"] + val_fim["seconds"]
        summary = (f"{len(streams)} train stream(s) of ~{s0['tokens'] / 1e6:.1f}M tokens "
                   f"({s0['bytes'] / max(s0['tokens'], 1):.2f} bytes/token, "
                   f"{s0['bytes'] / 1e6 / max(s0['seconds'], 1e-9):.1f} MB/s), "
                   f"val {val['tokens']} tokens; {seconds:.1f}s encoding")
        return {"train_tokens": [s["tokens"] for s in streams], "val_tokens": val["tokens"]}, summary

    return _run_stage("tokenize", folder, log, build)


def stage_train_and_export(
    args: argparse.Namespace, work: Path, infos: dict, log: Logger
) -> dict:
    """Train within the time budget, checkpoint, then export (and pack) the model."""
    import torch
    from editkv.engine.training.export import export_model, pack_folder
    from editkv.engine.training.train import TINY_SIZE, ModelSize, TrainConfig, train

    ckpt = work / "checkpoint.pt"
    if ckpt.is_file() and not args.resume:
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it, or delete it to restart")
    if args.resume and not ckpt.is_file():
        raise SystemExit(f"--resume: there is no checkpoint at {ckpt}; "
                         "use --init-from an exported folder to continue from its weights")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = TINY_SIZE if args.tiny else ModelSize()
    size = replace(base, vocab_size=args.vocab_size,
                   max_positions=max(args.seq_len, base.max_positions),
                   **{k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None})
    cfg = TrainConfig(
        seq_len=args.seq_len, micro_batch=args.micro_batch, batch_tokens=args.batch_tokens,
        total_steps=args.total_steps, train_minutes=args.train_minutes, peak_lr=args.lr,
        warmup_steps=args.warmup, log_every=args.log_every, eval_every=args.eval_every,
        ckpt_every=args.ckpt_every, eval_tokens=args.eval_tokens, seed=args.seed,
        device=device, compile=args.compile and device.startswith("cuda"),
    )
    deadline = STARTED + args.max_minutes * 60 - EXPORT_RESERVE_S if args.max_minutes else None
    started = time.monotonic()
    model, stats = train(cfg, size, work / "tokens", ckpt, log, resume=args.resume,
                         init_from=args.init_from, deadline=deadline)
    log(f"[train] {stats['steps']}/{stats['total_steps']} steps, {stats['tokens_seen'] / 1e6:.0f}M "
        f"tokens, val loss {stats['val_loss']}, bpb {stats['val_bits_per_byte']} "
        f"in {time.monotonic() - started:.1f}s")

    started = time.monotonic()
    stats["locality"] = infos["tokenizer"].get("locality")
    stats["stage_seconds"] = {k: v.get("seconds") for k, v in infos.items()}
    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    extra = {"corpus_manifest.json": manifest, "training_stats.json": stats}
    tail = json.loads((work / "tokens" / "meta.json").read_text()).get("fim_tail", 0)
    if tail:  # the FIM layout the tokens were made with; engine/loading.py reads it
        extra["editkv.json"] = {"fim_tail_tokens": tail}
    files = export_model(model, args.out, work / "tokenizer", extra)
    summary = f"{len(files)} files in {args.out}"
    if args.pack:
        packed = pack_folder(args.out, args.pack)
        summary += f"; pack of {len(packed)} files in {args.pack}"
    log(f"[export] {summary} in {time.monotonic() - started:.1f}s")
    return stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; --tiny fills unset sizes with test-sized ones."""
    p = argparse.ArgumentParser(prog="python -m editkv.engine.train_default", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", default="all",
                   choices=["all", "corpus", "tokenizer", "tokenize", "unpack"],
                   help="run the pipeline up to this stage (default: all, with training and "
                        "export); unpack: rebuild --out from --pack")
    p.add_argument("--work", type=Path, help="scratch folder: corpus, tokens, checkpoint, log")
    p.add_argument("--out", type=Path, help="exported model folder")
    p.add_argument("--pack", type=Path, help="also write a transfer pack here (<= 8 files)")
    p.add_argument("--max-minutes", type=float, help="wall budget of this invocation")
    p.add_argument("--total-steps", type=int, help="schedule length in optimizer steps")
    p.add_argument("--train-minutes", type=float,
                   help="size the schedule to this much training time over all runs")
    p.add_argument("--resume", action="store_true", help="continue --work's checkpoint")
    p.add_argument("--init-from", type=Path,
                   help="start from an exported folder's weights with a fresh optimizer")
    p.add_argument("--tiny", action="store_true", help="test-sized model, corpus sample, steps")
    p.add_argument("--sources", type=Path, nargs="+",
                   help="site-packages-like folders to take distributions from (default: "
                        "the interpreter's)")
    p.add_argument("--stdlib", help="standard library folder, or 'none' (default: this Python's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--tokenizer-mb", type=float, help="corpus sample for BPE training")
    p.add_argument("--tokenize-mb", type=float, help="tokenize only a sample of the corpus")
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--line-fim-share", type=float, default=0.7,
                   help="share of FIM documents cut into line-aligned samples (the rest: two "
                        "random character cuts)")
    p.add_argument("--fim-tail", type=int, default=32,
                   help="prefix tokens repeated after <|fim_middle|> (the exported editkv.json's "
                        "fim_tail_tokens)")
    p.add_argument("--heal-share", type=float, default=0.5,
                   help="share of FIM samples cut where token healing cuts")
    p.add_argument("--fim-streams", type=int, default=2,
                   help="train streams with independent FIM draws (epoch e reads e mod n)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--eval-tokens", type=int)
    for name in SIZE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    args = p.parse_args(argv)

    full = {"vocab_size": 15360, "tokenizer_mb": 100, "tokenize_mb": None, "seq_len": 4096,
            "micro_batch": 16, "batch_tokens": 262144, "lr": 2e-3, "warmup": 200,
            "log_every": 10, "eval_every": 250, "ckpt_every": 100, "eval_tokens": 2_000_000}
    tiny = {"vocab_size": 512, "tokenizer_mb": 2, "tokenize_mb": 4, "seq_len": 128,
            "micro_batch": 4, "batch_tokens": 1024, "lr": 3e-3, "warmup": 10, "log_every": 5,
            "eval_every": 20, "ckpt_every": 20, "eval_tokens": 8192}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage == "unpack":
        if not (args.pack and args.out):
            p.error("unpack needs --pack (the pack folder) and --out")
    elif not args.work:
        p.error("--work is required")
    elif args.stage == "all" and not args.out:
        p.error("--out is required to export the model")
    if args.tiny and args.total_steps is None and args.train_minutes is None and not args.resume:
        args.total_steps = 40
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline stages in order; see the module docstring."""
    args = parse_args(argv)
    if args.stage == "unpack":
        from editkv.engine.training.export import unpack_folder

        files = unpack_folder(args.pack, args.out)
        print(f"unpacked {len(files)} files into {args.out}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    log = Logger(args.work / "train.log")
    log(f"python -m editkv.engine.train_default {' '.join(sys.argv[1:] if argv is None else argv)}")
    infos = {"corpus": stage_corpus(args, args.work / "corpus", log)}
    if args.stage == "corpus":
        return 0
    infos["tokenizer"] = stage_tokenizer(args, args.work / "corpus", args.work / "tokenizer", log)
    if args.stage == "tokenizer":
        return 0
    infos["tokenize"] = stage_tokenize(args, args.work / "corpus", args.work / "tokenizer",
                                       args.work / "tokens", log)
    if args.stage == "tokenize":
        return 0
    stage_train_and_export(args, args.work, infos, log)
    log(f"done in {time.monotonic() - STARTED:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
