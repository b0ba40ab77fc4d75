#!/usr/bin/env bash
# Tiny VAR run on CPU (gloo), TP=2 — the embedded default; runs on a 2-core laptop in a few minutes.
# Hardware assumed: any CPU, no GPU. Layout: TP=2 PP=1 DP=1 (2 processes).
# Stages: bundled counting task -> prepare_data (groups of 8) -> score_rewards (programmatic reward) ->
#         torchrun megatron_var.train --objective var.
# Env: OUT (default runs/var_tiny_cpu), NPROC (default 2), TRAIN_ITERS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
OUT=${OUT:-runs/var_tiny_cpu}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
rm -rf "$OUT"; mkdir -p "$OUT"
$PY examples/tiny/make_tiny.py "$OUT"
$PY tools/prepare_data.py --input "$OUT/train.jsonl" --tokenizer "$OUT/tokenizer" --template chat \
    --responses all --group-size 8 --seq-length 64 --output "$OUT/data" --no-progress
$PY tools/score_rewards.py --data "$OUT/data" --split all --reward-fn examples/tiny/reward.py:score --no-progress
$PY -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --standalone -m megatron_var.train \
    --objective var --var-lambda 0.5 --data-path "$OUT/data" --model-arch "$OUT/model_arch.json" \
    --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 2 \
    --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3 --lr-warmup-iters 2 --save "$OUT/ckpt" --save-interval 10
echo "metrics: $OUT/ckpt/metrics.jsonl"
