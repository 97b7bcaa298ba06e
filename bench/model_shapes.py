"""The models the GPU benches time: the embedded default model, random-weight checkpoints with
the exact shapes of larger code models (speed does not depend on the weights' values; they use
the default model's tokenizer, whose ids fit every vocabulary), and a real checkpoint (--model)."""

from __future__ import annotations

from pathlib import Path

import torch
from editkv.engine.loading import DEFAULT_MODEL_DIR, load_model, model_from_weights

SHAPES = {
    "qwen-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                tie_word_embeddings=True, max_position_embeddings=32768,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "deepseek-1.3b": ("llama", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                    num_attention_heads=16, num_key_value_heads=16, vocab_size=32256,
                                    tie_word_embeddings=False, max_position_embeddings=16384,
                                    rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0})),
    "qwen-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                              tie_word_embeddings=False, max_position_embeddings=32768,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def bench_models(names, model_path, device, dtype):
    """Yield (name, our ModelRunner, transformers model, tokenizer); one at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    default = load_model(None, device=device, dtype=dtype)
    hf_dtype = default.runner.dtype
    for name in names:
        if name == "default":
            hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=hf_dtype).to(device).eval()
            yield name, default.runner, hf, default.tokenizer
        elif name == "model":
            if not model_path:
                raise SystemExit("--models names 'model' but no --model PATH was given")
            loaded = load_model(model_path, device=device, dtype=hf_dtype)
            path = Path(model_path)
            if path.suffix == ".gguf":
                hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=hf_dtype)
            else:
                hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=hf_dtype)
            yield Path(model_path).name, loaded.runner, hf.to(device).eval(), loaded.tokenizer
            del loaded
        else:
            family, shape = SHAPES[name]
            config = AutoConfig.for_model(family, **shape)
            torch.manual_seed(0)
            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(config, dtype=hf_dtype).eval()
            ours = model_from_weights(config.to_dict(), hf.state_dict(), device=device, dtype=hf_dtype,
                                      source=f"random {name}")
            yield name, ours, hf, default.tokenizer
            del ours
        del hf
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
