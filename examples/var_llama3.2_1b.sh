#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # after `exit` comes the Python tail torchrun runs
# VAR on Llama-3.2-1B (tied embeddings; paper: B=8, cosine LR 1e-5, 2 epochs).
# Hardware: 1 node of 8x H100-80GB (~61 GiB per GPU at 2k tokens); layout TP=1 PP=1 DP=8; global batch 16 groups.
# Sequence length: prepare_data --seq-length 2048 (prompt + response); `megatron-var-memory` estimates
# other lengths/layouts (docs/performance.md, "Will my layout fit?").
""":" # bash runs the lines up to `exit`; Python (torchrun examples/X.sh) sees a string
source "$(dirname "$0")/_launch.sh"
launch --objective var --var-lambda 1.0 --micro-batch-size 1 --epochs 2 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 --save-interval-mins 30 --log-interval 10 --lr 1e-5 --min-lr 0 --global-batch-size 16 -- "$@"
exit
":"""
import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank
