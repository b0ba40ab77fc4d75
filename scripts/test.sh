#!/usr/bin/env bash
# The test command: installs what it needs, checks the layer contracts (import-linter, pyproject.toml), then runs the
# whole suite (unit + 4-rank gloo distributed suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
