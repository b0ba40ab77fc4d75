"""Group order across epochs and data-parallel ranks, and policy micro-batches built from groups.

Why consumed-groups bookkeeping instead of per-rank iterators: resuming (even at another DP size) continues the same
global order — a known failure elsewhere is data replayed or reordered after resume. Group order is reshuffled each
epoch with (seed, epoch); group membership is fixed by data preparation (so rewards could be precomputed).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_var.data.cross_pairs import build_diagonal


def global_order(num_groups: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_groups)


def step_groups(num_groups: int, seed: int, consumed: int, global_batch: int, dp_rank: int, dp_size: int
                ) -> list[int]:
    """Group indices of this DP rank for the step that starts after ``consumed`` groups (contiguous DP slices)."""
    per_rank = global_batch // dp_size
    out = []
    for k in range(consumed + dp_rank * per_rank, consumed + (dp_rank + 1) * per_rank):
        epoch, pos = divmod(k, num_groups)
        out.append(int(global_order(num_groups, seed, epoch)[pos]))
    return out


def policy_microbatch(groups: list, pad_id: int, pad_to_multiple_of: int = 1, seq_length=None) -> dict:
    """Rows [x_i; y_i] of every sample of ``groups`` (group-major) as one schedule micro-batch."""
    prompts = [p for g in groups for p in g.prompt_ids]
    responses = [r for g in groups for r in g.response_ids]
    d = build_diagonal(prompts, responses, pad_id, pad_to_multiple_of=pad_to_multiple_of, seq_length=seq_length)
    return {"tokens": d.tokens, "labels": d.labels, "loss_mask": d.loss_mask, "position_ids": None,
            "attention_mask": None, "cross": d, "num_groups": len(groups)}


def uniform_microbatches(micro_groups: list[list], pad_id: int, pad_to_multiple_of: int, same_length: bool
                         ) -> list[dict]:
    """Policy micro-batches; under pipeline parallelism all share one length (megatron's fixed p2p shapes)."""
    batches = [policy_microbatch(g, pad_id, pad_to_multiple_of) for g in micro_groups]
    if same_length and len({b["tokens"].shape for b in batches}) > 1:
        longest = max(b["tokens"].size(1) for b in batches)
        batches = [policy_microbatch(g, pad_id, pad_to_multiple_of, seq_length=longest) for g in micro_groups]
    return batches


def rewards_tensor(groups: list) -> torch.Tensor:
    """[G, B, B] float32 reward matrices (the loader has already refused missing/non-finite ones)."""
    return torch.stack([torch.as_tensor(g.rewards, dtype=torch.float32) for g in groups])
