"""Stand-ins for the Transformer Engine classes megatron-core's TE layer spec names, so the spec that
``--transformer-impl te`` builds can be built and run on CPU without TE.

The linears and norms are megatron's local ones (same math, TE's constructor keywords); the core attention mimics
``TEDotProductAttention`` with ``attn_mask_type=causal``: it ignores ``attention_mask`` — the behaviour that made
shared-prefix reference scoring silently wrong on GPU.
"""

from __future__ import annotations

import contextlib

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType

from megatron_var.models.layers import RMSNorm, SDPACoreAttention


class FakeTELayerNormColumnParallelLinear(ColumnParallelLinear):
    """TE's fused RMSNorm + column-parallel linear."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.norm = RMSNorm(config, input_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        return super().forward(self.norm(x), *args, **kwargs)


class FakeTEDotProductAttention(SDPACoreAttention):
    """Causal-only, like TE with ``attn_mask_type=causal``: a given mask is dropped (and not declared applied)."""

    applies_segment_masks = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type == AttnMaskType.causal:
            attention_mask = None
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kwargs)


class FakeTESpecProvider:
    """megatron's ``TESpecProvider`` with the stand-ins above (dense GPT layers only)."""

    core = FakeTEDotProductAttention

    def linear(self):
        return ColumnParallelLinear

    def column_parallel_linear(self):
        return ColumnParallelLinear

    def row_parallel_linear(self):
        return RowParallelLinear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return FakeTELayerNormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm

    def core_attention(self):
        return self.core

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        raise NotImplementedError

    def activation_func(self):
        return None


@contextlib.contextmanager
def fake_te(monkeypatch, core=FakeTEDotProductAttention):
    """megatron's TE spec builds with the stand-ins, and ``--transformer-impl auto|te`` resolves to 'te'."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_var.models import specs

    provider = type("Provider", (FakeTESpecProvider,), {"core": core})
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider)
    monkeypatch.setattr(specs, "choose_backend", lambda requested="auto", **_: "te")
    yield
