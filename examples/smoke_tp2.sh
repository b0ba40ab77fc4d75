#!/usr/bin/env bash
# Embedded default until the full demo lands: a TP=2 training smoke run on CPU (gloo), 2 processes, ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 examples/smoke_tp2.py
