"""Load a model + tokenizer from a local folder, a Hugging Face hub id, or a GGUF file.

folder: config.json, tokenizer.json, and model.safetensors or sharded safetensors with an
index. hub id: the same files fetched with huggingface_hub (only when the hub is reachable).
GGUF: transformers' GGUF reader dequantizes weights, config and tokenizer; we keep its state
dict and tokenizer backend, never its model. `trust_remote_code` is never passed. Every
failure a user can cause becomes an EngineError with a one-line message.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from editkv.engine.config import ModelConfig
from editkv.engine.errors import EngineError
from editkv.engine.model import Transformer
from editkv.engine.rope import Rotary
from editkv.engine.tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
EDITKV_JSON = "editkv.json"  # optional per-model settings of ours beside the weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """What `load_model` returns: the network, its tokenizer and config, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: str
    load_seconds: float
    preferred_view: str = "l2r"  # what "auto" means for this model: "fim" or "l2r"
    cache: dict[str, int] = field(default_factory=dict)  # editkv.json "cache": edit-cache options tuned for it

    @property
    def device(self) -> torch.device:
        return self.model.device


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


def load_model(
    spec: str | Path | None = None,
    *,
    device: str | None = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load `spec` (folder, `.gguf` file, or hub id; None = the embedded default model)."""
    started = time.perf_counter()
    dev = resolve_device(device)
    dtype = _resolve_dtype(dtype, dev)
    spec = str(spec) if spec is not None else str(DEFAULT_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        config, state, tokenizer = _read_gguf(path)
    elif path.is_dir():
        config, state, tokenizer = _read_folder(path)
    elif path.exists():
        raise EngineError(f"{spec} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
    elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        config, state, tokenizer = _read_folder(_fetch_from_hub(spec))
    else:
        raise EngineError(f"model path {spec} does not exist (nor is it a hub id like owner/name)")
    model = _build(config, state, dev, dtype, source=spec)
    view = "fim" if tokenizer.fim is not None else "l2r"
    cache: dict[str, int] = {}
    if path.is_dir() and (path / EDITKV_JSON).is_file():
        # A model folder may say which view is worth using and how its FIM prompt ends
        # (see engine/default_model/MODEL_CARD.md).
        settings = _read_json(path / EDITKV_JSON)
        view = settings.get("preferred_view", view)
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
    return LoadedModel(model, tokenizer, config, spec, time.perf_counter() - started, view, cache)


def model_from_weights(
    hf_config: dict, state: dict[str, torch.Tensor], *, device: str | None = "cpu",
    dtype: torch.dtype | str | None = None, source: str = "weights in memory",
) -> Transformer:
    """Our model over HF-named weights already in memory (tensors on the target device and
    dtype are shared, not copied): benches run it beside a transformers model of the same weights."""
    dev = resolve_device(device)
    return _build(ModelConfig.from_hf(hf_config), state, dev, _resolve_dtype(dtype, dev), source=source)


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


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    try:
        import gguf  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise EngineError(
            "reading GGUF needs the packages gguf and accelerate: pip install 'editkv[gguf]'"
        ) from None
    try:
        hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        config = ModelConfig.from_hf(hf_config.to_dict())
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
    return config, state, tokenizer


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
    if device.type == "cuda":
        model.enable_graphs()  # small batch-1 forwards replay as CUDA graphs
    return model.eval()
