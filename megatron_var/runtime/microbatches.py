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

from megatron_var.batching.pairs import PairBatch, pack_rows
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


def shaped_pairs(builds: list[Callable[..., PairBatch]], pad_id: int, pad_to_multiple_of: int, same_length: bool,
                 pack: bool, row_tokens: Optional[int] = None) -> list[PairBatch]:
    """The rows of each micro-batch (``builds[k](seq_length=None)`` builds micro-batch k unpacked), packed when
    ``pack``, and under ``same_length`` all of one shape. Packed rows hold at most ``row_tokens`` tokens, or by
    default as many as the micro-batch's longest sequence: then packing never lengthens a row, so attention per row
    costs no more (a longer row costs attention FLOPs on CPU, where the mask is dense; FlexAttention on GPU skips
    the masked tiles)."""
    pairs = [build() for build in builds]
    if pack:
        packed = [_pack(p, pad_id, pad_to_multiple_of, row_tokens) for p in pairs]
        if same_length and len({p.tokens.shape for p in packed}) > 1:
            rows, length = max(p.tokens.size(0) for p in packed), max(p.tokens.size(1) for p in packed)
            packed = [_pack(p, pad_id, pad_to_multiple_of, row_tokens, rows, length) for p in pairs]
        return packed
    if same_length and len({p.tokens.shape for p in pairs}) > 1:
        longest = max(p.tokens.size(1) for p in pairs)
        pairs = [build(seq_length=longest) for build in builds]
    return pairs


def _pack(pairs: PairBatch, pad_id: int, pad_to_multiple_of: int, row_tokens=None, num_rows=None, seq_length=None
          ) -> PairBatch:
    longest = int((pairs.attn_segments >= 0).sum(dim=1).max())
    return pack_rows(pairs, max(longest, row_tokens or 0), pad_id, pad_to_multiple_of, num_rows=num_rows,
                     seq_length=seq_length)
