"""The frozen reference policy: same architecture and TP/PP/VPP layout as the policy, forward-only.

Why the same layout: the reference shares the policy's ranks, so its [B, B] cross-pair scores come out on the
policy's last pipeline stage — exactly where the VAR loss needs them — with no resharding, through the same
``forward_step`` and vocab-parallel log-prob code as the policy, so reference and policy cannot disagree on how a
log-prob is computed (checked every step: ``objectives/ref_gap.py``). No DDP wrapper, no gradients, no optimizer
state; optionally parked on the CPU between uses.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Literal, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_var.batching.pairs import PairBatch, build_cross_pairs, build_diagonal, split_cells
from megatron_var.checkpoint.io import load_model
from megatron_var.models.arch import ModelArch
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.runtime.engine import run_schedule
from megatron_var.runtime.forward_step import make_forward_step
from megatron_var.runtime.microbatches import as_microbatch, reference_pairs
from megatron_var.runtime.parallel import ParallelConfig

logger = logging.getLogger(__name__)

Method = Literal["shared_prefix", "naive"]


def _matrix_reduce(reduction: str):
    def reduce_fn(token_logps: torch.Tensor, batch: dict):
        cross: PairBatch = batch["cross"]
        matrix = cross.reduce(token_logps.detach(), reduction)
        zero = token_logps.sum() * 0.0
        return zero, torch.tensor(1, dtype=torch.int, device=zero.device), {"matrix": matrix}

    return reduce_fn


class FrozenReference:
    """Scores cross pairs (VAR) or the diagonal (DPO) of each group with frozen model chunks."""

    def __init__(self, chunks: list[torch.nn.Module], vocab_size: int, pad_id: int, *,
                 method: Method = "shared_prefix", offload: bool = False, pad_to_multiple_of: int = 1,
                 pack: bool = True, row_tokens: Optional[int] = None):
        self.chunks = chunks
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.method = method
        self.offload = offload and torch.cuda.is_available()
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = pack
        """Pack the groups' rows together (``runtime.microbatches.reference_pairs``); the matrices are the same
        either way."""
        self.row_tokens = row_tokens
        """Packed rows of up to this many tokens, one per micro-batch (``--max-tokens-per-micro-batch``)."""
        for chunk in chunks:
            chunk.eval()
            for p in chunk.parameters():
                p.requires_grad_(False)
        if self.offload:
            self._move("cpu")
        self.last_computed_tokens = 0
        """Tokens (padding included) the last scoring call ran through the model on this rank."""

    def _move(self, device) -> None:
        for chunk in self.chunks:
            chunk.to(device)

    @torch.no_grad()
    def _score(self, built: tuple[list[PairBatch], list[tuple[int, ...]]], reduction: str
               ) -> Optional[list[torch.Tensor]]:
        pairs, shapes = built
        batches = [as_microbatch(p) for p in pairs]
        if self.offload:
            self._move(torch.cuda.current_device())
        self.last_computed_tokens = sum(b["tokens"].numel() for b in batches)
        try:
            seq = max(b["tokens"].size(1) for b in batches)
            reports = run_schedule(make_forward_step(_matrix_reduce(reduction), self.vocab_size), batches,
                                   self.chunks, forward_only=True, seq_length=seq,
                                   micro_batch_size=batches[0]["tokens"].size(0))
        finally:
            if self.offload:
                self._move("cpu")
        if not reports:  # not the last pipeline stage
            return None
        # each micro-batch reduced its rows over the flat cells of all groups: the sum is every cell's value
        return split_cells(sum(r["matrix"].float().cpu() for r in reports), shapes)

    def score_cross_pairs(self, prompts: Sequence[Sequence[Sequence[int]]],
                          responses: Sequence[Sequence[Sequence[int]]], reduction: str = "sum"
                          ) -> Optional[list[torch.Tensor]]:
        """[B, B] matrices log pi_ref(y_j | x_i), one per group; None off the last stage."""
        return self._score(self.microbatches("cross", prompts, responses), reduction)

    def score_diagonal(self, prompts: Sequence[Sequence[Sequence[int]]],
                       responses: Sequence[Sequence[Sequence[int]]], reduction: str = "sum"
                       ) -> Optional[list[torch.Tensor]]:
        """[B] vectors log pi_ref(y_i | x_i), one per group (DPO's reference); None off the last stage."""
        return self._score(self.microbatches("diagonal", prompts, responses), reduction)

    def microbatches(self, kind: Literal["cross", "diagonal"], prompts, responses
                     ) -> tuple[list[PairBatch], list[tuple[int, ...]]]:
        """The rows a scoring call runs (``runtime.microbatches.reference_pairs``: the groups' sequences packed
        together unless ``pack=False``) and each group's matrix shape; under PP all of one call share a shape
        (megatron's fixed p2p shapes)."""
        if kind == "cross":
            def build(p, r, **kw):
                return build_cross_pairs(p, r, self.pad_id, method=self.method, **kw)
        else:
            def build(p, r, **kw):
                return build_diagonal(p, r, self.pad_id, **kw)
        builds = [partial(build, p, r, pad_to_multiple_of=self.pad_to_multiple_of) for p, r in zip(prompts, responses)]
        same = parallel_state.get_pipeline_model_parallel_world_size() > 1
        return reference_pairs(builds, self.pad_id, self.pad_to_multiple_of, same, self.pack, self.row_tokens)


def load_frozen_reference(arch: ModelArch, parallel: ParallelConfig, options: ModelOptions, root: str,
                          iteration: Optional[int], *, pad_id: int, method: Method = "shared_prefix",
                          offload: bool = False, pg_collection=None, pack: bool = True,
                          row_tokens: Optional[int] = None) -> FrozenReference:
    """Build model chunks in this rank's layout and load the reference weights from ``root`` (its ``iteration``,
    or the latest) through the shape-checked checkpoint loader."""
    chunks = build_model_chunks(arch, parallel, options, pg_collection)
    load_model(chunks, root, iteration)
    return FrozenReference(chunks, arch.vocab_size, pad_id, method=method, offload=offload,
                           pad_to_multiple_of=parallel.sequence_multiple, pack=pack, row_tokens=row_tokens)
