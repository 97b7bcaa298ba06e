"""`editkv calibrate --view`: which view, left-to-right or FIM, completes the user's code better.

Data flow: Python files from the user's workspace -> a seeded sample of files and of lines in
them (lines realedits would pick as targets) -> for each line, the file with that line's text
after its indentation deleted, opened in a `ModelBackend` exactly as the server would serve it
(its cache options, edit cache, speculation, suffix policy) -> one completion per view at the
cursor, greedy to the end of the line -> exact match and edit similarity against the deleted
text -> the better view, stored by engine.calibrate beside the model's AdaDec threshold. No
targets needed: every masked line is its own target. Each masked file is opened fresh, so no
cached key has seen the deleted text.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from editkv.edit_cache.positions import to_position
from editkv.engine.calibrate import (
    VIEWS,
    ViewCalibration,
    ViewScore,
    choose_view,
    eligible_lines,
    fingerprint,
    python_files,
    view_calibration_path,
)


def masked_lines(files: Sequence[Path], *, max_files: int, lines_per_file: int, seed: int,
                 max_chars: int) -> list[tuple[Path, str, int, str]]:
    """(file, text with the line's text deleted, cursor, the deleted text) for a seeded sample."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    out = []
    used = 0
    for path in files:
        if used >= max_files:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > max_chars:
            continue
        lines = eligible_lines(text)
        if not lines:
            continue
        used += 1
        for _, cursor, end in sorted(rng.sample(lines, min(lines_per_file, len(lines)))):
            out.append((path, text[:cursor] + text[end:], cursor, text[cursor:end]))
    return out


def _edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / longer length, on right-stripped texts."""
    a, b = a.rstrip(), b.rstrip()
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def measure_views(loaded, samples: Sequence[tuple[Path, str, int, str]], *, max_tokens: int = 48,
                  progress: Callable[[str], None] | None = None) -> dict[str, ViewScore]:
    """Complete every masked line in both views through a ModelBackend; the scores per view."""
    from editkv.lsp_server.backend import CompletionRequest, ModelBackend

    if loaded.tokenizer.fim is None:
        raise ValueError("this model has no FIM tokens: there is only the left-to-right view")
    backend = ModelBackend(loaded, background=False)
    totals = {view: [0.0, 0.0, 0] for view in VIEWS}
    started = time.perf_counter()
    for n, (path, text, cursor, expected) in enumerate(samples):
        uri = f"file://{path}#{n}"
        backend.open(uri, text)
        pos = to_position(text, cursor)
        for view in VIEWS:
            result = backend.complete(CompletionRequest(uri, pos.line, pos.character, max_tokens=max_tokens,
                                                        view=view))
            got = result.drafts[0].text if result.drafts else ""
            got = got.split("\n", 1)[0]
            totals[view][0] += float(got.rstrip() == expected.rstrip())
            totals[view][1] += _edit_similarity(got, expected)
            totals[view][2] += not got.strip()
        backend.close(uri)
        if progress is not None:
            progress(f"{n + 1}/{len(samples)} lines, " + ", ".join(
                f"{v} EM {100 * t[0] / (n + 1):.1f}%" for v, t in totals.items())
                + f", {time.perf_counter() - started:.0f}s")
    n = max(len(samples), 1)
    return {view: ViewScore(round(100 * em / n, 2), round(100 * es / n, 2), len(samples), round(100 * empty / n, 2))
            for view, (em, es, empty) in totals.items()}


def run(model_spec: str | None, data: Sequence[str | Path], *, out: Path | None = None, device: str = "cpu",
        dtype: str | None = None, max_files: int = 24, lines_per_file: int = 4, max_chars: int = 20_000,
        max_tokens: int = 48, seed: int = 0,
        progress: Callable[[str], None] | None = None) -> tuple[ViewCalibration, Path]:
    """`editkv calibrate --view`: measure both views on `data`, store the better one (returns where)."""
    from editkv.engine.calibrate import DEFAULT_MODEL_DIR, _is_default
    from editkv.engine.errors import EngineError
    from editkv.engine.loading import load_model

    files = python_files(data, max_bytes=4 * max_chars)
    samples = masked_lines(files, max_files=max_files, lines_per_file=lines_per_file, seed=seed, max_chars=max_chars)
    if not samples:
        raise EngineError(f"no maskable lines in Python files of at most {max_chars} characters under "
                          f"{', '.join(map(str, data))}")
    loaded = load_model(model_spec, device=device, dtype=dtype)
    if loaded.tokenizer.fim is None:
        raise EngineError(f"{loaded.source} has no FIM tokens: it can only serve the left-to-right view, "
                          "there is nothing to calibrate")
    scores = measure_views(loaded, samples, max_tokens=max_tokens, progress=progress)
    result = ViewCalibration(
        view=choose_view(scores), scores=scores,
        model="default" if _is_default(model_spec) else str(model_spec),
        fingerprint=fingerprint(model_spec or DEFAULT_MODEL_DIR),
        data={"paths": [str(p) for p in data], "files": len({s[0] for s in samples}), "lines": len(samples),
              "lines_per_file": lines_per_file, "max_chars": max_chars, "max_tokens": max_tokens, "seed": seed,
              "device": str(loaded.device)},
        created=time.strftime("%Y-%m-%d %H:%M:%S"))
    return result, result.save(out or view_calibration_path(model_spec))
