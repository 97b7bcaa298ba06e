"""Weight-only quantized CPU linears (engine/quant.py): the kernels compute with the weight they
were given (right scales, right orientation), a quantized model's forward stays close to fp32,
the served backend decodes with it, and the setting reaches the model."""

import pytest
import torch
import torch.nn.functional as F
from editkv.engine.errors import EngineError
from editkv.engine.loading import load_model
from editkv.engine.quant import AUTO_FORMAT, ENV, QuantLinear, choose_format, quantize_model
from helpers import make_checkpoint


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant"), "qwen2")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode, tol", [("int8", 0.02), ("int4", 0.15)])
@pytest.mark.parametrize("rows", [1, 5])  # 2 x 5 rows: more than SMALL_ROWS, the dense bf16 copy
def test_quant_linear_is_close_to_the_fp32_linear(mode, tol, rows):
    torch.manual_seed(0)
    weight = torch.randn(160, 256) * torch.linspace(0.1, 2.0, 160)[:, None]  # rows of different scales
    bias = torch.randn(160)
    lin = QuantLinear(weight, bias, mode, group_size=64)
    x = torch.randn(2, rows, 256)
    got, want = lin(x), F.linear(x, weight, bias)
    assert got.shape == want.shape == (2, rows, 160)
    assert _rel(got, want) < tol
    # a scale off by 2x, or the weight's transpose, would be far off
    assert _rel(2 * got, want) > 0.5


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_rounds_each_weight_to_its_nearest_level(mode):
    torch.manual_seed(1)
    weight = torch.randn(96, 128)
    lin = QuantLinear(weight, None, mode, group_size=32)
    deq = lin.dequantized()
    if mode == "int8":
        step = weight.abs().amax(dim=1, keepdim=True) / 127  # per output row
    else:
        groups = weight.view(96, 4, 32)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)  # per row and group
    assert deq.shape == weight.shape
    # half a level, plus bf16 rounding of the scales and of the result (the kernels' dtype)
    slack = 0.01 * weight.abs().amax(dim=1, keepdim=True)
    assert bool(((deq - weight).abs() <= step / 2 + slack).all())
    assert float((deq - weight).abs().mean()) < float(step.mean()) / 3
    assert lin.nbytes() < weight.numel() * 4 / (3.5 if mode == "int8" else 5)


def test_int4_needs_inputs_in_groups_of_32_else_int8():
    lin = QuantLinear(torch.randn(8, 48), None, "int4")
    assert lin.mode == "int8"
    assert lin(torch.randn(3, 48)).shape == (3, 8)


@pytest.mark.parametrize("mode, tol", [("int8", 0.03), ("int4", 0.25)])
def test_quantized_model_forward_is_close_to_fp32(tiny, mode, tol):
    ref = load_model(tiny, cpu_weights="fp32")
    quant = load_model(tiny, cpu_weights=mode)
    assert ref.weights == "fp32" and quant.weights == quant.runner.model.weight_format == mode
    model = quant.runner.model
    assert isinstance(model.lm_head, QuantLinear) and model.layers[0].self_attn.q_proj is None
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(model.embed_tokens.weight, ref.runner.model.embed_tokens.weight)  # embeddings stay fp32
    ids = torch.randint(5, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    logits = []
    for m in (ref.runner, quant.runner):
        cache = m.new_cache(16)
        prefix = m(ids[:, :8], pos[:8], write=cache, write_at=0, logits="all")
        step = m(ids[:, 8:], pos[8:], write=cache, write_at=8, logits="all",
                 context=[_span(cache, 8)])
        logits.append(torch.cat([prefix, step], dim=1))
    assert _rel(logits[1], logits[0]) < tol
    assert _rel(logits[1], logits[0]) > 0  # it did run the quantized weights


def _span(cache, end):
    from editkv.engine.model import Span

    return Span(cache, 0, end)


def test_a_tied_head_gets_its_own_quantized_copy(tiny):
    loaded = load_model(tiny, cpu_weights="fp32")
    model = loaded.runner.model
    assert model.config.tie_word_embeddings
    embed = model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int8")
    assert torch.equal(model.embed_tokens.weight, embed)
    assert _rel(model.lm_head.dequantized(), embed) < 0.02


def test_choose_format_env_setting_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_format("int8", cuda, num_params=10**9) == "fp32"  # the GPU keeps its weights
    assert choose_format("int4", cpu, num_params=1) == "int4"
    assert choose_format(None, cpu, num_params=1000) == "fp32"  # a tiny model: never quantized
    assert choose_format("auto", cpu, num_params=5 * 10**8) == AUTO_FORMAT
    with pytest.raises(EngineError):
        choose_format("int3", cpu, num_params=1)


def test_auto_keeps_the_embedded_model_in_fp32():
    assert load_model(None).weights == "fp32"  # its weights fit the caches: its tests and numbers stay exact


def test_env_overrides_the_load_option(tiny, monkeypatch):
    monkeypatch.setenv(ENV, "int8")
    assert load_model(tiny, cpu_weights="fp32").runner.model.weight_format == "int8"
    monkeypatch.setenv(ENV, "bogus")
    with pytest.raises(EngineError, match=ENV):
        load_model(tiny)


def test_served_backend_decodes_with_quantized_weights():
    """The trained default model through ModelBackend: int8 completions mostly match fp32's."""
    from editkv.edit_cache.positions import to_position
    from editkv.lsp_server.backend import CompletionRequest, ModelBackend

    texts = ["def add(a, b):\n    return ", "import os\n\nfor name in os.listdir('.'):\n    ",
             "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.",
             "def main():\n    args = parse_args()\n    if args.verbose:\n        "]
    answers = {}
    for mode in ("fp32", "int8"):
        loaded = load_model(None, cpu_weights=mode)
        assert loaded.runner.model.weight_format == mode
        backend = ModelBackend(loaded, background=False)
        got = []
        for i, text in enumerate(texts):
            uri = f"file:///q{i}.py"
            backend.open(uri, text)
            pos = to_position(text, len(text))
            result = backend.complete(CompletionRequest(uri, pos.line, pos.character, max_tokens=12))
            assert result.drafts and result.stats["forwards"] > 0
            got.append(result.drafts[0].text)
        answers[mode] = got
    assert any(answers["int8"])
    assert sum(a == b for a, b in zip(answers["fp32"], answers["int8"], strict=True)) >= 3, answers


def test_the_setting_reaches_the_model(tiny):
    from editkv.lsp_server.server import model_factory
    from editkv.lsp_server.settings import Settings, parse_settings

    settings, problems = parse_settings({"cpuWeights": "int4", "model": str(tiny), "device": "cpu"})
    assert not problems and settings.cpu_weights == "int4"
    assert settings.model_key != Settings(model=str(tiny), device="cpu").model_key  # a change reloads
    assert parse_settings({"cpuWeights": "int2"})[1]  # reported, not taken
    backend = model_factory()(settings)
    assert backend.loaded.runner.model.weight_format == "int4" and backend.loaded.weights == "int4"
