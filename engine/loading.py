"""Load a model + tokenizer from a local folder, a Hugging Face hub id, or a GGUF file.

folder: config.json, tokenizer.json, and model.safetensors or sharded safetensors with an
index. hub id: the same files fetched with huggingface_hub (only when the hub is reachable).
GGUF: transformers' GGUF reader dequantizes weights, config and tokenizer; we keep its state
dict and tokenizer backend, never its model. That takes ~40 s for a 0.5B model on a small CPU,
so the result is kept in the user's cache (`gguf_cache_dir()`: `editkv/gguf/<sha256 of the
GGUF>/`, fp32 safetensors + config.json + tokenizer.json + a manifest) and later loads read it
like a model folder. An entry is written into a temporary folder and renamed into place, so a
killed process leaves no half entry; one that fails its checks is rebuilt from the GGUF.
`trust_remote_code` is never passed. Every failure a user can cause becomes an EngineError with
a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from editkv.engine.config import ModelConfig
from editkv.engine.errors import EngineError
from editkv.engine.model import Transformer
from editkv.engine.quant import choose_format, quantize_model
from editkv.engine.rope import Rotary
from editkv.engine.runner import ModelRunner
from editkv.engine.tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
EDITKV_JSON = "editkv.json"  # optional per-model settings of ours beside the weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_CACHE_FORMAT = "editkv-gguf/1"
GGUF_MANIFEST = "editkv-gguf.json"  # written last into an entry: its presence and checks say it is whole
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What `load_model` returns: the network in its runner (`runner.model`: the Transformer), its
    tokenizer and config, and where it came from."""

    runner: ModelRunner
    tokenizer: Tokenizer
    config: ModelConfig
    source: str
    load_seconds: float
    preferred_view: str = "l2r"  # the model's own view: "fim" or "l2r" (engine.calibrate.auto_view may override)
    cache: dict[str, int] = field(default_factory=dict)  # editkv.json "cache": edit-cache options tuned for it
    # GGUF files: "hit" (read from the conversion cache), "stored" (converted and cached),
    # "converted" (converted, not cached: off or unwritable); "" for other sources
    gguf_cache: str = ""
    preferred_view_reason: str = ""  # why `preferred_view`, in words
    weights: str = "fp32"  # the projections' format: "fp32" (the dtype's own), "int8" or "int4" (engine/quant.py)

    @property
    def device(self) -> torch.device:
        return self.runner.device


