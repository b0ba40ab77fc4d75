#!/usr/bin/env bash
# Shared by the example scripts. Two ways to run a script (see docs/cluster.md):
#   bash examples/X.sh [trainer flags]             launches torchrun itself (one launcher per node)
#   torchrun [torchrun flags] examples/X.sh [...]  torchrun runs the file in every rank; each rank trains with the
#                                                   script's settings (the file's Python tail asks this script for
#                                                   the trainer's argv with MEGATRON_VAR_PRINT_ARGS=1)
# Variables:
#   NNODES (1) NODE_RANK (0) MASTER_ADDR (localhost) MASTER_PORT (29500) GPUS_PER_NODE (8)   bash mode only
#   DATA_DIR  prepared data (tools/prepare_data.py + tools/score_rewards.py)      [required]
#   LOAD_DIR  megatron_var checkpoint to start from (hf_to_megatron.py)           [required unless the script
#             gives --model-arch]
#   SAVE_DIR  checkpoints, metrics.jsonl; a run already there is resumed          [required]
#   REF_LOAD  reference checkpoint (default: LOAD_DIR, the policy's start)
#   EXTRA_ARGS  more megatron_var.train flags (after the script's own); flags given to the script come
#             last: a later flag wins over an earlier one
#   TORCHRUN  the launcher command (default: torchrun)
set -euo pipefail
require() { for v in "$@"; do if [ -z "${!v:-}" ]; then echo "error: set $v (see the header of $0)" >&2; exit 2; fi; done; }
require DATA_DIR SAVE_DIR
[ -d "$DATA_DIR" ] || { echo "error: DATA_DIR=$DATA_DIR is not a directory" >&2; exit 2; }
[ -z "${LOAD_DIR:-}" ] || [ -d "$LOAD_DIR" ] || { echo "error: LOAD_DIR=$LOAD_DIR is not a directory" >&2; exit 2; }
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
launch() {
  local start=()
  # resume the run in SAVE_DIR when it holds a checkpoint, else start from LOAD_DIR's weights
  if [ -f "$SAVE_DIR/latest_checkpointed_iteration.txt" ]; then
    start=(--load "$SAVE_DIR" ${REF_LOAD:+--ref-load "$REF_LOAD"})
    [ -n "${REF_LOAD:-}" ] || [ -z "${LOAD_DIR:-}" ] || start+=(--ref-load "$LOAD_DIR")
  elif [ -n "${LOAD_DIR:-}" ]; then
    start=(--load "$LOAD_DIR" --finetune ${REF_LOAD:+--ref-load "$REF_LOAD"})
  fi
  # launch SCRIPT_FLAGS -- USER_FLAGS: later flags win, so the order is script, EXTRA_ARGS, the user's
  local script=() extra=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do script+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  # shellcheck disable=SC2206  # EXTRA_ARGS is a whitespace-separated flag list by convention
  extra=(${EXTRA_ARGS:-})
  local argv=(--data-path "$DATA_DIR" --save "$SAVE_DIR" "${start[@]}" "${script[@]}" "${extra[@]}" "$@")
  if [ "${MEGATRON_VAR_PRINT_ARGS:-}" = 1 ]; then  # torchrun mode: hand the argv to the rank, NUL-separated
    printf '%s\0' "${argv[@]}"
    exit 0
  fi
  # SLURM signals every process of the step: the training ranks handle SIGTERM/SIGUSR1 (finish the iteration,
  # save, exit 0); torchrun's agent ignores both, or it would die of SIGUSR1 or kill the ranks before they saved
  trap '' USR1 TERM
  # shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
  exec ${TORCHRUN:-torchrun} --signals_to_handle SIGINT,SIGHUP,SIGQUIT --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m megatron_var.train "${argv[@]}"
}
