"""Cross-file context for served requests: other open documents' caches in front of a view.

    a request for document U (text T) + the open documents (most recently used last)
      -> `context_sources`: the open documents T imports first (Python `import` / `from ... import`
         statements matched against the documents' paths), then the others, most recently used
         first, at most `max_files`; only documents whose whole text has keys (the others get
         them in the background, never on a keystroke's path)
      -> edit_cache.crossfile: `choose_chunks` (whole small files, else the definitions T uses,
         under `budget` tokens), `block_layout` (the model's repo-level or plain format),
         `build_block` (their keys copied and re-rotated, CacheBlend's `recompute` percent of
         them recomputed)
      -> `ContextBlock`, kept per document while its layout and the sources' versions stay the
         same: typing in U rebuilds it only when the chunks T asks for change.

An imported module that no open document holds is looked for under the client's workspace
folders (`workspace_files`: `a/b.py` or `a/b/__init__.py`, at the root or under `src/`, files
of at most `MAX_FILE_BYTES`, UTF-8) and read into a document of its own, so that its cache is
built once, in the background, and kept (evicted under the KV budget like any other); at most
`MAX_DISK_FILES` such documents, the least recently read closed first; a file opened by the
client replaces its copy. A file changed on disk since it was read (its modification time or
size differ, checked at each request that imports it: one stat) is read again, and the
document takes the difference as one edit, so PIE repairs its cache instead of re-encoding it.

The blocks are KV buffers of their own, at most `KEEP` of them (one per recently served
document), each at most `budget` tokens plus the format's wrapper tokens; their bytes count
against the documents' KV budget (`kv_bytes`, the cache's `reserved`): a new block may evict
documents' caches, least recently used first, as a document's growth does.
"""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from editkv.edit_cache.crossfile import ContextBlock, block_layout, build_block, choose_chunks
from editkv.edit_cache.document import Document
from editkv.edit_cache.positions import Range, common_prefix, common_suffix, to_position

if TYPE_CHECKING:
    from editkv.lsp_server.settings import CrossFileOptions

KEEP = 2  # context blocks kept (the documents served last)
MAX_FILE_BYTES = 256 * 1024  # workspace files larger than this are not read as context
MAX_DISK_FILES = 16  # workspace files kept as documents at once

_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+\(?[ \t]*(\w+(?:[ \t]*,[ \t]*\w+)*)"
                     r"|import[ \t]+([\w.]+(?:[ \t]*,[ \t]*[\w.]+)*))", re.MULTILINE)


def imported_modules(text: str) -> list[tuple[str, ...]]:
    """The dotted module names `text` may import, as tuples of parts: `import a.b` gives a.b;
    `from a.b import c` gives a.b and a.b.c (c may be a submodule); relative imports count from
    their first name (`from . import x` gives x). Names inside parentheses past the first line
    are not read."""
    out = []
    for m in _IMPORT.finditer(text):
        if m.group(1) is not None:
            base = tuple(p for p in m.group(1).lstrip(".").split(".") if p)
            candidates = [base] + [(*base, name.strip()) for name in m.group(2).split(",")]
        else:
            candidates = [tuple(p for p in name.strip().split(".") if p) for name in m.group(3).split(",")]
        out += [c for c in candidates if c]
    return out


@functools.lru_cache(maxsize=4)
def _modules(text: str) -> tuple[tuple[str, ...], ...]:
    """`imported_modules`, once per text: a request asks for the workspace's files and then for
    the sources, on the same text."""
    return tuple(imported_modules(text))


def module_parts(uri: str) -> tuple[str, ...]:
    """A document's path as module parts: `file:///w/pkg/mod.py` -> (..., "pkg", "mod");
    a package's `__init__.py` is the package."""
    path = PurePosixPath(unquote(urlparse(uri).path) or uri)
    parts = list(path.parts)
    if not parts:
        return ()
    last = PurePosixPath(parts[-1])
    parts[-1] = last.stem if last.suffix == ".py" else last.name
    if parts[-1] == "__init__":
        parts.pop()
    return tuple(parts)


def _imports(uri: str, modules: Iterable[tuple[str, ...]]) -> bool:
    parts = module_parts(uri)
    return any(len(m) <= len(parts) and parts[len(parts) - len(m):] == m for m in modules)


def context_sources(uri: str, text: str, docs: Mapping[str, Document], max_files: int
                    ) -> tuple[list[tuple[str, Document]], list[str]]:
    """The open documents to show before `uri`'s: the ones its text imports first, then the
    others, most recently used first (`docs` keeps the most recent last), at most `max_files`;
    as (those whose whole text has keys, the uris of the others: the background encodes them)."""
    modules = _modules(text)
    others = [(u, d) for u, d in reversed(list(docs.items())) if u != uri and d.ids]
    ordered = [x for x in others if _imports(x[0], modules)] + [x for x in others if not _imports(x[0], modules)]
    picked = ordered[:max_files]
    ready = [(u, d) for u, d in picked if d.cache is not None and d.num_unencoded == 0]
    return ready, [u for u, d in picked if d.cache is None or d.num_unencoded]


def module_files(modules: Iterable[tuple[str, ...]], roots: Iterable[str]) -> list[Path]:
    """Files under `roots` that hold `modules` (`a/b.py` or `a/b/__init__.py`, at a root or in its
    `src/`), each once, in the modules' order; small enough, existing ones only."""
    out: list[Path] = []
    for module in modules:
        for root in roots:
            for base in (Path(root), Path(root) / "src"):
                for path in (base.joinpath(*module[:-1], module[-1] + ".py"), base.joinpath(*module, "__init__.py")):
                    try:
                        ok = path.is_file() and path.stat().st_size <= MAX_FILE_BYTES
                    except OSError:
                        ok = False
                    if ok and path not in out:
                        out.append(path)
    return out


