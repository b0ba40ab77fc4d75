#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # after `exit` comes the Python tail torchrun runs
# DPO on Llama-3.1-8B (the paper's DPO baseline; beta 0.1).
# Hardware: 1 node of 8x H100-80GB; layout TP=2 DP=4, bf16, full activation recomputation; global batch 64 pairs.
# Sequence length: prepare_data --seq-length 2048 (prompt + response); `megatron-var-memory` estimates
# other lengths/layouts (docs/performance.md, "Will my layout fit?").
# Data: prepare_data --responses pairs (groups of 2: chosen, rejected).
""":" # bash runs the lines up to `exit`; Python (torchrun examples/X.sh) sees a string
source "$(dirname "$0")/_launch.sh"
launch --objective dpo --dpo-beta 0.1 --micro-batch-size 4 --global-batch-size 64 --epochs 2 --lr 1e-5 --lr-warmup-iters 10 --tensor-model-parallel-size 2 --sequence-parallel --recompute-granularity full --save-interval-mins 30 --log-interval 10 -- "$@"
exit
":"""
import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank
