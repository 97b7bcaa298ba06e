"""Corpus of the default model: permissively licensed Python files found on this machine.

Sources are the running interpreter's standard library (PSF-2.0) and every installed
distribution, each taken from its RECORD, kept only when its metadata names a permissive
licence. The projects of the evaluation set (`shared/realedits`) are left out by name and
by path, vendored copies included.

Data flow: `collect_sources()` -> [Source] -> `build_corpus` (a process pool reads, checks
and hashes files; the parent deduplicates and splits) -> `DocStore`s "train" and "val" and
manifest.json, which ships beside the model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 200_000
MIN_FILE_BYTES = 64
VAL_PER_MILLE = 5  # ~0.5% of files, chosen by content hash
STDLIB_NAME = "python-stdlib"

# Projects of the evaluation edits; their code must not be trained on.
EVAL_PROJECTS = ("itsdangerous", "boltons", "more-itertools", "tomlkit")
OWN_PROJECT = "editkv"  # an editable install of this repo: changing code, not corpus
_EVAL_DIRS = frozenset(name.replace("-", "_") for name in EVAL_PROJECTS)

PERMISSIVE, COPYLEFT, UNKNOWN = "permissive", "copyleft", "unknown"
# SPDX ids we accept, upper-cased. Weak copyleft (MPL, LGPL, EPL) is not accepted.
PERMISSIVE_SPDX = frozenset(
    s.upper()
    for s in (
        "MIT", "MIT-0", "0BSD", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0",
        "Python-2.0", "Python-2.0.1", "CNRI-Python", "ISC", "Unlicense", "Zlib", "CC0-1.0",
        "BSL-1.0", "HPND", "NCSA",
    )
)
_COPYLEFT_TEXT = re.compile(
    r"\b(?:A|L)?GPL|GNU (?:LESSER |LIBRARY |AFFERO )?GENERAL PUBLIC|MOZILLA PUBLIC|\bMPL\b"
    r"|\bEUPL\b|\bCDDL\b|\bEPL\b|ECLIPSE PUBLIC|\bOSL\b|CECILL|COPYLEFT|\bSSPL\b",
    re.IGNORECASE,
)
# Names of permissive licences as they appear in License fields, classifiers and the
# first lines of licence texts.
_PERMISSIVE_NAME = re.compile(
    r"\bMIT\b|\bBSD\b|\bAPACHE\b|\bPSF\b|PYTHON SOFTWARE FOUNDATION|\bISC\b|UNLICENSE"
    r"|\bZLIB\b|\bHPND\b|HISTORICAL PERMISSION NOTICE|BOOST SOFTWARE|\bBSL\b|PUBLIC DOMAIN"
    r"|\bCC0\b|\bX11\b",
    re.IGNORECASE,
)
# Sentences that only permissive licence texts contain (MIT, BSD, ISC, Apache, Boost).
_PERMISSIVE_PHRASE = re.compile(
    r"Permission is hereby granted, free of charge|Redistribution and use in source and "
    r"binary forms|Permission to use, copy, modify, and/?o?r? ?distribute this software"
    r"|Licensed under the Apache License|Apache License,?\s+Version 2\.0",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Licence:
    """A distribution's licence verdict and the metadata field it was read from."""

    verdict: str  # PERMISSIVE | COPYLEFT | UNKNOWN
    found: str  # "Field: value", the value cut to 200 characters


@dataclass(frozen=True)
class Source:
    """One distribution (or the standard library) and the .py files it installed."""

    name: str
    version: str
    licence: Licence
    root: Path  # paths in `files` are relative to it
    files: tuple[str, ...]
    excluded: str | None = None  # why nothing of it is used; None when it is used


@dataclass
class SourceCounts:
    """Per-source tallies that go into the manifest."""

    files_kept: int = 0
    bytes_kept: int = 0
    dropped: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------------------- licences


def _spdx(expression: str) -> str | None:
    """Verdict of an SPDX expression; None when it is not one (free text)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    if not tokens:
        return None
    rank = {COPYLEFT: 0, UNKNOWN: 1, PERMISSIVE: 2}
    pos = 0

    def atom() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("expression ends early")
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            verdict = any_of()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError("unbalanced parenthesis")
            pos += 1
            return verdict
        if not re.fullmatch(r"[A-Za-z0-9.+-]+|LicenseRef-[\w.-]+", tok) or tok.upper() in (
            "AND", "OR", "WITH"
        ):
            raise ValueError(f"not a licence id: {tok}")
        if pos < len(tokens) and tokens[pos] == "WITH":  # exceptions only add permissions
            pos += 2
        ident = tok.upper().removesuffix("+")
        if ident in PERMISSIVE_SPDX:
            return PERMISSIVE
        return COPYLEFT if _COPYLEFT_TEXT.search(ident) else UNKNOWN

    def all_of() -> str:
        nonlocal pos
        verdicts = [atom()]
        while pos < len(tokens) and tokens[pos] == "AND":
            pos += 1
            verdicts.append(atom())
        return min(verdicts, key=rank.__getitem__)

    def any_of() -> str:
        nonlocal pos
        verdicts = [all_of()]
        while pos < len(tokens) and tokens[pos] == "OR":
            pos += 1
            verdicts.append(all_of())
        return max(verdicts, key=rank.__getitem__)

    try:
        verdict = any_of()
    except ValueError:
        return None
    if pos != len(tokens):
        return None
    # Single words like "BSD" or "Apache" parse as unknown ids; let the text rules see them.
    return None if verdict == UNKNOWN and len(tokens) == 1 else verdict


def _licence_text(text: str) -> str:
    """Verdict of a free-text License field: a name, or a whole licence text."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    head = " ".join(lines[:3])
    # A long text is judged by its title lines and well-known sentences; further down,
    # bundled third-party notices (e.g. a GPL runtime library in a wheel) do not count.
    judged = head if len(text) > 300 else text
    if _COPYLEFT_TEXT.search(judged):
        return COPYLEFT
    if _PERMISSIVE_NAME.search(judged) or _PERMISSIVE_PHRASE.search(text[:4000]):
        return PERMISSIVE
    return UNKNOWN


