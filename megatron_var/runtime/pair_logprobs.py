"""Per-token log pi(y | x) of (prompt, response) pairs with a Megatron model at any TP/PP/DP layout.

Why here and not in a tool: the trainer's checks, tests and tools/score_logprobs.py must score through the same
path as training (``make_forward_step`` -> vocab-parallel log-probs with the padded vocabulary masked), so a
converted checkpoint's numbers are the numbers training will see.

Pairs are sorted by length (less padding), grouped into micro-batches of ``micro_batch_size`` rows [x_i; y_i]
(``build_diagonal``), dealt round-robin to the data-parallel replicas, and run through megatron's forward-only
schedule; the last pipeline stage's results are gathered so every rank returns the same lists in input order.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_var.batching.pairs import build_diagonal
from megatron_var.models.arch import ModelArch
from megatron_var.runtime.parallel import holds_results
from megatron_var.runtime.engine import run_schedule
from megatron_var.runtime.forward_step import make_forward_step

logger = logging.getLogger(__name__)

Pair = tuple[Sequence[int], Sequence[int]]
MICROBATCHES_PER_CALL = 16  # one schedule call pads its micro-batches to one length (PP needs fixed shapes)


def check_pairs(pairs: Sequence[Pair], vocab_size: int) -> None:
    """ValueError naming the first pair with an empty side or a token id outside [0, vocab_size)."""
    for i, (x, y) in enumerate(pairs):
        for what, ids in (("prompt", x), ("response", y)):
            if len(ids) == 0:
                raise ValueError(f"pair {i}: empty {what}")
            bad = [t for t in ids if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(f"pair {i}: {what} token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _token_report(token_logps_bs: torch.Tensor, batch: dict):
    """reduce_fn for scoring: hand the masked [b, s] log-probs back through the schedule's report list."""
    total = token_logps_bs.sum()
    units = torch.ones((), dtype=torch.int, device=token_logps_bs.device)
    return total, units, {"token_logps": token_logps_bs.detach().float().cpu(), "loss_mask": batch["loss_mask"].cpu()}


def _microbatches(pairs: Sequence[Pair], groups: list[list[int]], pad_id: int, pad_multiple: int) -> tuple[list, int]:
    """One schedule call's micro-batches, all padded to the call's longest row (rounded to ``pad_multiple``)."""
    longest = max(len(pairs[i][0]) + len(pairs[i][1]) for g in groups for i in g)
    seq = -(-longest // pad_multiple) * pad_multiple
    out = []
    for g in groups:
        b = build_diagonal([pairs[i][0] for i in g], [pairs[i][1] for i in g], pad_id, seq_length=seq)
        out.append({"tokens": b.tokens, "labels": b.labels, "loss_mask": b.loss_mask, "position_ids": b.position_ids})
    return out, seq


def score_pairs(chunks: list, arch: ModelArch, pairs: Sequence[Pair], micro_batch_size: int = 1,
                pad_id: int = 0) -> list[list[float]]:
    """log p(y_t | x, y_<t) for every response token of every pair, returned on every rank in input order.

    Every rank of the world must call it with the same ``pairs``; ``chunks`` are this rank's model chunks.
    """
    if micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    check_pairs(pairs, arch.vocab_size)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    groups = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if groups and len(groups[-1]) < micro_batch_size:  # PP sends fixed [s, b, h]: pad with copies, drop later
        groups[-1] = groups[-1] + [groups[-1][0]] * (micro_batch_size - len(groups[-1]))
    mine = groups[dp_rank::dp]
    sp = chunks[0].config.sequence_parallel
    pad_multiple = parallel_state.get_tensor_model_parallel_world_size() if sp else 1
    forward_step = make_forward_step(_token_report, arch.vocab_size)
    results: dict[int, list[float]] = {}
    was_training = [m.training for m in chunks]
    for m in chunks:
        m.eval()
    for start in range(0, len(mine), MICROBATCHES_PER_CALL):
        call = mine[start:start + MICROBATCHES_PER_CALL]
        micro, seq = _microbatches(pairs, call, pad_id, pad_multiple)
        with torch.no_grad():
            reports = run_schedule(forward_step, micro, chunks, forward_only=True, seq_length=seq,
                                   micro_batch_size=micro_batch_size)
        if holds_results():
            for group, report in zip(call, reports):
                for row, i in enumerate(group):
                    mask = report["loss_mask"][row] > 0
                    results[i] = report["token_logps"][row][mask].tolist()
    for m, mode in zip(chunks, was_training):
        m.train(mode)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results if holds_results() else {})
    merged: dict[int, list[float]] = {}
    for part in gathered:
        merged.update(part)
    assert len(merged) == len(pairs), (len(merged), len(pairs))
    return [merged[i] for i in range(len(pairs))]
