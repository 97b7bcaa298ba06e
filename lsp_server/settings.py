"""The server's settings: one validated dataclass, read from the client's JSON.

Settings arrive as `initializationOptions` and later through
`workspace/didChangeConfiguration` (section "editkv"). Keys may be camelCase (as VS Code
settings are) or snake_case. A value of the wrong type or out of range is reported and
replaced by the current (or default) value; an unknown key is reported and ignored. Nothing
here raises on bad client input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

SECTION = "editkv"
MULTILINE_POLICIES = ("auto", "never", "always")
CACHE_MODES = ("pie", "conflict", "prefix_reuse", "recompute")
VIEWS = ("auto", "fim", "l2r")
CPU_WEIGHTS = ("auto", "fp32", "int8", "int4")


@dataclass(frozen=True)
class Settings:
    """Everything a user can set. `model=None` means the command line's or the embedded model."""

    model: str | None = None
    device: str = "auto"  # cpu, cuda, cuda:N, auto
    dtype: str | None = None  # float32, bfloat16; None: fp32 on CPU, bf16 on CUDA
    # on the CPU: the projections' weights as the dtype's own ("fp32"), or weight-only quantized
    # ("int8", "int4": engine/quant.py); "auto": int8 for models larger than the embedded one
    # (engine.quant.choose_format). Ignored on CUDA.
    cpu_weights: str = "auto"
    max_tokens: int = 64
    multiline: str = "auto"  # "auto": several lines where a block starts; "never"; "always"
    max_lines: int = 8  # most lines of a multi-line suggestion
    # a multi-line suggestion ends at its first line end after this many ms from the request's start
    # (the first line is always whole); None: 20 on a GPU, 250 on the CPU; 0: no time limit
    multiline_ms: int | None = None
    num_drafts: int = 3  # suggestions on an explicit invocation and in the dropdown
    debounce_ms: int = 40  # while keystrokes come faster than this (a burst), wait this long after the last
    # KV cache memory of all documents together, in MB; 0 = no limit; None: KV_BUDGET_MB of the
    # device (1 GB on the CPU, 4 GB on a GPU, where the pool is also held to half the free memory)
    kv_budget_mb: int | None = None
    cache_mode: str = "pie"  # "recompute" re-reads the whole file for every request (baseline)
    view: str = "auto"  # "auto" (calibrated, else the model's own: engine.calibrate.auto_view), "fim", "l2r"
    max_file_kb: int = 1024  # larger files are kept in sync but never modelled
    stats_file: bool = True  # keep suggestion statistics in the user's cache folder
    speculation: bool = True  # one-draft requests: lossless n-gram speculation (off: plain greedy)
    # a keystroke that types the start of the ghost text shown last is answered with the rest of
    # it at once, without the model (what llama.vscode's client cache does); never with cache_mode
    # "recompute" (the baseline re-reads the file for every request)
    type_along: bool = True
    superposed: bool = True  # several drafts: superposed decoding (off: a greedy decode per draft)
    # several drafts by beam search instead of superposed decoding (k beams, one forward per step).
    # None: where the forwards replay CUDA graphs (the beams run as lanes of one graphed forward:
    # on the H100 1.28x greedy's time with twice superposed decoding's best-of-3 EM), not on the
    # CPU (1.29-1.37x, eager batch forwards); BENCHMARKS.md, multi-draft
    beam_search: bool | None = None
    # at load, before the server is ready: an editing session on made-up files captures every CUDA
    # graph a keystroke uses and compiles the kernels (lsp_server/warm_up.py; seconds on a GPU), so
    # no keystroke pays a first use. None: where forwards replay CUDA graphs; false: never
    warm_up: bool | None = None
    # more stale tokens than this and background refresh starts after a short quiet spell instead of
    # waiting for idle_refresh_ms; 0: only when idle. Requests never re-encode stale tokens beyond
    # refresh_near_cursor (the ones right before the cursor).
    stale_budget: int = 4096
    # None: the model's recommendation (edit_cache.document.TUNED)
    fim_fresh_suffix: int | None = None  # FIM views re-encode the suffix's first tokens after <SUF>
    # ... and keep them between requests while the text above the cursor's line and they stay the
    # same (they then never see the cursor's line); off: re-encoded after the line every request
    fim_suffix_cache: bool = False  # (opt-in until a larger realedits run shows no loss: BENCHMARKS.md)
    refresh_near_cursor: int | None = None  # views re-encode stale tokens among this many before the cursor
    # background work: after this long without work, re-encode stale tokens; files are encoded up to
    # the cursor first and the rest in the background. 0: off (every request encodes whole files)
    idle_refresh_ms: int = 1000
    # a file just opened, with more than twice this many tokens (plus a quarter) before the cursor not
    # encoded yet, is answered from a window of this many tokens before the cursor and a quarter of it
    # after until background work has encoded the file (lsp_server/backend.py WINDOW). None: 1024 on the
    # CPU, none on a GPU; 0: never
    window_tokens: int | None = None
    # other open documents (the ones the file imports first) in front of each view, their caches
    # reused (CacheBlend): off by default (BENCHMARKS.md, cross-file); budget in tokens; recompute:
    # percent of the reused tokens re-encoded with the context
    cross_file: bool = False
    cross_file_budget: int = 1024
    cross_file_recompute: int = 15
    adadec: bool = False  # entropy-gated lookahead reranking of one-draft requests; off: it did not
    # help on the benchmarks (BENCHMARKS.md, AdaDec), and needs a calibrated model (`editkv calibrate`)

    @property
    def model_key(self) -> tuple[str | None, str, str | None, str]:
        """What a backend is loaded for: changing any of these reloads it."""
        return (self.model, self.device, self.dtype, self.cpu_weights)

    @property
    def budget_bytes(self) -> int | str | None:
        """The KV budget in bytes, None for no limit, or AUTO: the device's (`kv_budget_bytes`)."""
        if self.kv_budget_mb is None:
            return AUTO
        return self.kv_budget_mb * 2**20 if self.kv_budget_mb else None


