"""The GGUF conversion cache: a GGUF is dequantized once; later loads read the cached copy.

A tiny random Qwen2 GGUF (Q8_0 matrices) stands in for a real one; each test gets its own
XDG_CACHE_HOME.
"""

import hashlib
import json
import os
import time

import pytest
import torch
from editkv.engine import loading
from editkv.engine.loading import GGUF_MANIFEST, gguf_cache_dir, load_model
from helpers import make_gguf

TEXT = "def add(a, b):\n    return a + b\n<|fim_prefix|>x"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return make_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def conversions(monkeypatch, tmp_path):
    """A fresh user cache, and a list that records every real dequantization of a GGUF."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EDITKV_GGUF_CACHE", raising=False)
    calls = []
    real = loading._read_gguf

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(loading, "_read_gguf", counting)
    return calls


def _logits(loaded):
    ids = loaded.tokenizer.encode(TEXT)
    cache = loaded.runner.new_cache(len(ids))
    with torch.inference_mode():
        return ids, loaded.runner(torch.tensor([ids]), torch.arange(len(ids)), write=cache, write_at=0)


def _entry(gguf_file):
    return gguf_cache_dir() / hashlib.sha256(gguf_file.read_bytes()).hexdigest()


def test_second_load_reads_the_cache_and_gives_identical_logits(gguf_file, conversions, tmp_path):
    first = load_model(gguf_file)
    assert first.gguf_cache == "stored" and len(conversions) == 1
    entry = _entry(gguf_file)
    assert entry.parent == tmp_path / "xdg" / "editkv" / "gguf"
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["config.json", "tokenizer.json", "model.safetensors", GGUF_MANIFEST])
    second = load_model(gguf_file)
    assert second.gguf_cache == "hit" and len(conversions) == 1  # not dequantized again
    ids_a, logits_a = _logits(first)
    ids_b, logits_b = _logits(second)
    assert ids_a == ids_b and torch.equal(logits_a, logits_b)
    assert second.config == first.config
    assert second.tokenizer.fim == first.tokenizer.fim and second.tokenizer.fim.convention == "qwen"
    assert second.tokenizer.stop_ids == first.tokenizer.stop_ids
    assert second.tokenizer.eos_ids == first.tokenizer.eos_ids
    # document text that spells a control token stays text in both
    assert second.tokenizer.token_id("<|fim_prefix|>") not in ids_b
    # a bf16 load from the cache is the fp32 weights rounded, the same as from the GGUF
    assert torch.equal(load_model(gguf_file, dtype="bfloat16").runner.model.lm_head.weight,
                       first.runner.model.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_manifest", "no_manifest", "changed_weights"])
def test_a_broken_entry_is_detected_and_rebuilt(gguf_file, conversions, damage):
    _, want = _logits(load_model(gguf_file))
    entry = _entry(gguf_file)
    weights = entry / "model.safetensors"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage_manifest":
        (entry / GGUF_MANIFEST).write_text("{not json")
    elif damage == "no_manifest":
        (entry / GGUF_MANIFEST).unlink()
    else:  # same size, other bytes at the end (what the manifest's digest covers)
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(8)
        weights.write_bytes(bytes(data))
    again = load_model(gguf_file)
    assert again.gguf_cache == "stored" and len(conversions) == 2
    assert torch.equal(_logits(again)[1], want)
    third = load_model(gguf_file)  # the rebuilt entry is whole
    assert third.gguf_cache == "hit" and len(conversions) == 2


def test_a_killed_writer_leaves_no_entry_and_its_leftovers_are_swept(gguf_file, conversions):
    root = gguf_cache_dir()
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    # what a writer killed mid-way leaves: its temporary folder, half written, no manifest
    stale = root / f".tmp-{sha[:16]}-99999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    fresh = root / ".tmp-0000000000000000-99998-cafecafe"  # a writer still at work: left alone
    fresh.mkdir()
    loaded = load_model(gguf_file)
    assert loaded.gguf_cache == "stored" and len(conversions) == 1
    assert not stale.exists() and fresh.exists()
    assert json.loads((root / sha / GGUF_MANIFEST).read_text())["gguf_sha256"] == sha


def test_cache_off_converts_every_time_and_writes_nothing(gguf_file, conversions, monkeypatch):
    assert load_model(gguf_file, gguf_cache=False).gguf_cache == "converted"
    monkeypatch.setenv("EDITKV_GGUF_CACHE", "0")
    assert load_model(gguf_file).gguf_cache == "converted"
    assert len(conversions) == 2 and not gguf_cache_dir().exists()


def test_unwritable_cache_still_loads(gguf_file, conversions, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    loaded = load_model(gguf_file)
    assert loaded.gguf_cache == "converted" and loaded.tokenizer.fim is not None


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path, conversions):
    path = tmp_path / "blob.gguf"
    path.write_bytes(b"a" * 1000)
    assert loading.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    memo = next((gguf_cache_dir() / "sha256").iterdir())
    assert json.loads(memo.read_text())["sha256"] == hashlib.sha256(b"a" * 1000).hexdigest()
    path.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert loading.file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()
