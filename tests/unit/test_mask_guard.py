"""No attention mask is dropped. The spec ``--transformer-impl te`` builds (TE faked:
tests/fake_te.py) routes segment masks to our core attention, and a causal-only core attention refuses a mask."""

import pytest
import torch
from attention_fixtures import make_core
from fake_te import FakeTEDotProductAttention, FakeTELayerNormColumnParallelLinear, fake_te
from megatron.core.transformer import TransformerConfig

from megatron_var.batching.pairs import build_shared_prefix
from megatron_var.models import mask_guard, specs
from megatron_var.models.layers import FlexCoreAttention, SDPACoreAttention
from megatron_var.models.segment_mask import SegmentMask

CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                           use_cpu_initialization=True)


@pytest.mark.parametrize("flex,expected", [(False, SDPACoreAttention), (True, FlexCoreAttention)])
def test_te_spec_keeps_te_linears_but_uses_our_core_attention(monkeypatch, flex, expected):
    with fake_te(monkeypatch):
        spec = specs.layer_spec("te", config=CONFIG, flex_attention=flex)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        plain = get_gpt_layer_with_transformer_engine_spec()
    attn = spec.submodules.self_attention.submodules
    assert attn.core_attention is expected and mask_guard.applies_masks(expected)
    assert attn.linear_qkv is FakeTELayerNormColumnParallelLinear  # TE's fused norm + linear stays
    assert specs.describe(spec) == "transformer_engine+sdpa" + ("+flex" if flex else "")
    # negative control: megatron's own TE spec names TE's causal-only core attention
    assert plain.submodules.self_attention.submodules.core_attention is FakeTEDotProductAttention


class _Attention(torch.nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core_attention = core


def _qkv_and_mask():
    cross = build_shared_prefix([[3, 4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    s = cross.tokens.size(1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 1, 4, 8, generator=g)
    kv = torch.randn(s, 1, 2, 8, generator=g)
    return q, kv, SegmentMask(cross.attn_segments)


def test_guard_rejects_a_mask_at_a_causal_only_core_attention():
    q, kv, mask = _qkv_and_mask()
    holder = _Attention(make_core(FakeTEDotProductAttention, 4, 2, 8))
    assert mask_guard.guard(holder) == 1 and mask_guard.guard(holder) == 1  # idempotent
    holder.core_attention(q, kv, kv, None)  # causal batches are fine
    with pytest.raises(mask_guard.MaskNotAppliedError, match="FakeTEDotProductAttention"):
        holder.core_attention(q, kv, kv, mask)
    with pytest.raises(mask_guard.MaskNotAppliedError):
        holder.core_attention(q, kv, kv, attention_mask=mask.dense())
    # ours declares and is left alone; it really applies the mask (differs from causal)
    ours = _Attention(make_core(SDPACoreAttention, 4, 2, 8))
    assert mask_guard.guard(ours) == 0
    masked, causal = ours.core_attention(q, kv, kv, mask), ours.core_attention(q, kv, kv, None)
    assert (masked - causal).abs().max() > 1e-3
