"""Token streams for training: documents -> (fill-in-the-middle) ids -> packed windows.

Data flow: DocStore + tokenizer.json -> `tokenize_stream` (a process pool encodes chunks
of documents; which document gets FIM, and where it is cut, comes from the seed, so a
stream is reproducible) -> `{name}.bin`, uint16 ids, every document closed by
<|endoftext|> -> `PackedStreams` (windows of seq_len + 1 ids, a seeded order per epoch,
epoch e reading stream e mod n, so each of the n streams has its own FIM cuts) -> batches.

Document layouts (ids of the pieces are encoded separately, so control ids come only from
here, never from text that happens to contain "<|fim_middle|>"):
  plain: <|fim_prefix|> text <|endoftext|>
  FIM:   <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|endoftext|>
FIM documents are cut either at two random character positions or, for `line_fim_share` of
them, into up to 4 line-aligned samples shaped like editkv's requests (`line_fim_samples`).
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.pool
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from editkv.engine.training.bpe import EOT_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, encode_texts
from editkv.engine.training.corpus import DocStore
from tokenizers import Tokenizer

_DOCS_PER_JOB = 256


# Line-aligned FIM samples: where the cursor sits in the first line of the middle, and how
# many lines the middle spans. editkv's FIM prompt cuts at the cursor and resumes the suffix
# at the next line start, so the middle is "rest of this line (+ more lines)" with its line
# terminator; most requests are one line, after the indentation.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
LINE_FIM_MAX_SAMPLES = 4  # samples cut from one document (1 per 8,000 chars)
LINE_FIM_PREFIX_CHARS = (200, 8000)  # prefix window, drawn uniformly
LINE_FIM_SUFFIX_CHARS = (0, 3000)  # suffix window


def fim_cuts(rng: np.random.Generator, num_docs: int, fim_rate: float, line_share: float = 0.0) -> np.ndarray:
    """Per document: [layout, u1, u2, u3]; layout 0 plain, 1 FIM at two character cuts
    u1 * (len + 1), u2 * (len + 1), 2 line-aligned FIM samples drawn from seed u3."""  # [N, 4]
    draws = rng.random((num_docs, 4))
    is_fim = draws[:, 0] < fim_rate
    line = rng.random(num_docs) < line_share
    draws[:, 0] = np.where(is_fim, np.where(line, 2.0, 1.0), 0.0)
    return draws


def line_fim_samples(text: str, seed: float) -> list[tuple[str, str, str]]:
    """(prefix, suffix, middle) triples cut at line boundaries, as editkv's FIM view cuts.

    The middle runs from a cursor in a non-blank line (after its indentation, at the line
    start, or inside the line) to the end of that line or of a few more lines, terminator
    included; the suffix starts at the next line. Prefix and suffix are windows of the
    document that begin and end at line boundaries. Empty when the text has no non-blank line.
    """
    rng = np.random.default_rng(int(seed * 2**53))
    starts = [0] + [m.end() for m in _LINE_BREAK.finditer(text)]
    if starts[-1] == len(text):
        starts.pop()  # no line after a final terminator
    bodies = [_LINE_BREAK.sub("", text[a:b]) for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]
    candidates = [i for i, body in enumerate(bodies) if body.strip()]
    if not candidates:
        return []
    out = []
    for _ in range(min(LINE_FIM_MAX_SAMPLES, 1 + len(text) // 8000)):
        i = int(candidates[rng.integers(len(candidates))])
        r = rng.random()
        lines = 1 if r < 0.6 else int(rng.integers(2, 5)) if r < 0.9 else int(rng.integers(5, 11))
        j = i + lines
        end = starts[j] if j < len(starts) else len(text)
        body = bodies[i]
        indent = len(body) - len(body.lstrip(" \t"))
        r = rng.random()
        if r < 0.55:
            cursor = starts[i] + indent
        elif r < 0.7:
            cursor = starts[i]
        else:
            cursor = starts[i] + indent + int(rng.integers(0, len(body) - indent + 1))
        lo = max(0, cursor - int(rng.integers(*LINE_FIM_PREFIX_CHARS)))
        k = bisect.bisect_left(starts, lo)  # snap up to a line start
        lo = min(starts[k], starts[i]) if k < len(starts) else starts[i]
        hi = end + int(rng.integers(*LINE_FIM_SUFFIX_CHARS))
        if hi < len(text):
            hi = max(starts[bisect.bisect_right(starts, hi) - 1], end)  # snap down to a line start
        hi = min(hi, len(text))
        out.append((text[lo:cursor], text[end:hi], text[cursor:end]))
    return out


def heal_split(tok: Tokenizer, prefix: str, middle: str) -> tuple[str, str]:
    """Move the prefix's last pre-token into the middle: the cut editkv's token healing makes
    (it drops the cursor's token from the prompt and has the model spell it again)."""
    line_start = max(prefix.rfind("\n", 0, len(prefix) - 1), prefix.rfind("\r", 0, len(prefix) - 1)) + 1
    pieces = tok.pre_tokenizer.pre_tokenize_str(prefix[line_start:]) if tok.pre_tokenizer else []
    if not pieces:
        return prefix, middle
    cut = line_start + pieces[-1][1][0]
    return prefix[:cut], prefix[cut:] + middle


def encode_documents(
    tok: Tokenizer, texts: Sequence[str], cuts: np.ndarray, *, fim_tail: int = 0, heal_share: float = 0.0
) -> np.ndarray:
    """Ids of `texts` in their plain or FIM layouts, concatenated.

    `fim_tail`: repeat the prefix's last tokens after <|fim_middle|> (see FimTokens.tail);
    `heal_share`: share of FIM samples cut where token healing cuts (`heal_split`).
    """  # cuts [N, 4] -> [T]
    pieces: list[str] = []
    layouts: list[int] = []  # per output document: 0 plain, 1 FIM
    for text, (layout, u1, u2, u3) in zip(texts, cuts, strict=True):
        samples = []
        if layout == 1:
            lo, hi = sorted((int(u1 * (len(text) + 1)), int(u2 * (len(text) + 1))))
            samples = [(text[:lo], text[hi:], text[lo:hi])]
        elif layout == 2:
            samples = line_fim_samples(text, u3)
        heal = (u3 * 1024) % 1.0 < heal_share  # independent of the cuts' own draws
        for prefix, suffix, middle in samples:
            if heal:
                prefix, middle = heal_split(tok, prefix, middle)
            pieces += [prefix, suffix, middle]
            layouts.append(1)
        if not samples:
            pieces.append(text)
            layouts.append(0)
    ids = encode_texts(tok, pieces)
    out: list[int] = []
    k = 0
    for layout in layouts:
        if layout:
            prefix, suffix, middle = ids[k:k + 3]
            tail = prefix[-fim_tail:] if fim_tail else []
            out += [FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID, *tail, *middle]
            k += 3
        else:
            # <|fim_prefix|> opens every document: it is the document-start token of the
            # left-to-right prompt layout too (engine/prompting.py).
            out += [FIM_PREFIX_ID, *ids[k]]
            k += 1
        out.append(EOT_ID)
    return np.array(out, dtype=np.uint16)


# Per-process state of pool workers.
_worker: dict = {}


def _init_worker(tokenizer_path: str, corpus_dir: str, store_name: str, layout: dict) -> None:
    _worker["tok"] = Tokenizer.from_file(tokenizer_path)
    _worker["store"] = DocStore(Path(corpus_dir), store_name)
    _worker["layout"] = layout


@contextmanager
def _worker_pool(
    workers: int, tokenizer_path: Path, corpus_dir: Path, store_name: str, layout: dict
) -> Iterator[multiprocessing.pool.Pool]:
    """A forked pool of single-threaded tokenizer workers (the pool is the parallelism).

    Forked, not spawned: spawn re-imports the caller's __main__, which breaks under
    pytest and stdin scripts. The variable is set while forking so that `tokenizers` in
    the children neither warns about the fork nor starts thread pools.
    """
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(
            workers, _init_worker, (str(tokenizer_path), str(corpus_dir), store_name, layout)
        )
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        yield pool


def _encode_job(job: tuple[np.ndarray, np.ndarray]) -> bytes:
    doc_ids, cuts = job
    store = _worker["store"]
    return encode_documents(_worker["tok"], [store[int(i)] for i in doc_ids], cuts, **_worker["layout"]).tobytes()


def tokenize_stream(
    tokenizer_path: Path,
    corpus_dir: Path,
    store_name: str,
    out_path: Path,
    *,
    fim_rate: float,
    line_fim_share: float = 0.0,
    fim_tail: int = 0,
    heal_share: float = 0.0,
    seed: Sequence[int],
    shuffle: bool,
    doc_ids: Sequence[int] | None = None,
    workers: int = 1,
) -> dict:
    """Encode documents of one store into `out_path` (uint16); returns counts.

    `seed` fixes the document order (when `shuffle`) and the FIM choices and cuts.
    """
    started = time.perf_counter()
    store = DocStore(corpus_dir, store_name)
    ids = np.arange(len(store)) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    rng = np.random.default_rng(list(seed))
    if shuffle:
        ids = ids[rng.permutation(len(ids))]
    cuts = fim_cuts(rng, len(ids), fim_rate, line_fim_share)
    jobs = [
        (ids[i:i + _DOCS_PER_JOB], cuts[i:i + _DOCS_PER_JOB])
        for i in range(0, len(ids), _DOCS_PER_JOB)
    ]
    layout = {"fim_tail": fim_tail, "heal_share": heal_share}
    num_tokens = 0
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        if workers > 1:
            with _worker_pool(workers, tokenizer_path, corpus_dir, store_name, layout) as pool:
                for chunk in pool.imap(_encode_job, jobs):
                    f.write(chunk)
                    num_tokens += len(chunk) // 2
        else:
            tok = Tokenizer.from_file(str(tokenizer_path))
            for doc_ids_, cuts_ in jobs:
                chunk = encode_documents(tok, [store[int(i)] for i in doc_ids_], cuts_, **layout)
                f.write(chunk.tobytes())
                num_tokens += len(chunk)
    tmp.replace(out_path)
    num_bytes = int(np.diff(store.offsets)[ids].sum()) if len(ids) else 0
    return {
        "path": out_path.name, "docs": len(ids), "fim_docs": int((cuts[:, 0] > 0).sum()),
        "line_fim_docs": int((cuts[:, 0] == 2).sum()),
        "tokens": num_tokens, "bytes": num_bytes,
        "seconds": round(time.perf_counter() - started, 2),
    }


class PackedStreams:
    """Token streams cut into windows of seq_len + 1 ids, read in a seeded order per epoch.

    Window `g` (a global counter, so a checkpoint only needs it) is window g mod W of epoch
    g // W, read from stream `epoch mod len(streams)`. Documents run across windows.
    """

    def __init__(self, paths: Sequence[Path], seq_len: int, seed: int) -> None:
        self.streams = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]
        self.seq_len, self.seed = seq_len, seed
        self.num_windows = min((len(s) - 1) // seq_len for s in self.streams)
        if self.num_windows < 1:
            raise ValueError(
                f"token stream {paths[0]} holds fewer than {seq_len + 1} tokens; "
                "use a bigger corpus or a shorter --seq-len"
            )
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def window(self, g: int) -> np.ndarray:
        """Ids of window `g`."""  # [seq_len + 1]
        epoch, i = divmod(g, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        start = int(self._order[i]) * self.seq_len
        return self.streams[epoch % len(self.streams)][start:start + self.seq_len + 1]

    def batch(self, first: int, count: int) -> np.ndarray:
        """Windows first .. first + count - 1, as int64."""  # [count, seq_len + 1]
        return np.stack([self.window(g) for g in range(first, first + count)]).astype(np.int64)


def eval_windows(path: Path, seq_len: int, batch: int, max_tokens: int) -> Iterator[np.ndarray]:
    """Consecutive windows of a stream (the same every call), `batch` at a time."""
    stream = np.memmap(path, dtype=np.uint16, mode="r")
    num = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
    if num == 0 and len(stream) > 1:  # a tiny corpus: one short window
        yield np.asarray(stream, dtype=np.int64)[None]
    for first in range(0, num, batch):
        last = min(num, first + batch)
        rows = [stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(first, last)]
        yield np.stack(rows).astype(np.int64)  # [b, seq_len + 1]
