"""The model runner owns the graphs: the Transformer's forward is always eager, the runner's goes
through its static forward where that serves, and a change of weights drops the runner's graphs."""

import logging

import pytest
import torch
from editkv.engine.loading import load_model
from editkv.engine.model import KVCache, Span, Transformer
from editkv.engine.runner import ModelRunner
from editkv.engine.static_decode import StaticForward
from helpers import make_checkpoint


@pytest.fixture()
def runner(tmp_path):
    return load_model(make_checkpoint(tmp_path / "m", "llama")).runner


def _prefix_and_step(forward, runner, ids):
    """A 12-token prefill, then 3 tokens over it (the shape a repair or decode step has): the
    step's logits `[1, 3, V]` and the cache's keys."""
    cache = KVCache.allocate(runner.config, 32, dtype=runner.dtype, device=runner.device)
    forward(ids[:, :12], torch.arange(12), write=cache, write_at=0, logits="none")
    logits = forward(ids[:, 12:15], torch.arange(12, 15), write=cache, write_at=12,
                     context=[Span(cache, 0, 12)], logits="all")
    return logits, cache.k[:, :, :, :15].clone()


def test_the_model_is_eager_and_the_runner_replays_its_static_forward(runner):
    model = runner.model
    assert isinstance(model, Transformer) and not hasattr(model, "static") and not hasattr(model, "kv_pool")
    ids = torch.randint(5, 300, (1, 15), generator=torch.Generator().manual_seed(0))
    want, want_keys = _prefix_and_step(model, runner, ids)
    static = runner.enable_graphs(bucket=16, max_width=4, mode="static")
    assert runner.static is static and not runner.replays_graphs  # "static": the graph program, eagerly
    # the model itself never takes the graph path, even with graphs on in its runner
    eager, _ = _prefix_and_step(model, runner, ids)
    assert static.handled == 0 and static.captures == 0
    torch.testing.assert_close(eager, want)
    got, got_keys = _prefix_and_step(runner, runner, ids)
    assert static.handled == 1 and static.eager == 1  # the 12-token prefill is wider than 2 x 4: eager
    assert static.captures == 1  # the step's graph key, taken once
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_keys, want_keys, atol=1e-5, rtol=1e-5)
    assert runner.disable_graphs() is static and runner.static is None


def test_a_weight_change_drops_the_runners_graphs(runner, caplog):
    runner.enable_graphs(bucket=16, mode="static")
    with caplog.at_level(logging.WARNING):
        runner.model.to(torch.float64)
    assert runner.static is None and "CUDA graphs turned off" in caplog.text
    runner.enable_graphs(bucket=16, mode="static")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        runner.model.load_state_dict(runner.model.state_dict())
    assert runner.static is None and "CUDA graphs turned off" in caplog.text
    # the forward follows the new weights (the fused copies are made again)
    ids = torch.randint(5, 300, (1, 15), generator=torch.Generator().manual_seed(1))
    logits, _ = _prefix_and_step(runner, runner, ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_a_static_forward_of_another_model_is_refused(runner, tmp_path):
    other = load_model(make_checkpoint(tmp_path / "o", "llama")).runner
    with pytest.raises(ValueError, match="another model"):
        runner.use_graphs(StaticForward(other.model, mode="static"))
    with pytest.raises(AttributeError):
        runner.attention = "triton"  # the model's setting, not the runner's: not silently ignored
    assert isinstance(ModelRunner(other.model).new_cache(4), KVCache)