def resolve_device(device: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or None for the best available; EngineError if it isn't here."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(
                f"device {device!r} is not available: torch sees no CUDA GPU here; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineError(
                f"device {device!r} is not available: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise EngineError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def resolve_model(spec: str | None) -> str:
    """The model to load: `spec`, or the embedded default model's folder (EngineError if it is missing)."""
    if spec:
        return spec
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return str(DEFAULT_MODEL_DIR)
    raise EngineError(f"no --model given and the embedded default model is missing at {DEFAULT_MODEL_DIR}")


def load_model(
    spec: str | Path | None = None,
    *,
    device: str | None = "cpu",
    dtype: torch.dtype | str | None = None,
    gguf_cache: bool | None = None,
    cpu_weights: str | None = None,
) -> LoadedModel:
    """Load `spec` (folder, `.gguf` file, or hub id; None = the embedded default model).

    `gguf_cache`: read and write a GGUF's converted weights in the user's cache (None: yes,
    unless the environment sets EDITKV_GGUF_CACHE=0). `cpu_weights`: on the CPU, "fp32" (the
    dtype's own weights), "int8" or "int4" (weight-only quantized projections, engine/quant.py),
    or "auto"/None (`quant.choose_format`); $EDITKV_CPU_WEIGHTS overrides it. Ignored on CUDA.
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    dtype = _resolve_dtype(dtype, dev)
    spec = str(spec) if spec is not None else str(DEFAULT_MODEL_DIR)
    path = Path(spec).expanduser()
    how = ""
    if path.is_file() and path.suffix == ".gguf":
        if gguf_cache is None:
            gguf_cache = os.environ.get("EDITKV_GGUF_CACHE", "1").lower() not in ("0", "off", "no", "false")
        config, state, tokenizer, how = _read_gguf_cached(path) if gguf_cache else (*_read_gguf(path)[:3], "converted")
    elif path.is_dir():
        config, state, tokenizer = _read_folder(path)
    elif path.exists():
        raise EngineError(f"{spec} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
    elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        config, state, tokenizer = _read_folder(_fetch_from_hub(spec))
    else:
        raise EngineError(f"model path {spec} does not exist (nor is it a hub id like owner/name)")
    model = _build(config, state, dev, dtype, source=spec)
    del state  # the fp32 copies the quantized linears replace are then freed
    weights = choose_format(cpu_weights, dev, num_params=sum(p.numel() for p in model.parameters()))
    if dtype not in (torch.float32, torch.bfloat16):
        weights = "fp32"  # torch's weight-only kernels take fp32 or bf16 activations
    quantize_model(model, weights)
    runner = _runner(model)
    view = "fim" if tokenizer.fim is not None else "l2r"
    reason = "the model has FIM tokens" if view == "fim" else "the model has no FIM tokens"
    cache: dict[str, int] = {}
    if path.is_dir() and (path / EDITKV_JSON).is_file():
        # A model folder may say which view is worth using and how its FIM prompt ends
        # (see engine/default_model/MODEL_CARD.md).
        settings = _read_json(path / EDITKV_JSON)
        if "preferred_view" in settings:
            view, reason = settings["preferred_view"], f"preferred_view in the model's {EDITKV_JSON}"
        if view not in ("fim", "l2r") or (view == "fim" and tokenizer.fim is None):
            raise EngineError(f"{path / EDITKV_JSON}: preferred_view must be 'l2r' or (with FIM tokens) 'fim'")
        tail = settings.get("fim_tail_tokens", 0)
        if not isinstance(tail, int) or isinstance(tail, bool) or not 0 <= tail <= 512:
            raise EngineError(f"{path / EDITKV_JSON}: fim_tail_tokens must be an integer in [0, 512]")
        if tail and tokenizer.fim is not None:
            tokenizer.fim = replace(tokenizer.fim, tail=tail)
        cache = settings.get("cache", {})
        if not isinstance(cache, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 20 for v in cache.values()):
            raise EngineError(f"{path / EDITKV_JSON}: cache must map option names to whole numbers >= 0")
    return LoadedModel(runner, tokenizer, config, spec, time.perf_counter() - started, view, cache, how, reason,
                       weights)


def model_from_weights(
    hf_config: dict, state: dict[str, torch.Tensor], *, device: str | None = "cpu",
    dtype: torch.dtype | str | None = None, source: str = "weights in memory",
) -> ModelRunner:
    """Our model (in its runner) over HF-named weights already in memory (tensors on the target
    device and dtype are shared, not copied): benches run it beside a transformers model of the
    same weights."""
    dev = resolve_device(device)
    return _runner(_build(ModelConfig.from_hf(hf_config), state, dev, _resolve_dtype(dtype, dev), source=source))


def _runner(model: Transformer) -> ModelRunner:
    """`model`'s runner: its weights fused once, here (`Transformer.fused`); on CUDA small batch-1
    forwards replay as CUDA graphs."""
    model.fused()
    runner = ModelRunner(model)
    if model.device.type == "cuda":
        runner.enable_graphs()
    return runner


def _resolve_dtype(dtype: torch.dtype | str | None, dev: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise EngineError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    return names[dtype]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineError(f"{path.parent} has no {path.name}; is it a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path} is not valid JSON ({err}); the file is corrupt") from None


def _read_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    config = ModelConfig.from_hf(_read_json(folder / "config.json"))
    state = _read_safetensors(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise EngineError(f"{folder} has no tokenizer.json; editkv needs a fast tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file), config.eos_token_ids)
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise EngineError(f"{tokenizer_file} could not be read ({err}); the file is corrupt") from None
    return config, state, tokenizer


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{folder} has no .safetensors weights (editkv does not read .bin pickles)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise EngineError(f"weights shard {file.name} listed in the index is missing from {folder}")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise EngineError(f"weights file {file} is corrupt or truncated ({err})") from None
    return state


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """Dequantize a GGUF through transformers: (config, fp32 state dict, tokenizer, HF config dict)."""
    try:
        import gguf  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise EngineError(
            "reading GGUF needs the packages gguf and accelerate: pip install 'editkv[gguf]'"
        ) from None
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        config = ModelConfig.from_hf(hf_config)
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except EngineError:
        raise
    except Exception as err:
        raise EngineError(f"could not read GGUF file {path}: {err}") from None
    eos = config.eos_token_ids or ((hf_tok.eos_token_id,) if hf_tok.eos_token_id is not None else ())
    tokenizer = Tokenizer(hf_tok.backend_tokenizer, tuple(eos))
    state = {k: v for k, v in hf_model.state_dict().items()}
    return config, state, tokenizer, hf_config


# --- the GGUF conversion cache ---------------------------------------------------------------

def user_cache_dir() -> Path:
    """editkv's folder in the user's cache: $XDG_CACHE_HOME/editkv, else ~/.cache/editkv."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editkv"


def gguf_cache_dir() -> Path:
    """Where converted GGUF files live, one folder per GGUF sha256."""
    return user_cache_dir() / "gguf"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime, inode) in the cache folder so
    that a second start does not hash a multi-GB file again."""
    path = path.resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = gguf_cache_dir() / "sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if {k: known.get(k) for k in stamp} == stamp and re.fullmatch(r"[0-9a-f]{64}", known.get("sha256", "")):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    sha = digest.hexdigest()
    try:
        _write_atomically(memo, json.dumps({**stamp, "sha256": sha}))
    except OSError:
        pass  # an unwritable cache only costs the next start a hash
    return sha


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _digest_ends(path: Path) -> str:
    """A cheap content check of a cache file: sha256 of its first and last MiB and its size."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _read_gguf_cached(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str]:
    """`_read_gguf` through the conversion cache: (config, state, tokenizer, "hit" | "stored" | "converted")."""
    try:
        sha = file_sha256(path)
    except OSError as err:
        raise EngineError(f"could not read GGUF file {path}: {err}") from None
    entry = gguf_cache_dir() / sha
    if (entry / GGUF_MANIFEST).is_file():
        try:
            return (*_read_gguf_entry(entry, sha), "hit")
        except Exception as err:  # whatever is wrong with a cache entry, the GGUF can make it again
            log.warning("the converted copy of %s in %s is broken (%s); converting the GGUF again", path, entry, err)
    config, state, tokenizer, hf_config = _read_gguf(path)
    try:
        _store_gguf_entry(entry, sha, path, hf_config, config, state, tokenizer)
    except OSError as err:  # a full disk or a read-only home: serve anyway, convert again next time
        log.warning("could not cache the converted %s in %s (%s); the next start converts it again",
                    path, entry.parent, err)
        return config, state, tokenizer, "converted"
    return config, state, tokenizer, "stored"


