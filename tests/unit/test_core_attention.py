"""The local spec's core attentions — causal SDPA, dense-masked SDPA, and FlexAttention with a BlockMask built from
``attn_segments`` — against attention written out by hand in float64 (softmax(QK^T/sqrt(d) + mask) V), with GQA."""

import pytest
import torch
from attention_fixtures import make_core, reference_attention

from megatron_var.batching.pairs import block_attention_mask, build_shared_prefix
from megatron_var.models.layers import FlexCoreAttention, SDPACoreAttention
from megatron_var.models.segment_mask import SegmentMask, segment_mask_mod
from megatron_var.models.specs import use_flex_attention

HEADS, GROUPS, HEAD_DIM = 4, 2, 8  # GQA: 2 query heads per KV group
TOL = 2e-5


def _core(cls):
    return make_core(cls, HEADS, GROUPS, HEAD_DIM)


def _qkv(s, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(s, b, GROUPS, HEAD_DIM, generator=g)
    v = torch.randn(s, b, GROUPS, HEAD_DIM, generator=g)
    return q, k, v


def _cross_batch(seed=0, long=False):
    """A shared-prefix batch with ragged prompts/responses and right padding (pad rows: segment -1)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (20, 60) if long else (2, 7)
    rand = lambda a, b_: torch.randint(1, 50, (int(torch.randint(a, b_, (1,), generator=g)),), generator=g).tolist()
    prompts = [rand(lo, hi) for _ in range(3)]
    responses = [rand(lo // 2, hi // 2) for _ in range(4)]
    return build_shared_prefix(prompts, responses, pad_id=0, pad_to_multiple_of=16)


def test_causal_sdpa_matches_reference():
    q, k, v = _qkv(s=23, b=3)
    causal = torch.ones(23, 23, dtype=torch.bool).triu(1).expand(3, 23, 23)
    out = _core(SDPACoreAttention)(q, k, v, None)
    assert out.shape == (23, 3, HEADS * HEAD_DIM)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal), rtol=0, atol=TOL)


@pytest.mark.parametrize("long", [False, True], ids=["one-block", "multi-block"])
@pytest.mark.parametrize("path", ["dense-bool", "segments-sdpa", "segments-flex"])
def test_masked_paths_match_reference(path, long):
    cross = _cross_batch(seed=1, long=long)
    n, s = cross.tokens.shape
    assert (cross.attn_segments < 0).any(), "the batch should contain padding"
    if long:
        assert s > 128, "multi-block case must span several FlexAttention blocks"
    q, k, v = _qkv(s, n, seed=2)
    masked = cross.attention_mask[:, 0]
    if path == "dense-bool":
        out = _core(SDPACoreAttention)(q, k, v, cross.attention_mask)
    elif path == "segments-sdpa":
        out = _core(SDPACoreAttention)(q, k, v, SegmentMask(cross.attn_segments))
    else:
        out = _core(FlexCoreAttention)(q, k, v, SegmentMask(cross.attn_segments))  # eager flex_attention on CPU
    ref = reference_attention(q, k, v, masked)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL)
    # negative control: plain causal attention gives different numbers for the response segments
    causal = torch.ones(s, s, dtype=torch.bool).triu(1).expand(n, s, s)
    assert (reference_attention(q, k, v, causal) - ref).abs().max() > 1e-2


def test_mask_mod_equals_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    cross = _cross_batch(seed=3, long=True)
    n, s = cross.attn_segments.shape
    allowed = create_mask(segment_mask_mod(cross.attn_segments), n, None, s, s, device="cpu")  # [n, 1, s, s]
    assert torch.equal(~allowed, block_attention_mask(cross.attn_segments))
    assert torch.equal(SegmentMask(cross.attn_segments).dense(), cross.attention_mask)


def test_segment_mask_caches_per_device_and_checks_input():
    cross = _cross_batch()
    m = SegmentMask(cross.attn_segments)
    assert m.dense("cpu") is m.dense("cpu")
    assert m.block_mask("cpu") is m.block_mask("cpu")
    with pytest.raises(ValueError):
        SegmentMask(cross.attention_mask)


def test_flex_selection_needs_cuda():
    assert use_flex_attention(True, cuda_available=True)
    assert not use_flex_attention(True, cuda_available=False)
    assert not use_flex_attention(False, cuda_available=True)
