#!/bin/bash
# Run one command per srun task with torchrun's rank variables taken from SLURM's, for tools that need no
# process group (tools/score_rewards.py splits its work by RANK / WORLD_SIZE and uses cuda:LOCAL_RANK).
set -euo pipefail
export RANK="${SLURM_PROCID:?run me under srun}" WORLD_SIZE="${SLURM_NTASKS:?run me under srun}"
export LOCAL_RANK="${SLURM_LOCALID:-0}"
exec "$@"
