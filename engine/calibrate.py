"""AdaDec calibration: the entropy threshold tau above which a model's greedy token is likely wrong.

Data flow: reference Python files -> teacher-forced forwards (chunked, no sampling) -> one
`(entropy, top1)` pair per predicted position -> class-balanced one-feature logistic regression
fitted on the training files -> the probability cutoff with the best accuracy on held-out
files -> `tau`, the entropy at which the fitted P(top-1 correct) equals that cutoff (the gate
fires at H >= tau). The result is a small JSON (`Calibration`): next to the weights for the
embedded default model (`engine/default_model/adadec.json`, shipped), in the user's cache
(`~/.cache/editkv/adadec/<fingerprint>.json`) for every other model.

This module knows nothing about decoding; engine/decoding/adadec.py reads what it writes.
Entropy is in nats over the full vocabulary, from raw logits (no temperature, no masking).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from editkv.engine.errors import EngineError
from editkv.engine.model import Span
from editkv.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # annotations only
    from editkv.engine.runner import ModelRunner

FORMAT = "editkv-adadec/1"
FILE_NAME = "adadec.json"  # next to a model folder's weights
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


# --- statistics -------------------------------------------------------------------------

def entropy(logits: torch.Tensor) -> torch.Tensor:  # [..., V] -> [...] fp32, nats
    """Shannon entropy of softmax(logits); masked (-inf) entries count as probability 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


@dataclass
class Observations:
    """Per predicted position: entropy (nats) and whether the true token was ranked first."""

    entropy: np.ndarray  # [N] float64
    top1: np.ndarray  # [N] bool
    group: np.ndarray  # [N] int: the file each position came from (held-out split is by file)


def teacher_force(
    model: ModelRunner,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    *,
    head: Sequence[int] = (),
    max_file_tokens: int = 1024,
    max_tokens: int = 100_000,
    chunk: int = 256,
) -> Observations:
    """Run the model over each text (first `max_file_tokens` tokens) and record every position.

    `head` precedes each file (the model's document-start ids) and is never predicted. Stops
    after `max_tokens` predicted positions in all.
    """
    entropies: list[np.ndarray] = []
    top1: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    total = 0
    for index, text in enumerate(texts):
        ids = list(head) + tokenizer.encode(text)[:max_file_tokens]
        if len(ids) < len(head) + 2:
            continue
        cache = model.new_cache(len(ids))
        tensor = torch.tensor(ids, device=model.device)[None]
        first = max(len(head) - 1, 0)  # logits at position i predict ids[i + 1]
        for lo in range(0, len(ids) - 1, chunk):
            hi = min(len(ids) - 1, lo + chunk)
            context = [Span(cache, 0, lo)] if lo else []
            logits = model(tensor[:, lo:hi], torch.arange(lo, hi, device=model.device), write=cache,
                           write_at=lo, context=context, logits="all")[0]  # [T, V]
            keep = slice(max(first - lo, 0), hi - lo)
            logits = logits[keep]
            target = tensor[0, lo + 1 : hi + 1][keep]
            entropies.append(entropy(logits).double().cpu().numpy())
            top1.append((logits.argmax(-1) == target).cpu().numpy())
            groups.append(np.full(len(target), index))
        total += len(ids) - 1 - first
        if total >= max_tokens:
            break
    if not entropies:
        raise EngineError("no calibration positions: the reference files were empty or too short")
    return Observations(np.concatenate(entropies)[:max_tokens], np.concatenate(top1)[:max_tokens],
                        np.concatenate(groups)[:max_tokens])


@dataclass(frozen=True)
class LogisticFit:
    """P(top1 | H) = sigmoid(bias + weight * H), fitted with class-balanced weights."""

    weight: float
    bias: float

    def prob(self, h: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.bias + self.weight * h, -30, 30)))

    def entropy_at(self, p: float) -> float:
        """The entropy where the fitted probability equals `p`."""
        return (math.log(p / (1 - p)) - self.bias) / self.weight


