"""Our top-level package `kernels` must not make transformers think HF's `kernels` is installed."""

import subprocess
import sys


def test_transformers_does_not_take_our_kernels_package_for_hf_kernels():
    code = (
        "import kernels, transformers\n"
        "from transformers.utils import import_utils\n"
        "assert kernels.__file__ and 'editkv' in (kernels.__doc__ or ''), kernels.__file__\n"
        "print(import_utils.is_kernels_available())\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=2))\n"
        "import torch; m(torch.tensor([[1, 2, 3]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
