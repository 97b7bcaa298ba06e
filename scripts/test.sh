#!/usr/bin/env bash
# The test command (README, and .ci/run calls exactly this): sets up .venv on a fresh clone,
# installs editkv with its test extras (CPU torch), lints, and runs the default test suite.
# Slow real-model runs are excluded by default (pytest -m slow runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# the setup takes ~4 GB (this venv and the wheel check's); say what there is, so a full disk reads as one
df -h . 2>/dev/null | awk 'NR==2 {print "scripts/test.sh: " $4 " free on " $6}' || true
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first and pinned, so pip takes the CPU wheel on disk instead of a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,gguf]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, pygls, triton, editkv.lsp_server.cli" # fail early if the install did not work
.venv/bin/ruff check __init__.py engine edit_cache kernels lsp_server bench tests vscode-extension/e2e
# a non-editable install of the wheel, in a fresh venv, answers `editkv complete` from elsewhere
bash scripts/check_wheel.sh
# --- lsp_server: headless Neovim for tests/lsp_server/test_neovim.py (skipped without nvim) ---
if ! command -v nvim >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  { $SUDO apt-get install -y -q neovim || { $SUDO apt-get update -q && $SUDO apt-get install -y -q neovim; }; } \
    >/dev/null 2>&1 || echo "scripts/test.sh: could not install neovim; its test will be skipped" >&2
fi
# --- end lsp_server block ---
# --- vscode-extension ---
# Build, lint and test the VS Code extension; its integration test runs .venv/bin/editkv.
if command -v npm >/dev/null 2>&1; then
  (
    cd vscode-extension
    npm ci --no-audit --no-fund --loglevel=error
    npm run -s build
    npm run -s lint
    EDITKV_COMMAND="$PWD/../.venv/bin/editkv" npm run -s test
  )
  # The extension in a real VS Code (code-server in Chromium, driven by Playwright) against the
  # real server: e2e/setup.sh installs Chromium, Node 24 and code-server (cached outside the
  # repository); the test skips, saying why, where they can't be installed.
  # (exit status 5: everything skipped at collection, e.g. no Playwright; the skip says why)
  EDITKV_COMMAND="$PWD/.venv/bin/editkv" .venv/bin/python -m pytest -q -rs -p no:cacheprovider vscode-extension/e2e \
    || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
else
  echo "scripts/test.sh: npm not found; skipping the VS Code extension (vscode-extension/)" >&2
fi
# --- end vscode-extension ---
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q "$@"
