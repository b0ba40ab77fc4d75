#!/usr/bin/env bash
# DPO on Llama-3.1-8B (the paper's DPO baseline; beta 0.1).
# Hardware: 1 node of 8x H100-80GB; layout TP=2 DP=4, bf16; global batch 64 pairs.
# Data: prepare_data --responses pairs (groups of 2: chosen, rejected).
source "$(dirname "$0")/_launch.sh"
launch --objective dpo --dpo-beta 0.1 --micro-batch-size 4 --global-batch-size 64 --epochs 2 --lr 5e-7 --lr-warmup-iters 10 --tensor-model-parallel-size 2 --sequence-parallel --save-interval 200 --log-interval 10
