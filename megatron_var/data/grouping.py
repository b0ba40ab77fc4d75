"""Train/valid split and packing of samples into fixed groups of B, both deterministic given the seed.

The split is made over *units* (all samples of one source row) before packing, so a prompt never appears in
both splits (with ``--responses all`` one prompt yields several samples). Membership is fixed here, once, so
that rewards r(x_i, y_j) can be precomputed per group.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def split_units(
    unit_sizes: list[int], valid_fraction: float, group_size: int, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of units for (train, valid). Valid gets about ``valid_fraction`` of the groups (at least one
    when the fraction is positive and there are two or more groups), taken from a seeded shuffle of the units."""
    total_groups = sum(unit_sizes) // group_size
    n_valid = math.floor(valid_fraction * total_groups + 0.5)
    if valid_fraction > 0 and total_groups >= 2:
        n_valid = max(1, n_valid)
    n_valid = min(n_valid, max(total_groups - 1, 0))
    order = np.random.default_rng([seed, 0]).permutation(len(unit_sizes)).tolist()
    need, taken, valid = n_valid * group_size, 0, []
    for u in order:
        if taken >= need:
            break
        valid.append(u)
        taken += unit_sizes[u]
    valid_set = set(valid)
    train = [u for u in order if u not in valid_set]
    return sorted(train), sorted(valid)


def pack_groups(
    units: list[list[T]], group_size: int, seed: int, keep_units: bool = False
) -> tuple[list[list[T]], int]:
    """Shuffle samples with the seed and cut them into groups of ``group_size``; returns (groups, leftover).

    ``keep_units`` (DPO pairs): each unit already is one group (its samples in order); only the order of the
    groups is shuffled. Otherwise the leftover partial group (< group_size samples) is dropped and counted.
    """
    rng = np.random.default_rng([seed, 1])
    if keep_units:
        assert all(len(u) == group_size for u in units)
        return [units[k] for k in rng.permutation(len(units)).tolist()], 0
    samples = [s for u in units for s in u]
    order = rng.permutation(len(samples)).tolist()
    n_groups = len(samples) // group_size
    groups = [[samples[k] for k in order[g * group_size : (g + 1) * group_size]] for g in range(n_groups)]
    return groups, len(samples) - n_groups * group_size


def regroup(groups: list[list[T]], grouping: int, seed: int) -> list[list[T]]:
    """Grouping ``grouping`` (>= 1) of exactly the samples of ``groups`` (grouping 0): reshuffled with
    (seed, grouping) and cut into as many groups of the same size.

    Why the samples of grouping 0 and not all samples: then every grouping (one per epoch) trains on the same
    samples, each once, instead of each dropping another leftover partial group.
    """
    if grouping < 1:
        raise ValueError(f"grouping must be >= 1 (0 is the packed one), got {grouping}")
    if not groups:
        return []
    size = len(groups[0])
    samples = [s for g in groups for s in g]
    order = np.random.default_rng([seed, 2, grouping]).permutation(len(samples)).tolist()
    return [[samples[k] for k in order[g * size : (g + 1) * size]] for g in range(len(groups))]
