#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317  # after `exit` comes the Python tail torchrun runs
# Tiny VAR run on CPU (gloo), TP=2 — the embedded default; runs on a 2-core laptop in a few minutes.
# Hardware assumed: any CPU, no GPU. Layout: TP=2 PP=1 DP=1 (2 processes).
# Stages: bundled counting task -> prepare_data (groups of 8) -> score_rewards (programmatic reward) ->
#         megatron_var.train --objective var (a run already in OUT/ckpt is resumed; rm -rf OUT to start afresh).
# Run it either way:  bash examples/var_tiny_cpu.sh [trainer flags]
#                     torchrun --nproc_per_node 2 examples/var_tiny_cpu.sh [trainer flags]   (from the venv)
# Env: OUT (default runs/var_tiny_cpu, relative to the repository), NPROC (bash mode, default 2), TRAIN_ITERS (20).
""":" # bash runs the lines up to `exit`; Python (torchrun examples/X.sh) sees a string
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
[ "${MEGATRON_VAR_PRINT_ARGS:-}" = 1 ] || bash scripts/setup_env.sh  # torchrun mode already runs in the venv
PY=${PYTHON:-.venv/bin/python}
OUT=$(realpath -m "${OUT:-runs/var_tiny_cpu}")
prepare() {  # task, tokenizer, groups of 8 and their rewards, once; every torchrun rank calls it
  [ ! -f "$OUT/.prepared" ] || return 0
  # one process does all of it: score_rewards would otherwise take this rank's share of a torchrun world
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  "$PY" examples/tiny/make_tiny.py "$OUT" >&2
  "$PY" tools/prepare_data.py --input "$OUT/train.jsonl" --tokenizer "$OUT/tokenizer" --template chat \
      --responses all --group-size 8 --seq-length 64 --output "$OUT/data" --overwrite --no-progress >&2
  "$PY" tools/score_rewards.py --data "$OUT/data" --split all --reward-fn examples/tiny/reward.py:score \
      --no-progress >&2
  touch "$OUT/.prepared"
}
mkdir -p "$OUT"
( flock 9; prepare ) 9>"$OUT/.prepare.lock"
export DATA_DIR="$OUT/data" SAVE_DIR="$OUT/ckpt" GPUS_PER_NODE="${NPROC:-2}" TORCHRUN="$PY -m torch.distributed.run"
source examples/_launch.sh
launch --objective var --var-lambda 0.5 --model-arch "$OUT/model_arch.json" --tensor-model-parallel-size 2 \
    --micro-batch-size 1 --global-batch-size 2 --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3 --lr-warmup-iters 2 \
    --save-interval 10 -- "$@"
exit
":"""
import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank
