"""Export: trained weights -> a Hugging Face model folder, and a pack for moving it.

`export_model`: fp32 model -> folder with config.json (LlamaForCausalLM, bfloat16),
generation_config.json, bf16 safetensors shards + index (the tied embedding stored once),
the tokenizer files, corpus_manifest.json and training_stats.json. It loads with
`LlamaForCausalLM.from_pretrained` and with engine.loading.

`pack_folder` / `unpack_folder`: the device machine hands back at most 8 files of at most
16 MiB each, and the embedding alone is 16 MiB. A pack holds the weights in files under
16 MiB (tensors over that split by rows) and everything else in one bundle.json;
unpacking rebuilds the folder, tensor for tensor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from editkv.engine.training.corpus import write_json
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

SHARD_SIZE = "15MB"
PACK_FILE_BYTES = 16 * 2**20 - 2**16  # 16 MiB less room for the safetensors header
PACK_FORMAT = "editkv-pack-1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_model(
    model: LlamaForCausalLM, out: Path, tokenizer_dir: Path, documents: dict[str, object]
) -> list[Path]:
    """Write the HF folder `out`; `documents` are extra JSON files (name -> object)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    bf16 = copy.deepcopy(model).to("cpu", dtype=torch.bfloat16)
    bf16.save_pretrained(str(out), max_shard_size=SHARD_SIZE)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"  # transformers 5 writes "dtype"; older readers want this
    write_json(out / "config.json", config)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    for name, obj in documents.items():
        write_json(out / name, obj)
    return sorted(out.iterdir())


def pack_folder(folder: Path, dest: Path) -> list[Path]:
    """Pack a model folder into <= 8 files of <= 16 MiB under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    pieces: list[tuple[str, torch.Tensor]] = []
    split: dict[str, list[str]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            shards[shard.name] = sorted(f.keys())
        for name, tensor in sorted(load_file(str(shard)).items()):
            row_bytes = tensor[0].numel() * tensor.element_size() if tensor.dim() else 0
            if tensor.numel() * tensor.element_size() <= PACK_FILE_BYTES or row_bytes == 0:
                pieces.append((name, tensor))
                continue
            rows = max(1, PACK_FILE_BYTES // row_bytes)
            split[name] = [f"{name}#{i}" for i in range(0, tensor.shape[0], rows)]
            pieces += [(f"{name}#{i}", tensor[i:i + rows].contiguous())
                       for i in range(0, tensor.shape[0], rows)]
    groups: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in pieces:
        size = tensor.numel() * tensor.element_size()
        if groups[-1] and used + size > PACK_FILE_BYTES:
            groups.append({})
            used = 0
        groups[-1][key] = tensor
        used += size
    weights = []
    for i, group in enumerate(groups):
        name = f"weights-{i + 1:02d}.safetensors"
        save_file(group, str(dest / name))
        weights.append(name)
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix != ".safetensors"}
    bundle = {"format": PACK_FORMAT, "files": files, "shards": shards, "split": split,
              "weights": weights}
    write_json(dest / "bundle.json", bundle)
    out = [dest / "bundle.json", *(dest / w for w in weights)]
    if len(out) > 8 or any(p.stat().st_size > 16 * 2**20 for p in out):
        raise RuntimeError(f"pack of {folder} does not fit 8 files of 16 MiB: "
                           f"{[(p.name, p.stat().st_size) for p in out]}")
    return out


def unpack_folder(pack: Path, out: Path) -> list[Path]:
    """Rebuild the model folder that `pack_folder` packed into `pack`."""
    bundle = json.loads((pack / "bundle.json").read_text(encoding="utf-8"))
    if bundle.get("format") != PACK_FORMAT:
        raise ValueError(f"{pack}/bundle.json is not an {PACK_FORMAT} pack")
    tensors: dict[str, torch.Tensor] = {}
    for name in bundle["weights"]:
        tensors.update(load_file(str(pack / name)))
    for name, keys in bundle["split"].items():
        tensors[name] = torch.cat([tensors.pop(k) for k in keys])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in bundle["files"].items():
        (out / name).write_text(text, encoding="utf-8")
    for shard, names in bundle["shards"].items():
        save_file({n: tensors[n] for n in names}, str(out / shard), metadata={"format": "pt"})
    return sorted(out.iterdir())
