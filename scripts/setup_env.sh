#!/usr/bin/env bash
# Creates .venv from Python 3.12 (found directly or through pyenv) and installs megatron_var with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=$(pyenv versions --bare | grep '^3\.12' | tail -n1) pyenv which python3.12 2>/dev/null)" ~/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  echo "error: Python 3.12 not found (megatron-core 0.19 needs it); install it or put python3.12 on PATH" >&2
  return 1
}
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"
