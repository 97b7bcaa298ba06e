"""Training pipeline of editkv's embedded default code model.

corpus.py   permissively licensed Python files -> document stores + licence manifest
bpe.py      documents -> byte-level BPE tokenizer whose tokens never cross a line break
data.py     documents + tokenizer -> packed uint16 token streams (with fill-in-the-middle)
train.py    token streams -> Llama weights (time-budgeted, resumable)
export.py   weights -> Hugging Face folder (bf16 safetensors) and a transfer pack

`python -m editkv.engine.train_default` runs the stages in order. Nothing in the serving path
imports this package.
"""
