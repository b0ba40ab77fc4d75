#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # after `exit` comes the Python tail torchrun runs
# VAR on Llama-2-13B (paper: B=8, AdamW, cosine LR 5e-6, 2 epochs).
# Hardware: 1 node of 8x A100/H100-80GB; layout TP=4 PP=2 (DP=1), bf16, distributed optimizer, full activation
# recomputation; global batch 16 groups of 8 (micro-batch 1 group x 16 accumulation).
# Data: DATA_DIR from tools/prepare_data.py --group-size 8 + tools/score_rewards.py (OffsetBias-RM).
# Sequence length: prepare_data --seq-length 2048 (prompt + response); `megatron-var-memory` estimates
# other lengths/layouts (docs/performance.md, "Will my layout fit?").
""":" # bash runs the lines up to `exit`; Python (torchrun examples/X.sh) sees a string
source "$(dirname "$0")/_launch.sh"
launch --objective var --var-lambda 1.0 --micro-batch-size 1 --epochs 2 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 --save-interval-mins 30 --log-interval 10 --lr 5e-6 --min-lr 0 --global-batch-size 16 --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --sequence-parallel --recompute-granularity full -- "$@"
exit
":"""
import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank
