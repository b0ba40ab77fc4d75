"""``batching.pairs.pack_rows``: sequences laid end to end compute exactly what each computes alone. Checked with
the core attentions (dense-masked SDPA and eager FlexAttention) against float64 attention of the unpacked rows,
and with ``reduce``; negative control: the same packed row without its doc boundaries differs."""

import pytest
import torch
from attention_fixtures import make_core, reference_attention

from megatron_var.batching.pairs import (DOC_STRIDE, block_attention_mask, build_diagonal, build_shared_prefix,
                                         pack_rows)
from megatron_var.models.layers import FlexCoreAttention, SDPACoreAttention
from megatron_var.models.segment_mask import SegmentMask

HEADS, GROUPS, HEAD_DIM = 4, 2, 8
TOL = 2e-5


def _ragged(n, lo, hi, g):
    return [torch.randint(1, 50, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _batch(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "diagonal":
        return build_diagonal(_ragged(6, 2, 30, g), _ragged(6, 1, 40, g), pad_id=0)
    return build_shared_prefix(_ragged(3, 2, 20, g), _ragged(4, 1, 15, g), pad_id=0)


def _with_unique_tokens(batch):
    """Token ids = 1 + flat index of each non-pad source position, so packed positions can be traced back."""
    n, s = batch.tokens.shape
    ids = torch.arange(1, n * s + 1).view(n, s)
    batch.tokens = torch.where(batch.attn_segments >= 0, ids, 0)
    return batch


def _source_of(packed, source):
    """For every packed position: the flat source index (-1 for padding)."""
    flat = packed.tokens.reshape(-1) - 1
    return torch.where(packed.attn_segments.reshape(-1) >= 0, flat, -1)


@pytest.mark.parametrize("kind", ["diagonal", "shared_prefix"])
@pytest.mark.parametrize("core", [SDPACoreAttention, FlexCoreAttention], ids=["sdpa", "flex"])
def test_packed_attention_equals_each_sequence_alone(kind, core):
    src = _with_unique_tokens(_batch(kind, seed=1))
    packed = pack_rows(src, capacity=64 if kind == "diagonal" else 160, pad_id=0, pad_to_multiple_of=8)
    assert packed.tokens.size(0) < src.tokens.size(0)  # something was packed
    n, s = src.tokens.shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n * s, heads, HEAD_DIM, generator=g) for heads in (HEADS, GROUPS, GROUPS))
    ref = reference_attention(*(t.view(n, s, -1, HEAD_DIM).transpose(0, 1) for t in (q, k, v)),
                              block_attention_mask(src.attn_segments)[:, 0])  # [s, n, h*d]
    ref = ref.transpose(0, 1).reshape(n * s, -1)
    where = _source_of(packed, src)
    pn, ps = packed.tokens.shape

    def gather(t):  # packed [ps, pn, heads, d]; padding gets zeros
        out = torch.zeros(pn * ps, t.size(1), HEAD_DIM)
        out[where >= 0] = t[where[where >= 0]]
        return out.view(pn, ps, t.size(1), HEAD_DIM).transpose(0, 1)

    mask = SegmentMask(packed.attn_segments)
    out = make_core(core, HEADS, GROUPS, HEAD_DIM)(gather(q), gather(k), gather(v), mask)  # [ps, pn, h*d]
    out = out.transpose(0, 1).reshape(pn * ps, -1)
    torch.testing.assert_close(out[where >= 0].double(), ref[where[where >= 0]], rtol=0, atol=TOL)
    # negative control: the same row with its sequences' boundaries removed attends across them
    merged = SegmentMask(torch.where(packed.attn_segments >= 0, packed.attn_segments % DOC_STRIDE, -1))
    wrong = make_core(core, HEADS, GROUPS, HEAD_DIM)(gather(q), gather(k), gather(v), merged)
    wrong = wrong.transpose(0, 1).reshape(pn * ps, -1)
    assert (wrong[where >= 0].double() - ref[where[where >= 0]]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["diagonal", "shared_prefix"])
def test_packed_reduce_and_labels_are_the_sources(kind):
    src = _batch(kind, seed=3)
    packed = pack_rows(src, capacity=48, pad_id=0)
    token_logps = torch.randn(src.tokens.shape, dtype=torch.float64)
    traced = _with_unique_tokens(_batch(kind, seed=3))
    where = _source_of(pack_rows(traced, capacity=48, pad_id=0), traced)
    packed_logps = torch.zeros(packed.tokens.numel(), dtype=torch.float64)
    packed_logps[where >= 0] = token_logps.reshape(-1)[where[where >= 0]]
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(packed.reduce(packed_logps.view(packed.tokens.shape), reduction),
                                   src.reduce(token_logps, reduction), rtol=1e-12, atol=1e-12)
    for name in ("labels", "position_ids", "loss_mask", "segment_index"):
        got = getattr(packed, name).reshape(-1)[where >= 0]
        assert torch.equal(got, getattr(src, name).reshape(-1)[where[where >= 0]]), name
    assert int((packed.attn_segments >= 0).sum()) == int((src.attn_segments >= 0).sum())  # every token, once


def test_rows_respect_capacity_and_fixed_row_count():
    src = _batch("diagonal", seed=4)
    longest = int((src.attn_segments >= 0).sum(1).max())
    packed = pack_rows(src, capacity=longest + 5, pad_id=0, pad_to_multiple_of=4, num_rows=6)
    assert packed.tokens.shape[0] == 6 and packed.tokens.shape[1] % 4 == 0
    assert int((packed.attn_segments >= 0).sum(1).max()) <= longest + 5
    assert (packed.attn_segments[-1] < 0).all()  # an added empty row
    small = pack_rows(src, capacity=1, pad_id=0)  # below the longest sequence: raised to it
    assert int((small.attn_segments >= 0).sum(1).max()) == longest
    with pytest.raises(ValueError, match="packed already"):
        pack_rows(packed, capacity=64, pad_id=0)
    with pytest.raises(ValueError, match="num_rows"):
        pack_rows(src, capacity=longest, pad_id=0, num_rows=1)


def test_split_by_tokens_keeps_whole_groups_within_the_budget():
    from types import SimpleNamespace

    from megatron_var.batching.steps import group_tokens, split_by_tokens

    def group(*lengths):  # pairs of (prompt, response) lengths
        return SimpleNamespace(prompt_ids=[[1] * p for p, _ in lengths], response_ids=[[1] * r for _, r in lengths])

    groups = [group((3, 2), (1, 1)), group((4, 4)), group((10, 5)), group((1, 1))]
    assert [group_tokens(g) for g in groups] == [7, 8, 15, 2]
    split = split_by_tokens(groups, 15)
    assert [[group_tokens(g) for g in m] for m in split] == [[7, 8], [15], [2]]
    assert [[group_tokens(g) for g in m] for m in split_by_tokens(groups, 5)] == [[7], [8], [15], [2]]