def fit_logistic(h: np.ndarray, y: np.ndarray, *, iterations: int = 50) -> LogisticFit:
    """Class-balanced logistic regression of `y` (bool) on `h` by Newton's method.

    Each class gets total weight 1/2 (as scikit-learn's class_weight="balanced", normalised),
    so the fit is not pulled towards the majority class. `h` is standardised for conditioning.
    """
    h = np.asarray(h, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    num_pos = y.sum()
    if num_pos == 0 or num_pos == len(y):
        raise EngineError("calibration data has only one class (every top-1 right or every one wrong)")
    w = np.where(y > 0, 0.5 / num_pos, 0.5 / (len(y) - num_pos))
    mean, std = h.mean(), h.std() or 1.0
    x = np.stack([np.ones_like(h), (h - mean) / std], axis=1)  # [N, 2]
    beta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -30, 30)))
        grad = x.T @ (w * (y - p)) - 1e-6 * beta  # a whisper of L2 keeps separable data finite
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    weight = beta[1] / std
    return LogisticFit(float(weight), float(beta[0] - weight * mean))


@dataclass(frozen=True)
class Threshold:
    """The chosen cutoff and how well `H >= tau` separates wrong from right top-1 tokens."""

    tau: float
    cutoff: float  # fitted P(top1) at tau
    heldout_accuracy: float
    heldout_balanced_accuracy: float


def choose_threshold(fit: LogisticFit, h: np.ndarray, y: np.ndarray) -> Threshold:
    """The probability cutoff (grid 0.005..0.995) with the best held-out accuracy, as an entropy.

    "Correct" is predicted where P(top1 | H) >= cutoff, i.e. H < tau. Ties go to the cutoff
    nearest 0.5.
    """
    if fit.weight >= 0:
        raise EngineError(f"entropy does not predict top-1 errors on this data (slope {fit.weight:+.3f} >= 0); "
                          "calibrate on more (or more typical) reference code")
    y = np.asarray(y, dtype=bool)
    p = fit.prob(np.asarray(h, dtype=np.float64))
    best = None
    for cutoff in np.round(np.arange(0.005, 0.9951, 0.005), 3):
        pred = p >= cutoff
        acc = float((pred == y).mean())
        key = (acc, -abs(cutoff - 0.5))
        if best is None or key > best[0]:
            best = (key, float(cutoff))
    cutoff = best[1]
    tau = fit.entropy_at(cutoff)
    pred = h < tau
    tpr = float(pred[y].mean()) if y.any() else 0.0
    tnr = float((~pred[~y]).mean()) if (~y).any() else 0.0
    return Threshold(tau, cutoff, float((pred == y).mean()), (tpr + tnr) / 2)


# --- what is stored -----------------------------------------------------------------------

@dataclass
class Calibration:
    """A model's AdaDec threshold, how it was fitted, and on what."""

    tau: float
    model: str = ""
    fingerprint: str = ""
    fit: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EngineError(f"cannot read AdaDec calibration {path} ({err}); run `editkv calibrate` again") from None
        if raw.get("format") != FORMAT or not isinstance(raw.get("tau"), int | float):
            raise EngineError(f"{path} is not an editkv AdaDec calibration ({FORMAT}); run `editkv calibrate` again")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


def cache_dir() -> Path:
    """Where calibrations of models other than the embedded one live."""
    from editkv.engine.loading import user_cache_dir

    return user_cache_dir() / "adadec"


def fingerprint(spec: str | Path) -> str:
    """A short content hash of a model (size + first and last MiB of each weight file and config.json).

    Cheap on a 0.5 GB GGUF, and stable when the model is copied or moved.
    """
    path = Path(spec).expanduser()
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf") or p.name == "config.json")
    elif path.is_file():
        files = [path]
    else:  # a hub id: the name is all we have without fetching
        digest.update(str(spec).encode())
        return digest.hexdigest()[:16]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _is_default(spec: str | Path | None) -> bool:
    return spec is None or Path(spec).expanduser().resolve() == DEFAULT_MODEL_DIR


def calibration_path(spec: str | Path | None) -> Path:
    """Where the calibration of `spec` is stored (None = the embedded default model)."""
    if _is_default(spec):
        return DEFAULT_MODEL_DIR / FILE_NAME
    return cache_dir() / f"{fingerprint(spec)}.json"


