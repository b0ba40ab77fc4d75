#!/usr/bin/env bash
# Issue 9's GPU checks in one device call (a lent H100/H200; python3 with torch/transformers, megatron-core carried):
#   1. tools/bench.py --preset llama3.2-1b (policy step vs transformers, cross-pair scoring, VAR vs SFT step),
#   2. tests/unit/test_core_attention_gpu.py: the compiled FlexAttention path vs float64 attention on the GPU,
#   3. a short VAR training run on CUDA (NCCL, bf16, FlexAttention shared-prefix reference, --ref-cache off/on).
# About 4-6 minutes on an H100/H200 (the first FlexAttention call compiles its kernel).
# Usage: bash bench/gpu_check.sh OUT_DIR      (results: OUT_DIR/llama3.2-1b_<device>.json, *.log, metrics)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia_smi.csv" 2>&1
timeout "${BENCH_TIMEOUT:-300}" $PY tools/bench.py --preset llama3.2-1b --out-dir "$OUT" 2>&1 \
  | grep -v "main_grad.dtype" | tee "$OUT/bench.log" | grep "bench:\|Error\|error" | cut -c1-400
# the compiled FlexAttention / create_block_mask kernels vs float64 attention at several shapes (CPU tests run eager)
timeout "${GPU_TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/unit/test_core_attention_gpu.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "[gpu tests] rc=$? $(tail -n 1 "$OUT/gpu_tests.log")"
S=/tmp/var_gpu_smoke
rm -rf "$S"; mkdir -p "$S"
{
  $PY examples/tiny/make_tiny.py "$S" &&
  $PY tools/prepare_data.py --input "$S/train.jsonl" --tokenizer "$S/tokenizer" --template chat \
      --responses all --group-size 8 --seq-length 64 --output "$S/data" --no-progress &&
  $PY tools/score_rewards.py --data "$S/data" --split all --reward-fn examples/tiny/reward.py:score --no-progress &&
  for mode in online cached; do
    extra=(); [ "$mode" = cached ] && extra=(--ref-cache)
    timeout "${SMOKE_TIMEOUT:-60}" $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m megatron_var.train \
      --objective var --var-lambda 0.5 --data-path "$S/data" --model-arch "$S/model_arch.json" \
      --global-batch-size 2 --train-iters 8 --lr 1e-3 --lr-warmup-iters 1 --seed 7 --save "$S/$mode" "${extra[@]}"
    echo "[$mode] rc=$?"; cp "$S/$mode/metrics.jsonl" "$OUT/smoke_${mode}_metrics.jsonl"
  done
} 2>&1 | tee "$OUT/smoke.log" | tail -n 40
