"""Local (non-TE) building blocks swapped into megatron-core's local layer spec via ``ModuleSpec``.

Why: the plain local spec materialises the [b·heads, s, s] score matrix (16k tokens/s and an OOM at micro-batch
4×2048 on an H100 for a 1B shape) and its torch norm refuses sequence parallelism. A core attention on
``torch.nn.functional.scaled_dot_product_attention`` (44.7k tokens/s) and an RMSNorm that marks its weight as
sequence-parallel fix both while keeping megatron's module structure and checkpoint keys.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's constructor signature; supports sequence parallelism.

    Under SP each TP rank normalises a different slice of the sequence, so the weight's gradient is partial:
    ``sequence_parallel=True`` on the parameter makes megatron's ``finalize_model_grads`` all-reduce it over TP.
    Computes in float32 for bf16 inputs (as TE and HF do) so log-probs match HF closely.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


class SDPACoreAttention(DotProductAttention):
    """megatron's local core attention with the math replaced by torch SDPA (flash / memory-efficient kernels).

    Shapes: query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np·hn].
    ``attention_mask``: None = causal (the spec's mask type), or a bool [b|1, 1, sq, sk] with True = masked
    (megatron's convention; e.g. the shared-prefix cross-pair mask).
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPACoreAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        rep = q.size(1) // k.size(1)
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if attention_mask is None:
            attn_mask, is_causal = None, mask_type == AttnMaskType.causal
        else:
            attn_mask, is_causal = ~attention_mask, False  # SDPA: True = attend
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
                )
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )
        sq, b = query.size(0), query.size(1)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
