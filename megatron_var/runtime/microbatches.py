"""Rows of pairs (``batching.pairs.PairBatch``) as the micro-batch dicts megatron's schedule hands to
``forward_step``, for the policy and the reference alike.

Why here (runtime) and not in batching: a block-masked batch travels with its mask in compact form, a
``models.segment_mask.SegmentMask``, which the core attention turns into a FlexAttention BlockMask or a dense mask
on the device; batching sits below the model layer and does not know that type.

Micro-batches are packed by default (``pack=True``), the policy's and the reference's: the sequences of a
micro-batch (pairs [x_i; y_i], naive cross pairs, shared-prefix rows) are laid end to end into rows no longer than
its longest sequence (``batching.pairs.pack_rows``), each attending only to itself with its own positions, so a
step computes the same log-probs with less padding.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from megatron_var.batching.pairs import PairBatch, concat_rows, flat_cells, pack_rows
from megatron_var.batching.steps import policy_pairs
from megatron_var.models.segment_mask import SegmentMask


def as_microbatch(pairs: PairBatch) -> dict:
    """The model inputs of ``pairs`` as a schedule micro-batch; the batch object rides along (``reduce``)."""
    mask = SegmentMask(pairs.attn_segments) if pairs.block_masked else None
    return {"tokens": pairs.tokens, "labels": pairs.labels, "loss_mask": pairs.loss_mask,
            "position_ids": pairs.position_ids, "attention_mask": mask, "cross": pairs}


def policy_microbatches(micro_groups: list[list], pad_id: int, pad_to_multiple_of: int, same_length: bool,
                        pack: bool = True, row_tokens: Optional[int] = None) -> list[dict]:
    """One micro-batch per entry of ``micro_groups`` (the rows [x_i; y_i] of its groups' samples, group-major
    cells). ``same_length``: all micro-batches get one shape (pipeline parallelism sends fixed [s, b, h]).
    ``row_tokens``: packed rows may grow to this many tokens (``--max-tokens-per-micro-batch``: one row)."""
    builds = [partial(policy_pairs, g, pad_id, pad_to_multiple_of) for g in micro_groups]
    pairs = shaped_pairs(builds, pad_id, pad_to_multiple_of, same_length, pack, row_tokens)
    return [dict(as_microbatch(p), num_groups=len(g)) for p, g in zip(pairs, micro_groups)]


def reference_pairs(builds: list[Callable[..., PairBatch]], pad_id: int, pad_to_multiple_of: int,
                    same_length: bool, pack: bool = True, row_tokens: Optional[int] = None
                    ) -> tuple[list[PairBatch], list[tuple[int, ...]]]:
    """The reference's micro-batches for several groups (``builds[k]()`` builds group k's rows) in one flat cell
    space (``batching.pairs.flat_cells``), and each group's matrix shape (``split_cells``).

    Packed: the sequences of all the groups share rows, up to ``row_tokens`` tokens each
    (``--max-tokens-per-micro-batch``; one row per micro-batch) or as many as the longest sequence; then a
    micro-batch holds no more rows, and no more scored positions (logits), than the largest group, so no more
    tokens and logits than that group padded to the longest sequence (what ``megatron_var.memory`` budgets for).
    Why across groups: a group's shared-prefix rows differ only by prompt length, so within one group none fits
    next to another and each row is padded to the longest; across a step's groups the rows' lengths mix.
    Unpacked: one micro-batch per group (``shaped_pairs``). ``same_length``: one shape for all (pipeline
    parallelism)."""
    if not pack:
        groups = shaped_pairs(builds, pad_id, pad_to_multiple_of, same_length, pack=False)
        return flat_cells(groups), [g.matrix_shape for g in groups]
    groups = [build() for build in builds]
    rows = concat_rows(flat_cells(groups), pad_id)
    packed = pack_rows(rows, row_tokens or 0, pad_id, pad_to_multiple_of)  # rows of at least the longest
    if row_tokens:
        per_micro, scored_limit = 1, None
    else:  # no micro-batch holds more rows, or more scored positions (logits), than the largest group
        per_micro = max(g.tokens.size(0) for g in groups)
        scored_limit = max(int((g.segment_index >= 0).sum()) for g in groups)
    fill = (packed.attn_segments >= 0).sum(dim=1)
    chunks = _first_fit(fill, (packed.segment_index >= 0).sum(dim=1), per_micro, scored_limit)
    micro = []
    for take in chunks:
        if same_length:
            micro.append(packed.take_rows(torch.tensor(take)).with_rows(per_micro, pad_id))
        else:
            length = -(-int(fill[take].max()) // pad_to_multiple_of) * pad_to_multiple_of
            micro.append(packed.take_rows(torch.tensor(take), length))
    shapes = [g.matrix_shape for g in groups]
    if not row_tokens:  # the limits can cost more micro-batches than groups: then pack each group on its own
        alone = flat_cells(_pack_each(groups, pad_id, pad_to_multiple_of, same_length))
        if sum(m.tokens.numel() for m in alone) < sum(m.tokens.numel() for m in micro):
            return alone, shapes
    return micro, shapes


def _first_fit(fill: torch.Tensor, scored: torch.Tensor, max_rows: int, max_scored: Optional[int]
               ) -> list[list[int]]:
    """Row indices grouped into micro-batches of at most ``max_rows`` rows and ``max_scored`` scored positions,
    longest rows first, each into the first micro-batch with room: rows of similar length end up together, so a
    micro-batch padded to its own longest row pads little."""
    chunks: list[list[int]] = []
    used: list[int] = []
    for r in torch.argsort(fill, descending=True, stable=True).tolist():
        n = int(scored[r])
        k = next((k for k, c in enumerate(chunks)
                  if len(c) < max_rows and (max_scored is None or used[k] + n <= max_scored)), None)
        if k is None:
            chunks.append([])
            used.append(0)
            k = len(chunks) - 1
        chunks[k].append(r)
        used[k] += n
    return chunks


def shaped_pairs(builds: list[Callable[..., PairBatch]], pad_id: int, pad_to_multiple_of: int, same_length: bool,
                 pack: bool, row_tokens: Optional[int] = None) -> list[PairBatch]:
    """The rows of each micro-batch (``builds[k](seq_length=None)`` builds micro-batch k unpacked), packed when
    ``pack``, and under ``same_length`` all of one shape. Packed rows hold at most ``row_tokens`` tokens, or by
    default as many as the micro-batch's longest sequence: then packing never lengthens a row, so attention per row
    costs no more (a longer row costs attention FLOPs on CPU, where the mask is dense; FlexAttention on GPU skips
    the masked tiles)."""
    pairs = [build() for build in builds]
    if pack:
        return _pack_each(pairs, pad_id, pad_to_multiple_of, same_length, row_tokens)
    if same_length and len({p.tokens.shape for p in pairs}) > 1:
        longest = max(p.tokens.size(1) for p in pairs)
        pairs = [build(seq_length=longest) for build in builds]
    return pairs


def _pack_each(pairs: list[PairBatch], pad_id: int, pad_to_multiple_of: int, same_length: bool,
               row_tokens: Optional[int] = None) -> list[PairBatch]:
    """Each batch's rows packed on their own (rows of ``row_tokens``, at least the batch's longest sequence); under
    ``same_length`` all with the largest row count and length among them."""
    packed = [pack_rows(p, row_tokens or 0, pad_id, pad_to_multiple_of) for p in pairs]
    if same_length and len({p.tokens.shape for p in packed}) > 1:
        rows, length = max(p.tokens.size(0) for p in packed), max(p.tokens.size(1) for p in packed)
        packed = [pack_rows(p, row_tokens or 0, pad_id, pad_to_multiple_of, num_rows=rows, seq_length=length)
                  for p in pairs]
    return packed
