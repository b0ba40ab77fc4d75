"""``forward_step`` for megatron's schedules: model forward, then a loss that reads per-token log-probs.

Why one adapter for every objective: the policy and the frozen reference must compute log-probs through exactly the
same code path (they start from the same weights, so any difference between two paths, e.g. in the vocab-parallel
log-softmax under TP, would be a spurious policy/reference gap); objectives only differ in how they reduce the
[b, s] token log-probs, which is a pure function passed in as ``reduce_fn``.

Batch dict (one micro-batch): ``tokens`` [b, s] long, ``labels`` [b, s] long (next token), ``loss_mask`` [b, s]
float, optional ``position_ids`` [b, s] and ``attention_mask`` ([b|1, 1, s, s] bool, True = masked, or a compact
``models.segment_mask.SegmentMask``), plus whatever the objective's ``reduce_fn`` reads (rewards, reference
log-probs, ...).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from megatron_var.runtime.logprobs import token_logprobs
from megatron_var.models.selected_logits import loss_positions, scatter_positions, selected_logits

# reduce_fn(token_logps [b, s], batch) -> (loss_sum scalar, num_units int tensor, report dict)
ReduceFn = Callable[[torch.Tensor, dict], tuple]


def to_device(batch: dict) -> dict:
    """Move tensors to the current CUDA device (no-op on CPU)."""
    if not torch.cuda.is_available():
        return batch
    dev = torch.cuda.current_device()
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_forward_step(reduce_fn: ReduceFn, vocab_size: int, select_positions: bool = True) -> Callable:
    """A megatron ``forward_step(data_iterator, model)`` that applies ``reduce_fn`` on the last stage.

    ``select_positions``: the output layer turns only loss-masked positions into logits
    (``models.selected_logits``); the token log-probs handed to ``reduce_fn`` are the same [b, s] either way.
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        positions = loss_positions(batch["loss_mask"]) if select_positions else None
        batch = to_device(dict(batch, positions=positions))
        kwargs = {} if positions is None else {"output_processor": selected_logits,
                                               "output_processor_context": batch["positions"]}
        output = model(batch["tokens"], batch.get("position_ids"), batch.get("attention_mask"), **kwargs)
        return output, partial(_loss, reduce_fn, vocab_size, batch)

    return forward_step


def _loss(reduce_fn: ReduceFn, vocab_size: int, batch: dict, logits: torch.Tensor):
    """``logits``: [b, s, V/tp], or [1, n, V/tp] at ``batch["positions"]`` (flat [s, b] order)."""
    labels, positions = batch["labels"], batch["positions"]
    if positions is None:
        token_logps = token_logprobs(logits, labels, vocab_size)
    else:
        b, s = labels.shape
        picked = labels.t().reshape(-1).index_select(0, positions).unsqueeze(0)
        token_logps = scatter_positions(token_logprobs(logits, picked, vocab_size), positions, b, s)
    return reduce_fn(token_logps * batch["loss_mask"], batch)

