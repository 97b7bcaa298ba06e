"""A real GGUF checkpoint (Qwen2.5-Coder-0.5B-Instruct, 4-bit) through our loader vs transformers.

Slow (~1-2 min on 2 cores); needs the GGUF from bench/fetch_qwen_gguf.sh or $EDITKV_QWEN_GGUF.
"""

import os
from pathlib import Path

import pytest
import torch
from editkv.engine.loading import load_model

GGUF = Path(os.environ.get(
    "EDITKV_QWEN_GGUF", Path.home() / ".cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason="run bench/fetch_qwen_gguf.sh first"),
]


def test_qwen_gguf_logits_match_transformers():
    from transformers import AutoModelForCausalLM

    ours = load_model(GGUF)
    assert ours.config.family == "qwen2" and ours.tokenizer.fim.convention == "qwen"
    ids = ours.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    cache = ours.runner.new_cache(len(ids))
    got = ours.runner(torch.tensor([ids]), torch.arange(len(ids)), write=cache, write_at=0)
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits
    assert (got - want).abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
