"""Logits only at the positions a loss reads: megatron-core's ``output_processor`` hook of ``GPTModel.forward``.

Why: every objective here reads log-probs of response tokens only, yet the output layer would otherwise turn every
position into a [V/tp] row (V = 128k-152k). For VAR's shapes that is most of the work and memory of the logits:
a naive cross-pair row [x_i; y_j] at P=512, R=256 needs 256 of its 768 rows, an SFT step on [x; y] the same third.
Selecting hidden states before the output layer skips those rows' matmul, their float32 copy and the cross
entropy's buffers; gradients flow back through the selection to exactly the positions used.

Positions are flat indices into megatron's ``[s, b]`` order (``s_index * b + b_index``), computed on the host from
the loss mask (no device sync), see ``loss_positions``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region


def loss_positions(loss_mask_bs: torch.Tensor) -> Optional[torch.Tensor]:
    """Flat ``[s, b]``-order indices of positions with a non-zero loss weight; None when that is every position.

    A micro-batch without any weighted position (a PP padding copy) still gets one row, so the output layer and the
    cross entropy's TP collectives run on every rank with a non-empty tensor; its log-prob is masked to zero later.
    """
    flat = loss_mask_bs.t().reshape(-1) != 0
    if bool(flat.all()):
        return None
    idx = flat.nonzero().squeeze(1)
    return idx if idx.numel() else torch.zeros(1, dtype=torch.long)


def selected_logits(*, hidden_states: torch.Tensor, output_layer, output_weight, runtime_gather_output,
                    context: torch.Tensor, scale_logits, **_unused) -> torch.Tensor:
    """``output_processor``: [1, n, V/tp] logits of the n hidden states at flat positions ``context``.

    Under sequence parallelism the hidden states arrive split along s; they are all-gathered first (backward: each
    rank keeps its own slice of the gradient, which the output layer's input all-reduce has already summed) and the
    output layer runs once without its own sequence-parallel gather, as megatron's inference path does.
    """
    sequence_parallel = output_layer.sequence_parallel
    if sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                             group=output_layer.tp_group)
    rows = hidden_states.reshape(-1, hidden_states.size(-1)).index_select(0, context).unsqueeze(1)  # [n, 1, h]
    output_layer.sequence_parallel = False
    try:
        logits, _ = output_layer(rows, weight=output_weight, runtime_gather_output=runtime_gather_output)
    finally:
        output_layer.sequence_parallel = sequence_parallel
    return scale_logits(logits).transpose(0, 1).contiguous()


def scatter_positions(values_1n: torch.Tensor, positions: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[b, s] tensor with ``values_1n`` at flat ``[s, b]`` positions and 0 elsewhere (differentiable in values)."""
    out = values_1n.new_zeros(s * b).index_copy(0, positions, values_1n.reshape(-1))
    return out.view(s, b).t()