def text_change(old: str, new: str) -> tuple[Range, str]:
    """One change that turns `old` into `new`: the range between their common prefix and common
    suffix (code points: utf-32 positions) and the text that replaces it."""
    start = common_prefix(old, new)
    end = common_suffix(old[start:], new[start:])  # not into the common prefix
    rng = Range(to_position(old, start, "utf-32"), to_position(old, len(old) - end, "utf-32"))
    return rng, new[start : len(new) - end]


def relative_paths(uri: str, uris: list[str]) -> tuple[str, list[str]]:
    """(the workspace's name, each uri's path relative to the folder all of them share)."""
    paths = [PurePosixPath(unquote(urlparse(u).path) or u) for u in [uri, *uris]]
    common = paths[0].parent
    for p in paths[1:]:
        while common != common.parent and common not in p.parents:
            common = common.parent
    return common.name, [p.relative_to(common).as_posix() if common in p.parents else p.name for p in paths]


class CrossFileContext:
    """The context blocks of the documents served last, rebuilt when what they hold changes."""

    def __init__(self) -> None:
        self.blocks: OrderedDict[str, tuple[tuple, ContextBlock]] = OrderedDict()
        self.built = 0  # blocks built (a request whose block was kept builds none)
        self.wanted: list[str] = []  # sources the last request could not show: not encoded yet
        # documents read from the workspace, oldest first: uri -> (mtime_ns, size) of the file when read
        self.from_disk: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._resolved: dict[tuple, list[Path]] = {}  # (roots, imports) -> their files

    def workspace_files(self, uri: str, text: str, roots: tuple[str, ...], docs: Mapping[str, Document],
                        limit: int = 4) -> list[tuple[str, str]]:
        """(uri, text) of files under `roots` that `text` imports and no document holds yet, or
        that were read before and changed on disk since, among the first `limit` files its
        imports name (no more can be shown: `max_files`; reading more would churn the
        `MAX_DISK_FILES` bound at every request)."""
        modules = _modules(text)
        key = (roots, modules)
        if key not in self._resolved:
            if len(self._resolved) > 256:
                self._resolved.clear()
            self._resolved[key] = module_files(modules, roots)
        out = []
        for path in self._resolved[key][:limit]:
            file_uri = path.as_uri()
            ours = file_uri in self.from_disk and file_uri in docs  # read from disk before
            if file_uri == uri or (file_uri in docs and not ours):  # the client's document
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            stamp = (info.st_mtime_ns, info.st_size)
            if ours:
                self.from_disk.move_to_end(file_uri)
                if self.from_disk[file_uri] == stamp or info.st_size > MAX_FILE_BYTES:
                    continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if "\x00" in text:
                continue
            self.from_disk[file_uri] = stamp
            out.append((file_uri, text))
        return out

    def forget_workspace_files(self, cache) -> None:  # noqa: ANN001 - edit_cache.manager.DocumentCache
        """Close the least recently read workspace files past `MAX_DISK_FILES`."""
        while len(self.from_disk) > MAX_DISK_FILES:
            old, _ = self.from_disk.popitem(last=False)
            cache.close(old)
            self.blocks.pop(old, None)

    def kv_bytes(self) -> int:
        """The KV bytes the kept blocks hold."""
        return sum(block.cache.nbytes() for _, block in self.blocks.values())

    def clear(self) -> None:
        self.blocks.clear()
        self.wanted = []

    def block_for(self, uri: str, doc: Document, docs: Mapping[str, Document], options: CrossFileOptions
                  ) -> tuple[ContextBlock | None, dict]:
        """The block to place in front of `doc` (None: no other document to show), and the
        request's context counters."""
        started = time.perf_counter()
        sources, self.wanted = context_sources(uri, doc.text, docs, options.max_files)
        if not sources or options.budget <= 0:
            self.blocks.pop(uri, None)
            return None, {"context_files": 0, "context_waiting": len(self.wanted)}
        repo, paths = relative_paths(uri, [u for u, _ in sources])
        chunks = choose_chunks(doc.text, [(p, d) for p, (_, d) in zip(paths[1:], sources, strict=True)],
                               options.budget)
        if not chunks:
            self.blocks.pop(uri, None)
            return None, {"context_files": 0, "context_waiting": len(self.wanted)}
        layout = block_layout(doc.tokenizer, doc.model.config, chunks, doc.head, path=paths[0], repo=repo)
        key = (tuple(layout.ids), options.recompute,
               tuple((id(p.document), p.document.version, p.start, p.end) for p in layout.pieces))
        kept = self.blocks.get(uri)
        built = kept is None or kept[0] != key
        if built:
            block = build_block(doc.model, layout, recompute_ratio=options.recompute / 100)
            self.blocks[uri] = (key, block)
            self.built += 1
        else:
            block = kept[1]
        self.blocks.move_to_end(uri)
        while len(self.blocks) > KEEP:
            self.blocks.popitem(last=False)
        return block, {"context_files": len(chunks), "context_tokens": block.length,
                       "context_reused_tokens": block.reused_tokens,
                       "context_recomputed_tokens": block.recomputed_tokens if built else 0,
                       "context_built": built, "context_waiting": len(self.wanted),
                       "context_ms": 1000 * (time.perf_counter() - started)}
