"""Where the frozen reference's values come from during training: one interface, three sources.

Why an interface: the trainer asks "the reference values of these groups" once per step and does not care whether
they are computed now by frozen weights in the policy's layout (``OnlineReference``, optionally parked on the CPU
between steps: ``offload``) or read from a table scored once before training (``CachedReference``,
``--ref-cache``). Values come per group and only on the last pipeline stage (where the loss runs; ``None``
elsewhere): a [B, B] matrix log pi_ref(y_j | x_i) for kind ``"cross"`` (VAR), a [B] vector log pi_ref(y_i | x_i)
for ``"diagonal"`` (DPO, A-LoL).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_var.reference import cache as reference_cache
from megatron_var.reference.online import FrozenReference

Kind = Literal["cross", "diagonal"]


class ReferenceSource:
    """The reference values of groups; ``computed_tokens``: tokens the last call ran through a model (padding
    included), for throughput accounting."""

    kind: Kind
    computed_tokens: int = 0

    def values(self, groups: Sequence) -> Optional[list[torch.Tensor]]:
        raise NotImplementedError


class OnlineReference(ReferenceSource):
    """Scores the groups now with frozen weights in the policy's TP/PP layout (``FrozenReference``)."""

    def __init__(self, frozen: FrozenReference, kind: Kind, reduction: str):
        self.frozen, self.kind, self.reduction = frozen, kind, reduction

    def values(self, groups):
        prompts, responses = [g.prompt_ids for g in groups], [g.response_ids for g in groups]
        score = self.frozen.score_cross_pairs if self.kind == "cross" else self.frozen.score_diagonal
        out = score(prompts, responses, self.reduction)
        self.computed_tokens = self.frozen.last_computed_tokens
        return out


class CachedReference(ReferenceSource):
    """Reads the values scored once before training (``reference/cache.py``); no reference weights are held."""

    def __init__(self, table: dict[int, torch.Tensor], kind: Kind):
        self.table, self.kind = table, kind

    def values(self, groups):
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return [self.table[g.group_id] for g in groups]


def build_reference_source(kind: Kind, reduction: str, load_frozen: Callable[[], FrozenReference], *,
                           cache_dirs: Optional[Sequence[Optional[str]]] = None, cache_meta: Optional[dict] = None,
                           dataset: Optional[Sequence] = None) -> ReferenceSource:
    """A cached source when ``cache_dirs`` is given (reused from the first directory holding a cache built for
    ``cache_meta``, else scored now with ``load_frozen()`` and saved to ``cache_dirs[0]``), else an online one."""
    if cache_dirs is None:
        return OnlineReference(load_frozen(), kind, reduction)
    table = reference_cache.load_or_build(cache_dirs, cache_meta, load_frozen, dataset, reduction=reduction,
                                          kind=kind)
    return CachedReference(table, kind)
