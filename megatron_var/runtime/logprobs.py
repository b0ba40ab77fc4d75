"""Per-token log-probs from vocab-parallel logits, without gathering the vocabulary.

Why: the reference scores B² response tokens per group, so gathering [b, s, V] logits (V = 128k-152k) on every TP
rank would dominate memory. megatron-core's fused vocab-parallel cross entropy does the TP reductions; we only
add the mask that keeps Megatron's padded vocabulary rows (added so V divides by TP) from taking any probability
mass — their logits are finite numbers otherwise, and would silently lower every log-prob.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def mask_padded_vocab(logits_bsv: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """Vocab-parallel logits [b, s, V/tp] in float32 with columns >= ``vocab_size`` set to -inf (a new tensor when
    anything changes; the input itself when it is float32 with no padded columns on this rank)."""
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    part = logits_bsv.size(-1)
    start = tp_group.rank() * part
    logits = logits_bsv.float()
    n_valid = max(0, min(part, vocab_size - start))
    if n_valid < part:
        pad = torch.zeros(part, dtype=torch.bool, device=logits.device)
        pad[n_valid:] = True
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def token_logprobs(logits_bsv: torch.Tensor, labels_bs: torch.Tensor, vocab_size: int,
                   tp_group=None) -> torch.Tensor:
    """log p(labels | context) per position: [b, s] float32, differentiable w.r.t. the logits.

    ``logits_bsv`` are this TP rank's vocab slice (GPTModel with ``parallel_output=True``); ``vocab_size`` is the
    true (unpadded) vocabulary. Labels at masked-out positions may be any valid id (e.g. 0).
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    logits = mask_padded_vocab(logits_bsv, vocab_size, tp_group).contiguous()
    # megatron's kernel takes any leading dims (it views [*, V/tp]), so no [s, b] transpose copy of the logits; it
    # subtracts the max and exponentiates in place, on a tensor nothing else reads afterwards. Returns -log p.
    nll_bs = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_bs.contiguous(), tp_group=tp_group)
    return -nll_bs
