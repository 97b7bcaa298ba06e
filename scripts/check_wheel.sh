#!/usr/bin/env bash
# What a user gets from a non-editable install: build editkv's wheel, install it into a fresh
# venv (CPU torch first, then the wheel with its dependencies at the newest releases
# pyproject allows), and run `editkv complete` on a small file from a temporary directory,
# with the embedded default model the wheel carries. scripts/test.sh runs this before pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP=(--disable-pip-version-check -q --no-cache-dir)  # no second copy of the wheels in the pip cache
quiet() { grep -v "is ignored" || true; }

.venv/bin/python -m pip wheel "${PIP[@]}" --no-deps -w "$WORK/dist" . 2>&1 | quiet
WHEEL="$(ls "$WORK"/dist/editkv-*.whl)"
# one import root: nothing but editkv/ and the dist-info at the top of the wheel
.venv/bin/python - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names}
extra = {t for t in top if t != "editkv" and not t.endswith(".dist-info")}
assert not extra, f"the wheel installs more than editkv: {sorted(extra)}"
for need in ("editkv/__init__.py", "editkv/kernels/rerotate.py", "editkv/engine/default_model/config.json",
             "editkv/engine/default_model/tokenizer.json", "editkv/lsp_server/examples/inventory.py"):
    assert need in names, f"the wheel lacks {need}"
assert any(n.startswith("editkv/engine/default_model/") and n.endswith(".safetensors") for n in names)
# every module of the source tree is in the wheel (a new subpackage must be listed in pyproject.toml)
import pathlib
for folder in ("kernels", "engine", "edit_cache", "lsp_server"):
    for path in pathlib.Path(folder).rglob("*.py"):
        assert f"editkv/{path.as_posix()}" in names, f"the wheel lacks editkv/{path.as_posix()}"
print(f"check_wheel: {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, top level {sorted(top)}")
PY

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install "${PIP[@]}" "torch==2.13.0" 2>&1 | quiet
"$WORK/venv/bin/python" -m pip install "${PIP[@]}" "$WHEEL" 2>&1 | quiet
"$WORK/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE "^(editkv|torch|transformers|kernels|tokenizers|pygls) " | tr -s ' ' | paste -sd ';' \
  | sed 's/^/check_wheel: installed: /'

mkdir -p "$WORK/run"
cat > "$WORK/run/small.py" <<'PY'
def mean(values):
    total = 0
    for value in values:
        total += value
    return total /
PY
# from another directory, with no path into the checkout: only the installed wheel can answer
( cd "$WORK/run" && env -u PYTHONPATH "$WORK/venv/bin/editkv" complete small.py --line 5 --col 19 --max-tokens 8 --device cpu --json ) \
  > "$WORK/complete.out" 2>&1 || { cat "$WORK/complete.out"; echo "check_wheel: editkv complete failed" >&2; exit 1; }
# the answer came from the default model inside the installed wheel, not from the checkout
"$WORK/venv/bin/python" - "$WORK/complete.out" "$WORK/venv" <<'PY'
import json, sys
out = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert out["model"].startswith(sys.argv[2]) and out["model"].endswith("editkv/engine/default_model"), out["model"]
assert out["prefill_tokens"] > 0 and out["decode_tokens"] > 0, out
PY
( cd "$WORK/run" && env -u PYTHONPATH "$WORK/venv/bin/python" -c "
import editkv, kernels, transformers
from kernels import CUDAProperties
assert editkv.__file__.startswith('$WORK/venv'), editkv.__file__
print('check_wheel: editkv from', editkv.__file__.rsplit('/site-packages/', 1)[-1], '| HF kernels', kernels.__file__.rsplit('/site-packages/', 1)[-1])
" )
sed 's/^/check_wheel: complete: /' "$WORK/complete.out" | head -20