def classify_licence(
    expression: str | None, license_field: str | None, classifiers: Iterable[str]
) -> Licence:
    """Licence verdict from package metadata (License-Expression, License, classifiers).

    Any copyleft signal excludes (a dual "MIT or GPL" text is read as GPL); otherwise any
    permissive signal admits; no signal at all is UNKNOWN, which excludes too.
    """
    signals: list[tuple[str, str]] = []
    if expression and expression.strip():
        signals.append((_spdx(expression) or UNKNOWN, f"License-Expression: {expression}"))
    for classifier in classifiers:
        parts = [p.strip() for p in classifier.split("::")]
        if parts[0] != "License" or parts[-1] in ("OSI Approved", "License"):
            continue
        signals.append((_licence_text(parts[-1]), f"Classifier: {classifier}"))
    if license_field and license_field.strip() and license_field.strip() != "UNKNOWN":
        verdict = _spdx(license_field.strip()) or _licence_text(license_field)
        signals.append((verdict, f"License: {license_field.strip()}"))
    for wanted in (COPYLEFT, PERMISSIVE):
        for verdict, found in signals:
            if verdict == wanted:
                return Licence(verdict, found[:200])
    return Licence(UNKNOWN, signals[0][1][:200] if signals else "no licence metadata")


# ----------------------------------------------------------------------------- sources


