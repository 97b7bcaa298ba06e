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
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.training.bpe import EOT_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, encode_texts
from engine.training.corpus import DocStore

_DOCS_PER_JOB = 256


def fim_cuts(rng: np.random.Generator, num_docs: int, fim_rate: float) -> np.ndarray:
    """Per document: [is_fim, u1, u2]; the cut points are u * (len + 1), sorted."""  # [N, 3]
    draws = rng.random((num_docs, 3))
    draws[:, 0] = draws[:, 0] < fim_rate
    return draws


def encode_documents(tok: Tokenizer, texts: Sequence[str], cuts: np.ndarray) -> np.ndarray:
    """Ids of `texts` in their plain or FIM layouts, concatenated."""  # cuts [N, 3] -> [T]
    pieces: list[str] = []
    for text, (is_fim, u1, u2) in zip(texts, cuts, strict=True):
        if is_fim:
            lo, hi = sorted((int(u1 * (len(text) + 1)), int(u2 * (len(text) + 1))))
            pieces += [text[:lo], text[hi:], text[lo:hi]]  # prefix, suffix, middle
        else:
            pieces.append(text)
    ids = encode_texts(tok, pieces)
    out: list[int] = []
    k = 0
    for is_fim, _, _ in cuts:
        if is_fim:
            prefix, suffix, middle = ids[k:k + 3]
            out += [FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID, *middle]
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


def _init_worker(tokenizer_path: str, corpus_dir: str, store_name: str) -> None:
    _worker["tok"] = Tokenizer.from_file(tokenizer_path)
    _worker["store"] = DocStore(Path(corpus_dir), store_name)


@contextmanager
def _worker_pool(
    workers: int, tokenizer_path: Path, corpus_dir: Path, store_name: str
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
            workers, _init_worker, (str(tokenizer_path), str(corpus_dir), store_name)
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
    return encode_documents(_worker["tok"], [store[int(i)] for i in doc_ids], cuts).tobytes()


def tokenize_stream(
    tokenizer_path: Path,
    corpus_dir: Path,
    store_name: str,
    out_path: Path,
    *,
    fim_rate: float,
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
    cuts = fim_cuts(rng, len(ids), fim_rate)
    jobs = [
        (ids[i:i + _DOCS_PER_JOB], cuts[i:i + _DOCS_PER_JOB])
        for i in range(0, len(ids), _DOCS_PER_JOB)
    ]
    num_tokens = 0
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        if workers > 1:
            with _worker_pool(workers, tokenizer_path, corpus_dir, store_name) as pool:
                for chunk in pool.imap(_encode_job, jobs):
                    f.write(chunk)
                    num_tokens += len(chunk) // 2
        else:
            tok = Tokenizer.from_file(str(tokenizer_path))
            for doc_ids_, cuts_ in jobs:
                chunk = encode_documents(tok, [store[int(i)] for i in doc_ids_], cuts_)
                f.write(chunk.tobytes())
                num_tokens += len(chunk)
    tmp.replace(out_path)
    num_bytes = int(np.diff(store.offsets)[ids].sum()) if len(ids) else 0
    return {
        "path": out_path.name, "docs": len(ids), "fim_docs": int(cuts[:, 0].sum()),
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
