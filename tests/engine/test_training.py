"""Training pipeline of the default model: corpus, tokenizer, FIM data, train/resume, export.

Everything runs on CPU at toy sizes, on corpora built in temporary folders.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # plain `pytest` does not put the repo root on the path
    sys.path.insert(0, str(REPO))

from editkv.engine.training import bpe  # noqa: E402
from editkv.engine.training.corpus import (  # noqa: E402
    COPYLEFT,
    PERMISSIVE,
    UNKNOWN,
    DocStore,
    build_corpus,
    classify_licence,
    collect_sources,
)
from editkv.engine.training.data import (  # noqa: E402
    PackedStreams,
    encode_documents,
    fim_cuts,
    heal_split,
    line_fim_samples,
    tokenize_stream,
)

# ------------------------------------------------------------------------------ helpers


def _code_file(i: int, lines: int = 12) -> str:
    body = "".join(f"    total += values[{j}] * {i}\n" for j in range(lines))
    return (f"import math\n\n\ndef function_{i}(values):\n    total = 0\n{body}"
            f"    return math.sqrt(total)\n\n\nclass Thing{i}:\n    def __init__(self):\n"
            f"        self.value = function_{i}([1, 2, 3])\n")


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _fake_dist(site: Path, name: str, files: dict[str, str], metadata: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    _write(info / "METADATA", f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n{metadata}")
    for rel, text in files.items():
        _write(site / rel, text)
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    _write(info / "RECORD", "\n".join(record) + "\n")


def _fake_install(root: Path, num_files: int = 30) -> tuple[Path, Path]:
    """A fake standard library and site-packages exercising every corpus filter."""
    stdlib, site = root / "stdlib", root / "site"
    for i in range(num_files):
        _write(stdlib / f"mod{i}.py", _code_file(i))
    _write(stdlib / "copy_of_mod0.py", _code_file(0))  # duplicate content
    _write(stdlib / "latin1.py", b"# caf\xe9 in latin-1\n" + b"x = 1\n" * 20)
    _write(stdlib / "huge.py", "x = 1\n" * 40_000)  # 240 KB
    _write(stdlib / "tiny.py", "x = 1\n")
    _write(stdlib / "site-packages" / "ignored.py", _code_file(900))
    _write(stdlib / "itsdangerous" / "signer.py", _code_file(901))
    _fake_dist(site, "goodpkg", {"goodpkg/__init__.py": _code_file(902),
                                 "goodpkg/_vendor/more_itertools/more.py": _code_file(903)},
               "License-Expression: MIT\n")
    _fake_dist(site, "gplpkg", {"gplpkg/core.py": _code_file(904)},
               "Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)\n")
    _fake_dist(site, "itsdangerous", {"itsdangerous/__init__.py": _code_file(905)},
               "License-Expression: BSD-3-Clause\n")
    _fake_dist(site, "mystery", {"mystery/__init__.py": _code_file(906)}, "")
    return stdlib, site


# ------------------------------------------------------------------------------- corpus


@pytest.mark.parametrize(
    "expression, license_field, classifiers, verdict",
    [
        ("MIT", None, [], PERMISSIVE),
        ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND BSL-1.0", None, [], PERMISSIVE),
        ("Apache-2.0 OR GPL-2.0-only", None, [], PERMISSIVE),
        ("BSD-3-Clause AND (GPL-3.0-or-later OR LGPL-2.1)", None, [], COPYLEFT),
        ("MPL-2.0", None, [], COPYLEFT),
        ("LicenseRef-Proprietary", None, [], UNKNOWN),
        (None, "MPL-2.0 AND MIT", [], COPYLEFT),
        (None, "Apache 2.0 License", [], PERMISSIVE),
        (None, "BSD", [], PERMISSIVE),
        (None, "MIT License\n\nCopyright (c) 2020 A\n\n" + "Permission is hereby granted, "
         "free of charge, to any person " * 20, [], PERMISSIVE),
        # a BSD text whose bundled-notices appendix mentions the GPL: judged by its title
        (None, "Copyright (c) 2005, Devs\nAll rights reserved.\n\nRedistribution and use in "
         "source and binary forms" + " ..." * 100 + "\nlibgfortran: GNU GENERAL PUBLIC LICENSE",
         [], PERMISSIVE),
        (None, "GNU GENERAL PUBLIC LICENSE\nVersion 3" + " ..." * 100, [], COPYLEFT),
        (None, "NVIDIA Proprietary Software", ["License :: Other/Proprietary License"], UNKNOWN),
        (None, None, ["License :: OSI Approved :: MIT License"], PERMISSIVE),
        (None, "MIT", ["License :: OSI Approved :: GNU Lesser General Public License v3 "
                       "(LGPLv3)"], COPYLEFT),
        (None, None, ["License :: OSI Approved"], UNKNOWN),
    ],
)
def test_classify_licence(expression, license_field, classifiers, verdict):
    assert classify_licence(expression, license_field, classifiers).verdict == verdict


def test_corpus_filters_licences_eval_projects_and_duplicates(tmp_path):
    stdlib, site = _fake_install(tmp_path)
    sources = collect_sources(stdlib, [site])
    manifest = build_corpus(sources, tmp_path / "corpus", workers=2)

    train, val = DocStore(tmp_path / "corpus", "train"), DocStore(tmp_path / "corpus", "val")
    texts = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert len(val) >= 1
    expected = {_code_file(i) for i in range(30)} | {_code_file(902)}
    assert sorted(texts) == sorted(expected)  # each kept once, nothing else

    dists = {d["name"]: d for d in manifest["distributions"]}
    assert set(dists) == {"python-stdlib", "goodpkg"}
    assert dists["goodpkg"]["licence"] == "License-Expression: MIT"
    assert dists["goodpkg"]["files_dropped"] == {"evaluation-set path": 1}
    excluded = {d["name"]: d["reason"] for d in manifest["excluded"]}
    assert excluded == {"gplpkg": "licence copyleft", "itsdangerous": "evaluation-set project",
                        "mystery": "licence unknown"}
    assert manifest["totals"]["files_dropped"] == {
        "duplicate": 1, "evaluation-set path": 2, "non_utf8": 1, "too_large": 1, "too_small": 1}
    assert manifest["totals"]["files_kept"] == 31
    assert manifest["totals"]["bytes_kept"] == sum(len(t.encode()) for t in expected)

    # Deterministic: a second build (in-process, no pool) writes the same bytes.
    build_corpus(sources, tmp_path / "again", workers=1)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "corpus" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


# ---------------------------------------------------------------------------- tokenizer


TRICKY = (
    "def café(x):\r\n\treturn x  # déjà vu ✓ 😀\r\n\r\n\n\n"
    "    s = '<|endoftext|>' + \"<|fim_middle|>\"\x0c\n"
    "class A:\n\tpass\u2028z = 10000\x1cq\x85w   \n   "
)


@pytest.fixture(scope="module")
def trained_tokenizer():
    texts = [_code_file(i, lines=3 + i % 7) for i in range(200)] + [TRICKY] * 5
    return bpe.train_tokenizer(texts, vocab_size=700), texts


def test_tokenizer_special_ids_vocab_and_round_trip(trained_tokenizer, tmp_path):
    tok, _ = trained_tokenizer
    assert [tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 300 < tok.get_vocab_size() <= 700
    for text in (TRICKY, "x\r\ny\rz\n", "\t\t\n  \n", "日本語のコメント = 1\n", ""):
        ids = bpe.encode_texts(tok, [text])[0]
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert not set(ids) & set(range(5)), "text must never yield control ids"
    # Indentation is a token of its own, separate from the keyword after it.
    pieces = tok.pre_tokenizer.pre_tokenize_str("        return x\n")
    assert [p for p, _ in pieces][:2] == ["ĠĠĠĠĠĠĠ", "Ġreturn"]

    bpe.save_tokenizer(tok, tmp_path, model_max_length=4096)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == hf.pad_token == "<|endoftext|>"
    assert (hf.eos_token_id, hf.pad_token_id) == (0, 0)
    assert set(bpe.SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    assert hf.encode(_code_file(3), add_special_tokens=False) == tok.encode(_code_file(3)).ids


def test_locality_check_is_zero_for_ours_and_catches_a_merging_pattern(trained_tokenizer):
    tok, texts = trained_tokenizer
    sample = texts[:40] + [TRICKY, "a\n\n\nb", "x = (1,\n\n    2)\r\n\r\n"]
    stats = bpe.check_locality(tok, sample)
    assert stats.files == len(sample) and stats.lines > 500
    assert stats.lines_differing == 0 and stats.files_differing == 0

    # Qwen2's own pattern lets "\n\n" and "):\n\n" be one piece: the check must see that.
    from tokenizers import Regex, pre_tokenizers

    qwen = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    other = bpe.new_tokenizer()
    other.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    from tokenizers import trainers

    other.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(bpe.SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bad = bpe.check_locality(other, sample)
    assert bad.lines_differing > 0 and bad.files_differing > 0


def test_fim_layout_and_packing(trained_tokenizer, tmp_path):
    tok, _ = trained_tokenizer
    texts = [_code_file(1), "s = '<|endoftext|>'\n"]
    cuts = np.array([[1.0, 0.7, 0.2, 0.0], [0.0, 0.5, 0.5, 0.0]])
    ids = encode_documents(tok, texts, cuts).tolist()
    pre, suf, mid, eot = ids.index(1), ids.index(3), ids.index(2), ids.index(0)
    assert pre == 0 and pre < suf < mid < eot
    lo, hi = int(0.2 * (len(texts[0]) + 1)), int(0.7 * (len(texts[0]) + 1))
    assert tok.decode(ids[pre + 1:suf]) == texts[0][:lo]
    assert tok.decode(ids[suf + 1:mid]) == texts[0][hi:]
    assert tok.decode(ids[mid + 1:eot]) == texts[0][lo:hi]
    plain = ids[eot + 1:]
    assert plain[0] == 1, "every document opens with <|fim_prefix|>, the document-start token"
    assert plain[-1] == 0 and 0 not in plain[:-1]
    assert tok.decode(plain[1:-1], skip_special_tokens=False) == texts[1]

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    np.arange(1001, dtype=np.uint16).tofile(a)
    (np.arange(1001, dtype=np.uint16) + 5000).tofile(b)
    data = PackedStreams([a, b], seq_len=100, seed=3)
    assert data.num_windows == 10
    epoch0 = data.batch(0, 10)
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 1000, 100))  # a permutation of a
    assert (np.diff(epoch0, axis=1) == 1).all() and epoch0.shape == (10, 101)
    assert (data.batch(10, 10)[:, 0] >= 5000).all()  # epoch 1 reads stream b
    assert (PackedStreams([a, b], 100, seed=3).batch(0, 10) == epoch0).all()


_LINE_FIM_TEXTS = [
    _code_file(3, lines=40),
    "x = 1",  # one line, no terminator
    "a = 1\r\n\r\n\tif a:\r\n\t\tb = 2\r\n",  # CRLF, tabs, a blank line
    "# " + "é" * 30 + "\n" + "def f():\n    return 1\n" * 900,  # > 8,000 chars: several samples
    "\n\n   \n",  # nothing but blank lines: no sample
]


@pytest.mark.parametrize("seed", [0.0, 0.25, 0.5, 0.999])
def test_line_fim_samples_are_cut_at_line_boundaries(seed):
    for text in _LINE_FIM_TEXTS:
        samples = line_fim_samples(text, seed)
        if not text.strip():
            assert samples == []
            continue
        assert 1 <= len(samples) <= 4
        assert len(samples) > 1 or len(text) < 8000
        lines = text.splitlines(keepends=True)
        starts = {0, *np.cumsum([len(x) for x in lines]).tolist()}
        for prefix, suffix, middle in samples:
            lo = text.index(prefix + middle + suffix) if prefix else None
            # the three pieces are consecutive text of the document, in this order
            assert (prefix + middle + suffix) in text
            cursor = (lo if lo is not None else text.index(middle + suffix)) + len(prefix)
            end = cursor + len(middle)
            assert end in starts or end == len(text), "the middle ends at a line end, terminator included"
            assert middle.strip(), "the middle holds the rest of a non-blank line"
            assert prefix == "" or (cursor - len(prefix)) in starts, "the prefix window starts a line"
            assert "\n" not in middle.rstrip("\r\n") or middle.count("\n") > 1, "one line unless several"


def test_fim_tail_and_heal_cut(trained_tokenizer):
    tok, _ = trained_tokenizer
    text = _code_file(4)
    cut = text.index("total = 0") + len("total = ")
    u = cut / (len(text) + 1) + 1e-9
    u_end = (text.index("\n", cut) + 1) / (len(text) + 1) + 1e-9
    prefix, middle = text[:cut], text[cut:text.index("\n", cut) + 1]
    assert heal_split(tok, prefix, middle) == (text[:cut - len(" ")], " " + middle)
    assert heal_split(tok, "    ", "x\n") == ("", "    x\n")
    for heal_seed, healed in ((0.0, True), (0.5 / 1024 + 0.25, False)):
        ids = encode_documents(tok, [text], np.array([[1.0, u, u_end, heal_seed]]), fim_tail=4,
                               heal_share=0.5).tolist()
        suf, mid = ids.index(3), ids.index(2)
        pre_ids = ids[1:suf]
        want_prefix = text[:cut - 1] if healed else prefix
        assert tok.decode(pre_ids) == want_prefix
        assert ids[mid + 1:mid + 5] == pre_ids[-4:], "the prefix's last 4 ids follow <|fim_middle|>"
        assert tok.decode(ids[mid + 5:-1]) == (" " + middle if healed else middle)


def test_line_fim_layout_is_one_document_per_sample(trained_tokenizer):
    tok, _ = trained_tokenizer
    text = _LINE_FIM_TEXTS[3]
    ids = encode_documents(tok, [text], np.array([[2.0, 0.1, 0.2, 0.3]])).tolist()
    samples = line_fim_samples(text, 0.3)
    assert ids.count(0) == len(samples) == ids.count(2) == ids.count(3) > 1
    docs = np.split(np.array(ids), np.flatnonzero(np.array(ids) == 0)[:-1] + 1)
    for doc, (prefix, suffix, middle) in zip(docs, samples, strict=True):
        doc = doc.tolist()
        suf, mid = doc.index(3), doc.index(2)
        assert doc[0] == 1 and doc[-1] == 0
        assert tok.decode(doc[1:suf]) == prefix
        assert tok.decode(doc[suf + 1:mid]) == suffix
        assert tok.decode(doc[mid + 1:-1]) == middle
    # the draws: a fim_rate share is FIM, of which a line_share share is line-aligned
    cuts = fim_cuts(np.random.default_rng(0), 4000, fim_rate=0.5, line_share=0.7)
    layouts = np.bincount(cuts[:, 0].astype(int), minlength=3) / 4000
    assert abs(layouts[0] - 0.5) < 0.04 and abs(layouts[2] - 0.35) < 0.04 and abs(layouts[1] - 0.15) < 0.04


# ------------------------------------------------------------------- train and export


def _pipeline(tmp_path: Path, *extra: str) -> list[str]:
    stdlib, site = tmp_path / "stdlib", tmp_path / "site"
    return ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--tiny", "--stdlib", str(stdlib), "--sources", str(site), "--workers", "1",
            "--vocab-size", "320", "--seq-len", "64", "--micro-batch", "4",
            "--batch-tokens", "512", "--warmup", "5", "--log-every", "5",
            "--eval-every", "10", "--ckpt-every", "10", "--lr", "1e-2", *extra]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The whole pipeline through its entry point on a tiny repetitive corpus."""
    from editkv.engine import train_default

    tmp = tmp_path_factory.mktemp("pipeline")
    stdlib, site = tmp / "stdlib", tmp / "site"
    for i in range(60):
        _write(stdlib / f"m{i}.py", _code_file(i % 6, lines=4 + i % 5) + f"# {i}\n")
    _fake_dist(site, "goodpkg", {"goodpkg/__init__.py": _code_file(7)}, "License: MIT\n")
    assert train_default.main(_pipeline(tmp, "--total-steps", "60",
                                        "--pack", str(tmp / "pack"))) == 0
    return tmp


