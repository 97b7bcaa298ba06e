"""A model reload peaks at one model: the worker frees the old backend (its model, KV, graphs,
and the module caches of its tokenizer) before it builds the new one; documents carry over."""

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from editkv.engine.healing import healer_for
from editkv.lsp_server.server import model_factory
from editkv.lsp_server.settings import Settings
from editkv.lsp_server.worker import EngineWorker, Job
from helpers import make_checkpoint

URI = "file:///w/a.py"
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    pass\n"


def tracking_factory(make):
    """`make`, noting for each build which earlier models were still alive when it began."""
    built: list[weakref.ref] = []
    alive: list[list[bool]] = []

    def factory(settings):
        alive.append([ref() is not None for ref in built])
        backend = make(settings)
        built.append(weakref.ref(backend.loaded.runner))
        built.append(weakref.ref(backend.loaded.tokenizer))
        return backend

    return factory, built, alive


def complete(worker: EngineWorker, edits: int = 0):
    return worker.complete(Job(URI, "inline", 5, 8, "utf-16", edits, 2, worker.settings)).result(60)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_reload_frees_the_old_model_before_building_the_new_one(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    factory, built, alive = tracking_factory(model_factory())
    messages = []
    worker = EngineWorker(factory, lambda level, text: messages.append(text))
    try:
        settings = Settings(model=str(make_checkpoint(tmp_path / "m", "qwen2")), device=device, max_tokens=4)
        assert worker.load(settings).result(120)[0]
        worker.open(URI, TEXT, "python")
        assert complete(worker).status == "served"  # caches filled: KV, healer, rules, graphs on CUDA
        healer = weakref.ref(healer_for(worker.backend.loaded.tokenizer))  # a module cache's entry
        # "auto" is this device again, but another model key: a reload
        assert worker.load(replace(settings, device="auto" if device == "cpu" else "cuda:0")).result(120)[0]
        assert alive == [[], [False, False]]  # model and tokenizer of the first were gone
        assert healer() is None  # freed with its tokenizer
        assert complete(worker).status == "served" and worker.backend.text(URI) == TEXT
    finally:
        worker.stop()
    assert not messages


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_reload_of_the_default_model_on_cuda_peaks_at_one_model():
    """Peak allocated memory over a reload: one model plus a bounded margin (KV, graphs, workspace)."""
    worker = EngineWorker(model_factory(), lambda level, text: None)
    try:
        settings = Settings(device="cuda", max_tokens=8)
        assert worker.load(settings).result(300)[0]
        weights = sum(p.numel() * p.element_size() for p in worker.backend.loaded.runner.model.parameters())
        worker.open(URI, TEXT * 20, "python")
        assert complete(worker).status == "served"
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        assert worker.load(replace(settings, device="cuda:0")).result(300)[0]
        peak = torch.cuda.max_memory_allocated()
        assert peak <= max(before, weights) + weights // 4 + 64 * 2**20, (peak, before, weights)
        assert complete(worker).status == "served"
    finally:
        worker.stop()
