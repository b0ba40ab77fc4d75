"""SFT loss in megatron's loss_func form: a summed negative log-likelihood plus the token count.

Returning the sum and the count (not a mean) lets the schedule/trainer divide once by the global number of
response tokens, so the loss does not depend on how the global batch is split into micro-batches, gradient
accumulation steps or DP ranks (token-mean normalisation).
Shapes: token_logps [N, S] = log p(labels[n, s] | tokens[n, :s+1]); loss_mask [N, S], 1 on response labels.
"""

from __future__ import annotations

import torch

__all__ = ["sft_loss_sum", "sft_loss"]


def sft_loss_sum(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum of masked token log-probs [0-d, float32+], number of masked-in tokens [0-d int32]).

    loss_mask is expected to be 0/1; positions where it is 0 are ignored even if they hold -inf/NaN.
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape"
        )
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    keep = loss_mask != 0
    neg_sum = -torch.where(keep, token_logps.to(dtype) * loss_mask.to(dtype), 0.0).sum()
    return neg_sum, keep.sum().to(torch.int)


def sft_loss(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of one batch (convenience; the trainer normalises globally)."""
    neg_sum, count = sft_loss_sum(token_logps, loss_mask)
    return neg_sum / count.clamp(min=1).to(neg_sum.dtype)