AUTO = "auto"
# the KV budget where the user set none, by device type: a GPU's memory holds many more open files
# than the CPU's share of RAM should (BENCHMARKS.md, the 50-document hop: ~2.5 GB of Qwen2.5-Coder-0.5B
# KV evicted and re-encoded under 1 GB)
KV_BUDGET_MB = {"cpu": 1024, "cuda": 4096}


def kv_budget_bytes(budget: int | str | None, device_type: str) -> int | None:
    """`Settings.budget_bytes` for a model on `device_type`: AUTO becomes that device's default."""
    if budget == AUTO:
        return KV_BUDGET_MB.get(device_type, KV_BUDGET_MB["cpu"]) * 2**20
    return budget


_INT_RANGES = {
    "max_tokens": (1, 1024),
    "max_lines": (1, 200),
    "multiline_ms": (0, 600_000),
    "num_drafts": (1, 8),
    "debounce_ms": (0, 5000),
    "kv_budget_mb": (0, 1 << 20),
    "max_file_kb": (1, 1 << 20),
    "stale_budget": (0, 1 << 24),
    "idle_refresh_ms": (0, 3_600_000),
    "window_tokens": (0, 1 << 16),
    "fim_fresh_suffix": (0, 4096),
    "refresh_near_cursor": (0, 1 << 20),
    "cross_file_budget": (0, 16384),
    "cross_file_recompute": (0, 100),
}
_CHOICES = {"multiline": MULTILINE_POLICIES, "cache_mode": CACHE_MODES, "view": VIEWS,
            "dtype": ("float32", "bfloat16", "float16"), "cpu_weights": CPU_WEIGHTS}
_MODEL_TUNED = ("fim_fresh_suffix", "refresh_near_cursor")  # None: the model's value
_BOOLS = ("stats_file", "type_along", "speculation", "superposed", "beam_search", "warm_up", "adadec",
          "fim_suffix_cache", "cross_file")
_FIELDS = {f.name for f in fields(Settings)}


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def section_of(raw: Any) -> Any:
    """The "editkv" part of a settings object, whether or not it is nested under "editkv"."""
    if isinstance(raw, dict) and isinstance(raw.get(SECTION), dict):
        return raw[SECTION]
    return raw


def parse_settings(raw: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Apply the client's `raw` settings on top of `base`; returns (settings, problems).

    Each problem is one sentence naming the setting, what was wrong and what is used instead.
    """
    base = base or Settings()
    raw = section_of(raw)
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"{SECTION} settings must be an object, not {type(raw).__name__}; keeping the current ones"]
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        name = _snake(str(key))
        if name not in _FIELDS:
            problems.append(f"{SECTION}.{key} is not a setting (known: "
                            f"{', '.join(_camel(n) for n in sorted(_FIELDS))}); ignored")
            continue
        current = getattr(base, name)
        ok, parsed, why = _validate(name, value)
        if ok:
            changes[name] = parsed
        else:
            problems.append(f"{SECTION}.{_camel(name)}: {why}, got {value!r}; using {current!r}")
    return replace(base, **changes), problems


def _validate(name: str, value: Any) -> tuple[bool, Any, str]:
    if name in ("model", "dtype") and (value is None or value == ""):
        return True, None, ""
    if (name in _MODEL_TUNED or name in ("multiline_ms", "beam_search", "window_tokens", "kv_budget_mb")) \
            and value is None:
        return True, None, ""  # back to the model's (the device's) recommendation
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            return False, None, f"expected a whole number from {lo} to {hi}"
        if not lo <= value <= hi:
            return False, None, f"expected a whole number from {lo} to {hi}"
        return True, int(value), ""
    if name in _BOOLS:
        if not isinstance(value, bool):
            return False, None, "expected true or false"
        return True, value, ""
    if not isinstance(value, str):
        return False, None, "expected a string"
    if name in _CHOICES and value not in _CHOICES[name]:
        return False, None, f"expected one of {', '.join(_CHOICES[name])}"
    if name == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return False, None, "expected auto, cpu, cuda or cuda:N"
    return True, value, ""


@dataclass(frozen=True)
class CrossFileOptions:
    """Other open documents' caches in front of a request's view (lsp_server/context.py): settings
    `crossFile` (off by default: the default model gains nothing from other files, and with
    Qwen2.5-Coder-0.5B it helped left to right but cost FIM 1.7-2.5 EM; BENCHMARKS.md, cross-file),
    `crossFileBudget` (tokens of other files), `crossFileRecompute` (percent of them CacheBlend
    recomputes)."""

    on: bool = False
    budget: int = 1024
    recompute: int = 15
    max_files: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> CrossFileOptions:
        return cls(settings.cross_file, settings.cross_file_budget, settings.cross_file_recompute)
