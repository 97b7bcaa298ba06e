"""Builders for tiny random checkpoints of every supported family, and the kernel tests' skip marker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
    "if value is None:\n\traise ValueError('missing')\r\nelse:\n    pass\n",
    "résumé = 'naïve café 😀 ✓'\n",
]
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_sep|>"]
_TOKENIZER_CACHE: dict[int, str] = {}


def tiny_tokenizer_json(vocab_size: int = 320) -> str:
    """A byte-level BPE tokenizer.json with the FIM specials at ids 0..4."""
    if vocab_size in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    pattern = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SNIPPETS * 20, trainer)
    _TOKENIZER_CACHE[vocab_size] = tok.to_str()
    return _TOKENIZER_CACHE[vocab_size]


FAMILIES = {
    # name: (HF config class name, model class name, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-gqa-tied-linear": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 2, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    "llama3-scaling": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                            "rope_theta": 500000.0}}),
    "yarn": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                            "rope_theta": 10000.0}}),
    "dynamic": ("LlamaConfig", "LlamaForCausalLM", {
        "max_position_embeddings": 16,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": None}),
    "phi3-partial-rotary": ("Phi3Config", "Phi3ForCausalLM", {
        "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "pad_token_id": 0}),
}


def make_checkpoint(folder: Path, family: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """Write a tiny random checkpoint of `family` (HF weights + config + our tokenizer) to `folder`."""
    import transformers

    config_cls, model_cls, family_overrides = FAMILIES[family]
    kwargs = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=0, bos_token_id=None, tie_word_embeddings=False,
    )
    kwargs.update(family_overrides)
    kwargs.update(overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(kwargs["vocab_size"]))
    return folder


def hf_model(folder: Path):
    """The transformers reference model of a checkpoint folder, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# Kernel tests run their Triton kernels on CUDA, or on the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1")


# HF parameter names of a Qwen2 layer -> llama.cpp's GGUF tensor names (qwen2 needs no permutation)
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def make_gguf(folder: Path, *, seed: int = 0, name: str = "tiny-qwen2.gguf") -> Path:
    """Write a tiny random Qwen2 checkpoint as a GGUF file (matrices Q8_0-quantized, so loading it
    dequantizes them; norms and biases F32) with our tiny byte-level BPE tokenizer."""
    import gguf
    import numpy as np

    ckpt = make_checkpoint(folder / "hf", "qwen2", seed=seed, tie_word_embeddings=False)
    config = read_config(ckpt)
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    tok = json.loads(tiny_tokenizer_json(config["vocab_size"]))
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == config["vocab_size"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {t["content"] for t in tok["added_tokens"]}

    path = folder / name
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    for hf_name, tensor in state.items():
        if hf_name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
        data = tensor.float().numpy()
        if data.ndim == 2:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
