#!/usr/bin/env bash
# Shared by the example scripts: checks the env vars they need and launches torchrun from the standard
# multi-node variables (see docs/cluster.md):
#   NNODES (1) NODE_RANK (0) MASTER_ADDR (localhost) MASTER_PORT (29500) GPUS_PER_NODE (8)
#   DATA_DIR  prepared data (tools/prepare_data.py + tools/score_rewards.py)      [required]
#   LOAD_DIR  megatron_var checkpoint (checkpoints_convert/hf_to_megatron.py)     [required]
#   SAVE_DIR  where checkpoints, metrics.jsonl and TensorBoard logs go            [required]
#   REF_LOAD  reference checkpoint (default: LOAD_DIR, the policy's start)
#   EXTRA_ARGS  more megatron_var.train flags
set -euo pipefail
require() { for v in "$@"; do if [ -z "${!v:-}" ]; then echo "error: set $v (see the header of $0)" >&2; exit 2; fi; done; }
require DATA_DIR LOAD_DIR SAVE_DIR
[ -d "$DATA_DIR" ] || { echo "error: DATA_DIR=$DATA_DIR is not a directory" >&2; exit 2; }
[ -d "$LOAD_DIR" ] || { echo "error: LOAD_DIR=$LOAD_DIR is not a directory" >&2; exit 2; }
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
launch() {
  local resume=()
  # resume from SAVE_DIR when it already holds a checkpoint, else start from LOAD_DIR's weights
  if [ -f "$SAVE_DIR/latest_checkpointed_iteration.txt" ]; then resume=(--load "$SAVE_DIR" --ref-load "${REF_LOAD:-$LOAD_DIR}");
  else resume=(--load "$LOAD_DIR" --finetune ${REF_LOAD:+--ref-load "$REF_LOAD"}); fi
  # SLURM signals every process of the step: the training ranks handle SIGTERM/SIGUSR1 (finish the iteration,
  # save, exit 0); torchrun's agent ignores both, or it would die of SIGUSR1 or kill the ranks before they saved
  trap '' USR1 TERM
  # shellcheck disable=SC2086
  exec torchrun --signals_to_handle SIGINT,SIGHUP,SIGQUIT \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m megatron_var.train \
    --data-path "$DATA_DIR" --save "$SAVE_DIR" "${resume[@]}" "$@" ${EXTRA_ARGS:-}
}
