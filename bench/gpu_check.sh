#!/usr/bin/env bash
# The prepared GPU check, one device call on a bare H100/H200 (python3 with torch/transformers; megatron-core
# carried as wheels, docs/performance.md). Each part runs in its own process under its own time limit and
# OUT/gpu_check.json is rewritten after each part (bench/gpu_check.py):
#   (a) train     VAR training on CUDA/NCCL, bf16, distributed optimizer, shared-prefix reference with compiled
#                 FlexAttention, 20 steps on a fixed tiny batch: finite, decreasing loss, ref_policy_logp_gap at step 1
#   (b) matrices  [B, B]: FlexAttention shared prefix vs dense shared prefix vs naive, fp32 and bf16
#   (c) bench     tools/bench.py --preset llama3.2-1b (policy vs transformers, VAR/SFT, shared prefix vs naive)
#   (d) lengths   only with --parts ...,lengths: tools/bench.py --preset llama3.2-1b --lengths (lognormal lengths,
#                 real vs computed tokens, our VAR step vs a TRL-style one, packed attention); limit 180 s,
#                 outside the 6-minute budget
# Limits 90 + 60 + 180 s: under 6 minutes. --dry-run: tiny shapes, CPU without a GPU (< 1 minute; tested in the suite).
# Usage: bash bench/gpu_check.sh OUT_DIR [--dry-run] [--limit PART=SECONDS] [--parts train,matrices,bench,lengths]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [--dry-run]}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"$OUT/nvidia_smi.csv" 2>&1
$PY -m bench.gpu_check "$OUT" "$@"
