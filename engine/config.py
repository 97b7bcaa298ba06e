"""Model hyper-parameters, read from a Hugging Face `config.json` dict and validated.

One dataclass covers the RoPE decoder families editkv runs (Llama, Qwen2, Mistral, Phi-3):
RMSNorm, SwiGLU, GQA, optional qkv bias, tied or untied embeddings, partial rotary, and the
RoPE scaling types code models use (linear, dynamic, llama3, yarn). Anything else is
refused with a message naming what is supported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from editkv.engine.errors import EngineError

# HF architecture name -> the family whose weight names and conventions we follow.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Phi3ForCausalLM": "phi3",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "phi3": "phi3"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """How positions become rotation angles; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 / yarn
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and conventions of one checkpoint; derived sizes are filled in `__post_init__`."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rotary_dim: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        object.__setattr__(self, "rotary_dim", rotary_dim)
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if rotary_dim % 2 or rotary_dim <= 0 or rotary_dim > self.head_dim:
            problems.append(f"rotary dimension {rotary_dim} is not even and within head_dim")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(
                f"RoPE scaling type {self.rope.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if problems:
            raise EngineError("unsupported model config: " + "; ".join(problems))

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF `config.json`; raise EngineError if we can't run it."""
        family = _family_of(cfg)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = _rope_of(cfg)
            partial = cfg.get("partial_rotary_factor")
            if partial is None:
                partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            sliding = cfg.get("sliding_window")
            if family == "qwen2" and not cfg.get("use_sliding_window", False):
                sliding = None
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
                o_bias=False if family == "qwen2" else bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                partial_rotary_factor=float(partial),
                sliding_window=int(sliding) if sliding else None,
                rope=rope,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as missing:
            raise EngineError(
                f"config.json lacks the field {missing}; is it a decoder model's config?"
            ) from None
        except (TypeError, ValueError) as bad:
            raise EngineError(f"config.json has a malformed value: {bad}") from None


def _family_of(cfg: dict[str, Any]) -> str:
    for arch in cfg.get("architectures") or []:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    named = ", ".join(cfg.get("architectures") or []) or model_type or "none given"
    raise EngineError(
        f"unsupported architecture {named}; editkv runs "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
    )


def _rope_of(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "su":
        rope_type = "longrope"
    original = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = cfg.get("max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        if rope_type == "yarn" and original:
            factor = cfg.get("max_position_embeddings", original) / original
        else:
            factor = 1.0
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(factor),
        original_max_position_embeddings=int(original) if original else None,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
