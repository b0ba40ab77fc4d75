#!/usr/bin/env bash
# The embedded default, end to end on CPU (2 processes, TP=2, gloo), ~6 minutes on 2 cores:
# tiny Llama + bundled instruction task -> hf_to_megatron -> prepare_data + score_rewards -> SFT -> SFT+VAR,
# SFT+DPO and SFT+A-LoL -> megatron_to_hf -> eval_reward on held-out prompts (3 sampling seeds) -> table,
# summary.json, PNG.
# Env: WORK_DIR (default runs/demo), SEED (default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m megatron_var.demo.run --work-dir "${WORK_DIR:-runs/demo}" --seed "${SEED:-0}" "$@"