def load_calibration(spec: str | Path | None) -> Calibration:
    """The stored calibration of a model; an EngineError saying how to make one if there is none."""
    path = calibration_path(spec)
    if not path.is_file():
        name = "the default model" if _is_default(spec) else str(spec)
        raise EngineError(f"{name} has no AdaDec calibration (looked for {path}); run "
                          f"`editkv calibrate --model {spec or 'DEFAULT'} --data DIR_OF_PYTHON_FILES` first")
    return Calibration.load(path)


# --- the whole procedure ------------------------------------------------------------------

def python_files(paths: Sequence[str | Path], *, min_bytes: int = 1000, max_bytes: int = 100_000) -> list[Path]:
    """`.py` files under `paths` (files or folders, recursively), sorted, sizes within bounds."""
    out: set[Path] = set()
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_file():
            out.add(path)
        elif path.is_dir():
            out.update(p for p in path.rglob("*.py") if p.is_file() and min_bytes <= p.stat().st_size <= max_bytes)
        else:
            raise EngineError(f"calibration data {path} does not exist; pass folders or files of Python code")
    if not out:
        raise EngineError(f"no Python files of {min_bytes}-{max_bytes} bytes under {', '.join(map(str, paths))}")
    return sorted(out)


def calibrate(
    model: ModelRunner,
    tokenizer: Tokenizer,
    files: Sequence[Path],
    *,
    head: Sequence[int] = (),
    max_files: int = 200,
    max_file_tokens: int = 1024,
    max_tokens: int = 100_000,
    heldout_every: int = 5,
    seed: int = 0,
) -> Calibration:
    """Teacher-force on a seeded sample of `files`, fit on 4/5 of them, choose tau on the rest."""
    started = time.perf_counter()
    files = list(files)
    random.Random(seed).shuffle(files)
    files = files[:max_files]
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    obs = teacher_force(model, tokenizer, texts, head=head, max_file_tokens=max_file_tokens, max_tokens=max_tokens)
    heldout = obs.group % heldout_every == heldout_every - 1
    train = ~heldout
    if not heldout.any() or not train.any():
        raise EngineError("too few calibration files for a held-out split; pass more reference code")
    fit = fit_logistic(obs.entropy[train], obs.top1[train])
    threshold = choose_threshold(fit, obs.entropy[heldout], obs.top1[heldout])
    return Calibration(
        tau=round(threshold.tau, 4),
        fit={"weight": fit.weight, "bias": fit.bias, "cutoff": threshold.cutoff,
             "tau_at_p_0_5": fit.entropy_at(0.5),
             "heldout_accuracy": threshold.heldout_accuracy,
             "heldout_balanced_accuracy": threshold.heldout_balanced_accuracy,
             "train_positions": int(train.sum()), "heldout_positions": int(heldout.sum()),
             "top1_rate": float(obs.top1.mean()), "mean_entropy": float(obs.entropy.mean()),
             "gate_rate_at_tau": float((obs.entropy >= threshold.tau).mean()),
             "seconds": round(time.perf_counter() - started, 1)},
        data={"files": int(len(set(obs.group.tolist()))), "positions": int(len(obs.entropy)),
              "max_file_tokens": max_file_tokens, "seed": seed, "heldout": f"every {heldout_every}th file"},
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def run(model_spec: str | None, data: Sequence[str | Path], *, out: Path | None = None, device: str = "cpu",
        dtype: str | None = None, max_files: int = 200, max_file_tokens: int = 1024, max_tokens: int = 100_000,
        seed: int = 0) -> tuple[Calibration, Path]:
    """`editkv calibrate`: load the model, calibrate it on `data`, store the result (returns where)."""
    from editkv.engine.loading import load_model
    from editkv.engine.prompting import doc_start_ids

    files = python_files(data)
    loaded = load_model(model_spec, device=device, dtype=dtype)
    with torch.inference_mode():
        result = calibrate(loaded.runner, loaded.tokenizer, files,
                           head=doc_start_ids(loaded.tokenizer, loaded.config), max_files=max_files,
                           max_file_tokens=max_file_tokens, max_tokens=max_tokens, seed=seed)
    result.model = "default" if _is_default(model_spec) else str(model_spec)
    result.fingerprint = fingerprint(model_spec or DEFAULT_MODEL_DIR)
    result.data["paths"] = [str(p) for p in data]
    path = result.save(out or calibration_path(model_spec))
    return result, path


# --- which view `view: auto` serves -----------------------------------------------------
#
# `editkv calibrate --view` (lsp_server/calibrate_view.py) masks lines of the user's own files,
# completes each in both views as the server would, and stores the better view here, keyed by
# the same model fingerprint as the AdaDec threshold (`~/.cache/editkv/view/<fingerprint>.json`,
# beside `adadec/<fingerprint>.json`). `auto_view` is what "auto" means for a loaded model.

VIEW_FORMAT = "editkv-view/1"
VIEWS = ("l2r", "fim")


@dataclass
class ViewScore:
    """How one view did on the masked lines: exact matches and mean edit similarity, in percent."""

    em: float
    es: float
    n: int
    empty: float = 0.0  # percent of completions that were empty (the model ended the line at once)


@dataclass
class ViewCalibration:
    """The view that measured better for a model on the user's code, and the measurements."""

    view: str
    scores: dict[str, ViewScore]
    model: str = ""
    fingerprint: str = ""
    data: dict = field(default_factory=dict)
    created: str = ""
    format: str = VIEW_FORMAT

    def reason(self) -> str:
        """One line for the user: why this view."""
        parts = ", ".join(f"{v} EM {s.em:.1f}% ES {s.es:.1f}" for v, s in sorted(self.scores.items()))
        n = max((s.n for s in self.scores.values()), default=0)
        return f"calibrated on {n} masked lines of your code ({parts}; {self.created})"

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> ViewCalibration:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            if raw.get("format") != VIEW_FORMAT or raw.get("view") not in VIEWS:
                raise ValueError(f"not an editkv view calibration ({VIEW_FORMAT})")
            scores = {k: ViewScore(**v) for k, v in raw["scores"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise EngineError(f"cannot read view calibration {path} ({err}); run `editkv calibrate --view` "
                              "again") from None
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and k != "scores"}
        return cls(scores=scores, **known)


def choose_view(scores: dict[str, ViewScore]) -> str:
    """The view with more exact matches; equal exact matches: the higher edit similarity; a tie: FIM
    (it reads the text after the cursor, which the measurement cannot credit on one line)."""
    return max(VIEWS, key=lambda v: (scores[v].em, scores[v].es, v == "fim")) if set(VIEWS) <= set(scores) \
        else next(iter(scores))


def view_calibration_path(spec: str | Path | None) -> Path:
    """Where `editkv calibrate --view` stores its choice for `spec` (None = the embedded model):
    always the user's cache, the embedded model's included (its folder may not be writable)."""
    from editkv.engine.loading import user_cache_dir

    return user_cache_dir() / "view" / f"{fingerprint(spec or DEFAULT_MODEL_DIR)}.json"


def load_view_calibration(spec: str | Path | None) -> ViewCalibration | None:
    """The stored view choice of a model, None when there is none; EngineError when it is unreadable."""
    path = view_calibration_path(spec)
    return ViewCalibration.load(path) if path.is_file() else None


def auto_view(loaded) -> tuple[str, str]:  # noqa: ANN001 - an engine.loading.LoadedModel
    """What `view: auto` serves for a loaded model, and why: the view `editkv calibrate --view`
    measured better on the user's code, else the model's own preference (its editkv.json, else
    FIM when it has FIM tokens)."""
    has_fim = loaded.tokenizer.fim is not None
    try:
        calibrated = load_view_calibration(loaded.source)
    except EngineError as err:
        calibrated = None
        problem = f" (the stored one is unreadable: {err})"
    else:
        problem = ""
    if calibrated is not None and (calibrated.view == "l2r" or has_fim):
        return calibrated.view, calibrated.reason()
    hint = f"; `editkv calibrate --view` measures which view is better{problem}" if has_fim else problem
    return loaded.preferred_view, loaded.preferred_view_reason + hint


def eligible_lines(text: str) -> list[tuple[int, int, int]]:
    """Lines worth masking, as realedits picks targets: (line start, cursor after the indentation,
    end of the line's text) of lines with at least 6 characters after the indentation that are
    not comments."""
    out = []
    start = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n").rstrip()
        indent = len(body) - len(body.lstrip(" \t\f"))
        rest = body[indent:]
        if len(rest) >= 6 and not rest.startswith("#"):
            out.append((start, start + indent, start + len(body)))
        start += len(line)
    return out