def test_pipeline_lowers_loss_and_exports_a_loadable_model(pipeline_run):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = pipeline_run / "out"
    stats = json.loads((out / "training_stats.json").read_text())
    assert stats["steps"] == 60 and stats["stopped"] == "schedule done"
    assert stats["val_loss"] < 0.5 * math.log(320)  # from ~ln(V) at init
    assert stats["locality"]["lines_differing"] == 0
    assert json.loads((out / "corpus_manifest.json").read_text())["totals"]["files_kept"] == 61
    log = (pipeline_run / "work" / "train.log").read_text()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines()
              if "] step " in line]
    assert losses[-1] < losses[0] - 2.0

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    model, info = LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    from safetensors import safe_open

    keys = [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["<|fim_prefix|>", "<|fim_suffix|>"]) == [1, 3]
    # the FIM layout the tokens were made with travels with the weights
    assert json.loads((out / "editkv.json").read_text()) == {"fim_tail_tokens": 32}
    from editkv.engine.loading import load_model

    assert load_model(str(out)).tokenizer.fim.tail == 32

    # Same logits as the in-memory model: rebuild it from the fp32 checkpoint.
    from editkv.engine.training.train import ModelSize, build_model

    ckpt = torch.load(pipeline_run / "work" / "checkpoint.pt", weights_only=False)
    ref = build_model(ModelSize(**ckpt["size"]), torch.device("cpu"), seed=0)
    ref.load_state_dict(ckpt["model"])
    ids = torch.tensor([tok.encode(_code_file(2), add_special_tokens=False)[:60]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model.float()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=0.1, rtol=0.05), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_pack_fits_device_limits_and_unpacks_exactly(pipeline_run, tmp_path):
    from editkv.engine.training.export import unpack_folder
    from safetensors.torch import load_file

    pack = sorted((pipeline_run / "pack").iterdir())
    assert len(pack) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in pack)
    files = unpack_folder(pipeline_run / "pack", tmp_path / "restored")
    original = sorted(p.name for p in (pipeline_run / "out").iterdir())
    assert sorted(p.name for p in files) == original
    for shard in (pipeline_run / "out").glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "restored" / shard.name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_split_embedding_pack_round_trip(tmp_path):
    import torch
    from editkv.engine.training.export import pack_folder, unpack_folder
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    big = torch.randn(16384, 520).to(torch.bfloat16)  # 17 MB: over the per-file limit
    save_file({"model.embed_tokens.weight": big, "norm": torch.ones(520)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    packed = pack_folder(folder, tmp_path / "pack")
    assert all(p.stat().st_size <= 16 * 2**20 for p in packed) and len(packed) == 3
    unpack_folder(tmp_path / "pack", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert torch.equal(back["model.embed_tokens.weight"], big)


def test_tokenize_stream_is_reproducible_and_pool_matches_in_process(pipeline_run, tmp_path):
    work = pipeline_run / "work"
    runs = [tokenize_stream(work / "tokenizer" / "tokenizer.json", work / "corpus", "train",
                            tmp_path / f"s{w}.bin", fim_rate=0.5, line_fim_share=0.7, fim_tail=32,
                            heal_share=0.5, seed=[0, 0], shuffle=True, workers=w) for w in (1, 2)]
    assert runs[0]["tokens"] == runs[1]["tokens"] > 0
    assert 0 < runs[0]["line_fim_docs"] < runs[0]["fim_docs"] < runs[0]["docs"]
    assert (tmp_path / "s1.bin").read_bytes() == (tmp_path / "s2.bin").read_bytes()
    # The pipeline's first stream was drawn with the same seed.
    assert (tmp_path / "s1.bin").read_bytes() == (work / "tokens" / "train_e0.bin").read_bytes()


def test_resume_continues_exactly_and_time_budget_stops_cleanly(pipeline_run, tmp_path):
    import torch
    from editkv.engine.training.train import TINY_SIZE, TrainConfig, train

    tokens = pipeline_run / "work" / "tokens"
    size = replace(TINY_SIZE, vocab_size=320)
    cfg = TrainConfig(seq_len=64, micro_batch=4, batch_tokens=512, total_steps=12,
                      peak_lr=1e-2, warmup_steps=3, log_every=4, eval_every=100,
                      ckpt_every=100, eval_tokens=512, device="cpu", compile=False)
    lines: list[str] = []
    straight, _ = train(cfg, size, tokens, tmp_path / "a.pt", lines.append)
    _, first = train(cfg, size, tokens, tmp_path / "b.pt", lines.append, stop_at_step=7)
    assert first["steps"] == 7 and first["stopped"] == "stop at step 7"
    resumed, second = train(cfg, size, tokens, tmp_path / "b.pt", lines.append, resume=True)
    assert second["steps"] == 12 and second["tokens_seen"] == 12 * 512
    assert any("resumed from" in line and "at step 7" in line for line in lines)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, atol=1e-6), name

    # A budget that is already spent: no step, but a checkpoint and stats all the same.
    _, late = train(cfg, size, tokens, tmp_path / "b.pt", lines.append, resume=True,
                    deadline=time.monotonic())
    assert late["stopped"] in ("time budget", "schedule done") and late["steps"] == 12
    _, timed = train(replace(cfg, total_steps=1000), size, tokens, tmp_path / "c.pt",
                     lines.append, deadline=time.monotonic() + 10.0)
    assert timed["stopped"] == "time budget" and 0 < timed["steps"] < 1000
    assert torch.load(tmp_path / "c.pt", weights_only=False)["state"]["step"] == timed["steps"]


def test_second_invocation_skips_built_stages_and_needs_resume(pipeline_run, tmp_path, capsys):
    from editkv.engine import train_default

    shutil.copytree(pipeline_run, tmp_path, dirs_exist_ok=True)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="pass --resume"):
        train_default.main(_pipeline(tmp_path, "--total-steps", "70"))
    assert train_default.main(_pipeline(tmp_path, "--total-steps", "70", "--resume")) == 0
    out = capsys.readouterr().out
    for stage in ("corpus", "tokenizer", "tokenize"):
        assert f"[{stage}] skipped" in out
    assert "resumed from" in out and "at step 60" in out
    stats = json.loads((tmp_path / "out" / "training_stats.json").read_text())
    assert stats["steps"] == 70


def test_entry_point_help_runs():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "editkv.engine.train_default", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--max-minutes" in result.stdout
    assert "--init-from" in result.stdout


def test_init_from_export_reuses_its_tokenizer_and_step(pipeline_run, tmp_path, capsys):
    from editkv.engine import train_default

    for name in ("stdlib", "site"):
        shutil.copytree(pipeline_run / name, tmp_path / name)
    exported = pipeline_run / "out"
    args = _pipeline(tmp_path, "--total-steps", "66", "--init-from", str(exported))
    assert train_default.main(args) == 0
    out = capsys.readouterr().out
    assert "copied from" in out and "continuing at step 60" in out
    assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").read_bytes() == (
        exported / "tokenizer.json").read_bytes()
    stats = json.loads((tmp_path / "out" / "training_stats.json").read_text())
    assert stats["steps"] == 66 and stats["val_loss"] < 0.5 * math.log(320)