def normalize_name(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_eval_path(relpath: str) -> bool:
    """Whether a path lies in (or is) a package of an evaluation project."""
    for part in Path(relpath).parts:
        stem = part.lower().removesuffix(".py").replace("-", "_")
        if stem in _EVAL_DIRS:
            return True
    return False


def stdlib_source(root: Path | None = None) -> Source:
    """The standard library's .py files (installed packages under it are skipped)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        rel = os.path.relpath(dirpath, root)
        files += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Source(STDLIB_NAME, version, Licence(PERMISSIVE, "PSF-2.0 (Python standard library)"),
                  root, tuple(sorted(files)))


def distribution_sources(site_dirs: Sequence[Path] | None = None) -> list[Source]:
    """Installed distributions (first of each name on the path), with licence verdicts."""
    if site_dirs is None:
        dists = importlib.metadata.distributions()
    else:
        dists = importlib.metadata.distributions(path=[str(p) for p in site_dirs])
    sources: dict[str, Source] = {}
    for dist in dists:
        meta = dist.metadata
        name = meta["Name"] or ""
        key = normalize_name(name)
        if not key or key in sources:
            continue
        licence = classify_licence(
            meta.get("License-Expression"), meta.get("License"), meta.get_all("Classifier") or []
        )
        root = Path(dist.locate_file(""))
        record = dist.files  # parses RECORD; None when the distribution has none
        files = tuple(
            sorted(
                str(f) for f in (record or [])
                if f.suffix == ".py" and ".." not in f.parts and "__pycache__" not in f.parts
            )
        )
        excluded = None
        if key in EVAL_PROJECTS:
            excluded = "evaluation-set project"
        elif key == OWN_PROJECT:
            excluded = "this project"
        elif record is None:
            excluded = "no RECORD (file list unknown)"
        elif licence.verdict != PERMISSIVE:
            excluded = f"licence {licence.verdict}"
        sources[key] = Source(name, meta["Version"] or "", licence, root, files, excluded)
    return [sources[k] for k in sorted(sources)]


def collect_sources(
    stdlib: Path | None | bool = True, site_dirs: Sequence[Path] | None = None
) -> list[Source]:
    """The standard library (unless `stdlib` is False) and the installed distributions.

    `stdlib` may name another folder; `site_dirs` replaces the interpreter's search path
    (both for tests, which build fake installations).
    """
    sources = distribution_sources(site_dirs)
    if stdlib is not False:
        sources.insert(0, stdlib_source(None if stdlib is True else stdlib))
    return sources


# ---------------------------------------------------------------------------- documents


class DocStore:
    """Documents as one UTF-8 blob plus offsets: `{name}.bin` and `{name}.idx.npy`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = Path(folder), name
        self.offsets = np.load(self.folder / f"{name}.idx.npy")  # [N + 1] int64
        size = int(self.offsets[-1])
        self.blob = (
            np.memmap(self.folder / f"{name}.bin", dtype=np.uint8, mode="r")
            if size else np.zeros(0, np.uint8)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def sample(self, max_bytes: int, seed: int) -> list[int]:
        """Indices of a seeded random subset of about `max_bytes`, in storage order."""
        order = np.random.default_rng(seed).permutation(len(self))
        sizes = np.diff(self.offsets)[order]
        keep = order[np.cumsum(sizes) <= max_bytes]
        return sorted(keep.tolist())

    @staticmethod
    def write(folder: Path, name: str, docs: Iterable[bytes]) -> int:
        """Store `docs`; returns how many."""
        offsets = [0]
        with open(Path(folder) / f"{name}.bin", "wb") as f:
            for doc in docs:
                f.write(doc)
                offsets.append(offsets[-1] + len(doc))
        np.save(Path(folder) / f"{name}.idx.npy", np.array(offsets, dtype=np.int64))
        return len(offsets) - 1


def _read_file(path: str) -> tuple[str, str, bytes]:
    """(status, sha256, bytes) of one file; bytes only when status is "ok"."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            return "too_large", "", b""
        if size < MIN_FILE_BYTES:
            return "too_small", "", b""
        with open(path, "rb") as f:
            data = f.read()
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8", "", b""
    except OSError:
        return "unreadable", "", b""
    return "ok", hashlib.sha256(data).hexdigest(), data


def _val_rank(sha: str) -> int:
    return int(sha[:8], 16) % 1000


def is_val(sha: str) -> bool:
    """Whether a file of this content hash is held out for validation."""
    return _val_rank(sha) < VAL_PER_MILLE


def build_corpus(sources: Sequence[Source], out: Path, workers: int = 1) -> dict:
    """Read, filter, deduplicate and split the files of `sources`; write stores + manifest.

    Files are visited in sorted (path, source) order, so which copy of a duplicated file
    is kept, and so the whole output, is deterministic. Returns the manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    used = [s for s in sources if s.excluded is None]
    counts = {s.name: SourceCounts() for s in used}
    jobs: list[tuple[str, str, str]] = []  # (relpath, source name, abspath)
    for src in used:
        for rel in src.files:
            if is_eval_path(rel):
                counts[src.name].dropped["evaluation-set path"] += 1
            else:
                jobs.append((rel, src.name, str(src.root / rel)))
    jobs.sort()

    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_read_file, [j[2] for j in jobs], chunksize=32)
    else:
        pool, results = None, map(_read_file, [j[2] for j in jobs])
    seen: set[str] = set()
    train: list[tuple[str, bytes]] = []
    val: list[tuple[str, bytes]] = []
    try:
        for (_, name, _), (status, sha, data) in zip(jobs, results, strict=True):
            c = counts[name]
            if status == "ok" and sha in seen:
                status = "duplicate"
            if status != "ok":
                c.dropped[status] += 1
                continue
            seen.add(sha)
            (val if is_val(sha) else train).append((sha, data))
            c.files_kept += 1
            c.bytes_kept += len(data)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if not val and len(train) > 1:  # a tiny corpus still gets one validation file
        val.append(train.pop(min(range(len(train)), key=lambda i: _val_rank(train[i][0]))))
    DocStore.write(out, "train", (data for _, data in train))
    DocStore.write(out, "val", (data for _, data in val))

    dropped = sum((c.dropped for c in counts.values()), Counter())
    manifest = {
        "description": "Python files the editkv default model was trained on, by source.",
        "totals": {
            "files_kept": len(train) + len(val),
            "bytes_kept": sum(len(d) for _, d in train) + sum(len(d) for _, d in val),
            "train_files": len(train),
            "val_files": len(val),
            "files_dropped": dict(sorted(dropped.items())),
            "filters": {
                "min_bytes": MIN_FILE_BYTES, "max_bytes": MAX_FILE_BYTES, "utf8_only": True,
                "dedup": "sha256 of file bytes", "val_fraction": VAL_PER_MILLE / 1000,
                "evaluation_projects_excluded": list(EVAL_PROJECTS),
            },
        },
        "distributions": [
            {
                "name": s.name, "version": s.version,
                "licence": s.licence.found, "verdict": s.licence.verdict,
                "files_kept": counts[s.name].files_kept,
                "bytes_kept": counts[s.name].bytes_kept,
                "files_dropped": dict(sorted(counts[s.name].dropped.items())),
            }
            for s in used
            if counts[s.name].files_kept
        ],
        "excluded": [
            {"name": s.name, "version": s.version, "reason": s.excluded,
             "licence": s.licence.found, "py_files": len(s.files)}
            for s in sources
            if s.excluded is not None and s.files
        ],
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def write_json(path: Path, obj: object) -> None:
    """Pretty UTF-8 JSON, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