def _check_entry(entry: Path, sha: str) -> dict:
    """The manifest of a whole cache entry of the GGUF `sha`; EngineError when a check fails:
    the manifest's format and GGUF hash, and each file's size and first and last MiB."""
    manifest = _read_json(entry / GGUF_MANIFEST)
    if manifest.get("format") != GGUF_CACHE_FORMAT or manifest.get("gguf_sha256") != sha:
        raise EngineError(f"{entry / GGUF_MANIFEST} is not a {GGUF_CACHE_FORMAT} manifest of this GGUF")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {"config.json", "tokenizer.json", "model.safetensors"}:
        raise EngineError(f"{entry / GGUF_MANIFEST} does not list the entry's files")
    for name, want in files.items():
        file = entry / name
        if not file.is_file() or file.stat().st_size != want.get("size") or _digest_ends(file) != want.get("ends"):
            raise EngineError(f"{file} is missing, truncated or changed")
    return manifest


def _read_gguf_entry(entry: Path, sha: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """A cache entry as (config, state, tokenizer); EngineError when any check fails."""
    manifest = _check_entry(entry, sha)
    config = ModelConfig.from_hf(_read_json(entry / "config.json"))
    state = _read_safetensors(entry)
    if len(state) != manifest.get("num_tensors"):
        raise EngineError(f"{entry} holds {len(state)} tensors, its manifest says {manifest.get('num_tensors')}")
    try:
        tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"), tuple(manifest.get("eos_ids", ())))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise EngineError(f"{entry / 'tokenizer.json'} could not be read ({err})") from None
    return config, state, tokenizer


def _store_gguf_entry(entry: Path, sha: str, source: Path, hf_config: dict, config: ModelConfig,
                      state: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """Write a cache entry into a temporary folder and rename it into place (atomic: a killed
    process leaves a `.tmp-*` folder, swept later, never a half entry)."""
    from safetensors.torch import save_file

    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(root)
    tmp = root / f".tmp-{sha[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str), encoding="utf-8")
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        # tied embeddings share one tensor: safetensors stores it once, `_build` ties them again
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
                   if not (config.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("inv_freq")}
        save_file(tensors, str(tmp / "model.safetensors"))
        files = {name: {"size": (tmp / name).stat().st_size, "ends": _digest_ends(tmp / name)}
                 for name in ("config.json", "tokenizer.json", "model.safetensors")}
        manifest = {"format": GGUF_CACHE_FORMAT, "gguf_sha256": sha, "gguf_name": source.name,
                    "gguf_size": source.stat().st_size, "eos_ids": list(tokenizer.eos_ids),
                    "num_tensors": len(tensors), "files": files, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        for name in files:
            _fsync(tmp / name)
        (tmp / GGUF_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync(tmp / GGUF_MANIFEST)
        if entry.exists():
            try:
                _check_entry(entry, sha)
                return  # another process stored it meanwhile: keep theirs (someone may be reading it)
            except EngineError:  # the broken entry this load found: out of the way
                trash = root / f".tmp-trash-{uuid.uuid4().hex[:8]}"
                os.replace(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _sweep_temporaries(root: Path, older_than_s: float = 3600.0) -> None:
    """Remove temporary folders of writers that were killed (old enough not to be a live one)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["config.json", "tokenizer.json", "*.safetensors",
                                "model.safetensors.index.json", "generation_config.json"],
                etag_timeout=10,
            )
        )
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EngineError(
            f"could not fetch {repo_id} from the Hugging Face hub ({reason}); "
            "the hub may be unreachable: pass a local model folder or a .gguf file"
        ) from None


def _our_names(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF weight names -> our module names; Phi-3's fused projections are split."""
    c = config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = name.removeprefix("model.")
        if key.endswith("self_attn.qkv_proj.weight"):
            q, k, v = tensor.split(
                [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
            )
            base = key.removesuffix("qkv_proj.weight")
            out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = q, k, v
        elif key.endswith("mlp.gate_up_proj.weight"):
            gate, up = tensor.chunk(2, dim=0)
            base = key.removesuffix("gate_up_proj.weight")
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate, up
        else:
            out[key] = tensor
    if c.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _build(
    config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
    *, source: str,
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    ours = _our_names(config, state)
    missing = sorted(set(expected) - set(ours))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EngineError(
            f"{source}: weights are missing {shown}; the checkpoint is incomplete or not this architecture"
        )
    for key, shape in expected.items():
        if tuple(ours[key].shape) != tuple(shape):
            raise EngineError(
                f"{source}: weight {key} has shape {tuple(ours[key].shape)} but config.json implies "
                f"{tuple(shape)}; the config and weights don't belong together"
            )
    tensors = {k: ours[k].to(device=device, dtype=dtype) for k in expected}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(config, device)
    return model.eval()
