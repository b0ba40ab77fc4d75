"""Local (non-TE) building blocks swapped into megatron-core's local layer spec via ``ModuleSpec``.

Why: the plain local spec materialises the [b·heads, s, s] score matrix (16k tokens/s and an OOM at micro-batch
4×2048 on an H100 for a 1B shape) and its torch norm refuses sequence parallelism. A core attention on
``torch.nn.functional.scaled_dot_product_attention`` (44.7k tokens/s) and an RMSNorm that marks its weight as
sequence-parallel fix both while keeping megatron's module structure and checkpoint keys. ``FlexCoreAttention``
adds a FlexAttention BlockMask path for the shared-prefix cross-pair mask (the frozen reference's batches on GPU).
The Transformer Engine spec uses these core attentions too (``specs.layer_spec``): TE's would drop the mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_var.models.segment_mask import SegmentMask, flex_op


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
    ``attention_mask``: None = causal (the spec's mask type); a bool [b|1, 1, sq, sk] with True = masked
    (megatron's convention); or a ``SegmentMask`` (the shared-prefix cross-pair mask in compact form), which this
    class expands to the dense bool mask once per micro-batch (cached on the mask object).
    """

    applies_segment_masks = True
    """Declared for ``models.mask_guard``: a given mask (dense or ``SegmentMask``) is always applied."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert packed_seq_params is None and attention_bias is None, "not supported by SDPACoreAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if isinstance(attention_mask, SegmentMask):
            ctx = self._segment_attention(q, k, v, attention_mask, dropout_p)
        else:
            ctx = self._sdpa(q, k, v, attention_mask, mask_type, dropout_p)
        sq, b = query.size(0), query.size(1)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _segment_attention(self, q, k, v, mask: SegmentMask, dropout_p: float) -> torch.Tensor:
        return self._sdpa(q, k, v, mask.dense(q.device), None, dropout_p)

    def _sdpa(self, q, k, v, attention_mask: Optional[torch.Tensor], mask_type, dropout_p: float) -> torch.Tensor:
        """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn]."""
        if attention_mask is None:
            # no mask: SDPA's GQA support avoids materialising the repeated K/V (flash kernel on GPU)
            kwargs = dict(attn_mask=None, is_causal=mask_type == AttnMaskType.causal, enable_gqa=True)
        else:
            rep = q.size(1) // k.size(1)
            if rep > 1:  # with a mask SDPA's GQA path can fall back to the math kernel on GPU: repeat instead
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            kwargs = dict(attn_mask=~attention_mask, is_causal=False)  # SDPA: True = attend
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale,
                                                      **kwargs)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale, **kwargs)


class FlexCoreAttention(SDPACoreAttention):
    """SDPACoreAttention whose segment-masked (shared-prefix cross-pair) batches run through FlexAttention with a
    BlockMask: fully masked 128×128 tiles are skipped (a [x; y_1..y_B] row is mostly such tiles), no dense mask.

    Causal and dense-bool-mask batches, and attention dropout (FlexAttention has none), keep the SDPA path.
    """

    def _segment_attention(self, q, k, v, mask: SegmentMask, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            return super()._segment_attention(q, k, v, mask, dropout_p)
        from torch.nn.attention.flex_attention import flex_attention

        flex = flex_op(flex_attention, q.device.type)
        return flex(q, k, v, block_mask=mask.block_mask(q.device), scale=self.softmax_scale,
                    enable_gqa=q.size(1) != k.size(1))
