"""editkv's inference engine: weights, tokenizer, our own RoPE decoder forward pass, decoding.

The engine knows token ids, positions and KV-cache slots. It never sees URIs, editor
positions or document text beyond the tokenizer's encode/decode: edit_cache decides which
slots hold which tokens at which positions, and the engine computes what it is asked to.

Data flow: a checkpoint folder / hub id / GGUF file -> `load_model` -> `LoadedModel`
(`ModelRunner` around the `Transformer` + `Tokenizer` + `ModelConfig`); callers take `KVCache`
buffers from `runner.new_cache` and call `runner(ids, positions, write=..., context=[Span, ...])`
-> logits (engine/runner.py: CUDA graphs where they serve, else the model's eager forward).
"""

from editkv.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from editkv.engine.errors import EngineError
from editkv.engine.model import KVCache, Span, Transformer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "EngineError",
    "KVCache",
    "ModelConfig",
    "Span",
    "Transformer",
]
