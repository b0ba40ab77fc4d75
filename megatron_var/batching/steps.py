"""Group order across epochs and data-parallel ranks, and policy micro-batches built from groups.

Why consumed-groups bookkeeping instead of per-rank iterators: the position is one global count, so resuming (even at
another DP size) continues the same global order instead of replaying or reordering groups. Group order is reshuffled each
epoch with (seed, epoch); group membership is fixed by data preparation (so rewards could be precomputed), one
grouping per epoch when the data has several (``prepare_data --regroup-epochs N``: epoch e reads grouping e % N).

``consumed`` is a position in the stream of epochs (epoch = consumed // G). A step never spans two epochs: when the
rest of an epoch is shorter than a global batch, that tail is skipped (as drop_last; counted in the metrics) and
the step starts the next epoch. Why: with one grouping a step across the boundary could hold the same group twice
(the end of epoch e's order and the start of epoch e+1's), and with several it would hold a sample twice.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_var.batching.pairs import PairBatch, build_diagonal


def global_order(num_groups: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_groups)


def check_batch_fits(num_groups: int, global_batch: int) -> None:
    """One-line error when one step would need more groups than an epoch has (it would repeat groups)."""
    if global_batch > num_groups:
        raise ValueError(f"--global-batch-size {global_batch} is larger than the {num_groups} training groups of one "
                         "epoch: a step would hold a group twice; lower it or prepare more data")


def step_start(consumed: int, global_batch: int, num_groups: int) -> int:
    """Where the step after ``consumed`` groups starts: ``consumed``, or the start of the next epoch when fewer than
    ``global_batch`` groups are left in this one (they are skipped: ``step_start - consumed`` of them)."""
    check_batch_fits(num_groups, global_batch)
    epoch, pos = divmod(consumed, num_groups)
    return consumed if pos + global_batch <= num_groups else (epoch + 1) * num_groups


def step_groups(num_groups: int, seed: int, consumed: int, global_batch: int, dp_rank: int, dp_size: int,
                num_groupings: int = 1) -> list[int]:
    """Group indices of this DP rank for the step that starts after ``consumed`` groups (contiguous DP slices).

    ``num_groups`` is G, the groups of one epoch (of one grouping). With ``num_groupings`` N the indices address
    all groupings as one sequence (``groups.EpochGroupings``): ``(epoch % N) * G + k``.
    """
    epoch, pos = divmod(step_start(consumed, global_batch, num_groups), num_groups)
    order = global_order(num_groups, seed, epoch)
    base = (epoch % num_groupings) * num_groups
    per_rank = global_batch // dp_size
    return [base + int(order[k]) for k in range(pos + dp_rank * per_rank, pos + (dp_rank + 1) * per_rank)]


def policy_pairs(groups: list, pad_id: int, pad_to_multiple_of: int = 1, seq_length=None) -> PairBatch:
    """Rows [x_i; y_i] of every sample of ``groups`` (group-major cells), right-padded."""
    prompts = [p for g in groups for p in g.prompt_ids]
    responses = [r for g in groups for r in g.response_ids]
    return build_diagonal(prompts, responses, pad_id, pad_to_multiple_of=pad_to_multiple_of, seq_length=seq_length)


def group_tokens(group) -> int:
    """Σ |x_i| + |y_i|: the tokens of a group's policy rows without padding."""
    return sum(len(x) + len(y) for x, y in zip(group.prompt_ids, group.response_ids))


def split_by_tokens(groups: list, max_tokens: int) -> list[list]:
    """Consecutive runs of whole groups with at most ``max_tokens`` policy tokens each (a larger group alone): the
    micro-batches of ``--max-tokens-per-micro-batch``. Whole groups, so a DPO pair or a VAR group never splits."""
    out: list[list] = []
    used = 0
    for g in groups:
        n = group_tokens(g)
        if not out or used + n > max_tokens:
            out.append([])
            used = 0
        out[-1].append(g)
        used += n
    return out


def rewards_tensor(groups: list) -> torch.Tensor:
    """[G, B, B] float32 reward matrices (the loader has already refused missing/non-finite ones)."""
    return torch.stack([torch.as_tensor(g.rewards, dtype=torch.float32) for g in groups])
