#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # after `exit` comes the Python tail torchrun runs
# VAR on Qwen2.5-32B, multi-node (paper: B=8, cosine LR 5e-6, 2 epochs).
# Hardware: 4 nodes x 8x H100-80GB (see examples/slurm/var_multinode.sbatch); layout TP=8 PP=2 DP=2, bf16,
# distributed optimizer, full activation recomputation, reference weights offloaded to CPU between uses;
# global batch 16 groups.
# Sequence length: prepare_data --seq-length 2048 (prompt + response); `megatron-var-memory` estimates
# other lengths/layouts (docs/performance.md, "Will my layout fit?").
""":" # bash runs the lines up to `exit`; Python (torchrun examples/X.sh) sees a string
source "$(dirname "$0")/_launch.sh"
launch --objective var --var-lambda 1.0 --micro-batch-size 1 --epochs 2 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 --save-interval-mins 30 --log-interval 10 --lr 5e-6 --min-lr 0 --global-batch-size 16 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 --sequence-parallel --recompute-granularity full --ref-offload -- "$@"
exit
":"""
import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank
