"""Loading from folders, sharded weights, and every failure a user can cause."""

import json
import shutil

import pytest
import torch
from editkv.engine.errors import EngineError
from editkv.engine.loading import load_model, resolve_device
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def _copy(ckpt, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(ckpt, dst)
    return dst


def test_loads_folder_and_reports_tokenizer_fim(ckpt):
    loaded = load_model(ckpt)
    assert loaded.config.family == "llama"
    assert loaded.tokenizer.fim is not None and loaded.tokenizer.fim.prefix == 1
    assert loaded.runner.dtype == torch.float32


def test_sharded_safetensors_load_identically(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="60KB", safe_serialization=True)
    shutil.copy(ckpt / "tokenizer.json", sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = load_model(ckpt).runner.model, load_model(sharded).runner.model
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_missing_path():
    with pytest.raises(EngineError, match="does not exist"):
        load_model("/nonexistent/model/dir")


def test_folder_without_config(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(EngineError, match="has no config.json"):
        load_model(folder)


def test_corrupt_config(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        load_model(folder)


def test_truncated_weights(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(EngineError, match="corrupt or truncated"):
        load_model(folder)


def test_no_weights(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no .safetensors weights"):
        load_model(folder)


def test_missing_tokenizer(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="no tokenizer.json"):
        load_model(folder)


def test_unsupported_architecture_names_the_supported_ones(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match=r"unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(folder)


def test_shape_mismatch(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match=r"has shape .* but config.json implies"):
        load_model(folder)


def test_unsupported_rope_type(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0], "long_factor": [1.0]}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="'longrope' is not supported"):
        load_model(folder)


def test_missing_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="not available"):
        resolve_device("cuda")
    with pytest.raises(EngineError, match="unknown device"):
        resolve_device("tpu:7")


def test_hub_id_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError, match="could not fetch nobody/no-such-model"):
        load_model("nobody/no-such-model")


def test_gguf_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(EngineError, match="could not read GGUF"):
        load_model(bad)


def test_moving_or_reloading_the_weights_remakes_the_fused_copies():
    """The forward reads each layer's fused q/k/v and gate/up copies; after `.to()` (a new dtype)
    or `load_state_dict(assign=True)` they are made again from the new weights, so the forward
    equals that of a model built directly with those weights."""
    import torch
    from editkv.engine.loading import load_model
    from editkv.engine.model import KVCache

    loaded = load_model(None)
    model = loaded.runner.model
    ids = torch.tensor([loaded.tokenizer.encode("def add(a, b):\n    return")])
    positions = torch.arange(ids.shape[1])

    def logits(m, dtype):
        cache = KVCache.allocate(m.config, ids.shape[1], dtype=dtype, device=m.device)
        return m(ids, positions, write=cache, write_at=0, logits="last")

    logits(model, torch.float32)  # fuses
    model.to(torch.float64)
    reference = load_model(None).runner.model.to(torch.float64)
    torch.testing.assert_close(logits(model, torch.float64), logits(reference, torch.float64))
    # new weights by assignment: the forward follows them
    state = {k: v * 0.5 if k.endswith("q_proj.weight") else v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, assign=True)
    changed = load_model(None).runner.model.to(torch.float64)
    changed.load_state_dict(state)
    torch.testing.assert_close(logits(model, torch.float64), logits(changed, torch.float64))
