"""editkv installs one import root, `editkv`; Hugging Face's `kernels` (which transformers
imports) stays theirs, from the repository root and from any other directory.

The script runs in a fresh interpreter through `python -c`, which puts the working directory
first on sys.path: the case where a top-level folder of the repository would shadow an
installed package of the same name.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import pkgutil, sys, tempfile
import torch

# Hugging Face's kernels, the package transformers imports
import kernels
from kernels import CUDAProperties
assert "site-packages" in kernels.__file__, kernels.__file__
assert CUDAProperties.__module__.startswith("kernels."), CUDAProperties.__module__

# transformers' model classes (which import HF's kernels) run a forward
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, tie_word_embeddings=False)).eval()
ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
with torch.no_grad():
    want = hf(input_ids=ids).logits.float()

# every module of editkv.kernels imports; none of editkv under a bare name
import editkv.kernels
names = sorted(m.name for m in pkgutil.iter_modules(editkv.kernels.__path__))
assert {"fused", "rerotate", "span_attention"} <= set(names), names
for name in names:
    __import__("editkv.kernels." + name)
assert not any(m in sys.modules for m in ("engine", "edit_cache", "lsp_server")), sorted(sys.modules)
assert sys.modules["kernels"] is kernels

# one of our Triton kernels runs (TRITON_INTERPRET=1 here) and matches its torch reference
from editkv.engine.config import ModelConfig
from editkv.engine.rope import Rotary
from editkv.kernels.rerotate import move_rerotate_ref, move_rerotate_triton
config = ModelConfig(family="llama", vocab_size=10, hidden_size=64, intermediate_size=8,
                     num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32)
cos, sin = (t[:16] for t in Rotary(config).delta_cos_sin(3))
k = torch.randn(1, 1, 2, 40, 32); v = torch.randn_like(k)
k_ref, v_ref = k.clone(), v.clone()
move_rerotate_triton(k, v, 5, 30, 3, cos, sin, 32)
move_rerotate_ref(k_ref, v_ref, 5, 30, 3, cos, sin, 32)
assert torch.allclose(k, k_ref, atol=1e-5) and torch.equal(v, v_ref)

# editkv's own forward over the same weights gives transformers' logits
from editkv.engine.generate import prefill
from editkv.engine.loading import load_model
with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder, safe_serialization=True)
    sys.path.insert(0, TESTS)
    from helpers import tiny_tokenizer_json
    open(folder + "/tokenizer.json", "w").write(tiny_tokenizer_json(64))
    ours = load_model(folder, device="cpu", dtype=torch.float32)
    got = prefill(ours.runner, ids[0].tolist(), ours.runner.new_cache(6), logits="all")
assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()
print("ok", kernels.__file__, editkv.kernels.__path__[0])
"""


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_hf_kernels_transformers_and_our_kernels_in_one_process(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    code = SCRIPT.replace("TESTS", repr(str(ROOT / "tests")))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = proc.stdout.strip().splitlines()[-1]
    _, hf_file, ours = line.split()
    assert Path(hf_file).parent != ROOT / "kernels" and Path(ours) == ROOT / "kernels", line


def test_the_distribution_installs_one_top_level_package():
    """The build's package list maps every folder under `editkv` (what a wheel writes)."""
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml")
    packages = config["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"editkv"}, packages
    for folder in ("engine", "edit_cache", "kernels", "lsp_server"):
        assert f"editkv.{folder}" in packages
    # every Python package folder of the repository is in the list (a forgotten one would be
    # missing from a wheel while an editable install still finds it)
    found = {"editkv." + ".".join(p.parent.relative_to(ROOT).parts)
             for folder in ("engine", "edit_cache", "lsp_server") for p in (ROOT / folder).rglob("__init__.py")}
    assert found <= set(packages), found - set(packages)
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a regular package `kernels` shadows HF's"
