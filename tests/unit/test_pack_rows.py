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


@pytest.mark.parametrize("kind", ["shared_prefix", "naive", "diagonal"])
@pytest.mark.parametrize("row_tokens", [None, 90])
@pytest.mark.parametrize("same_length", [False, True])
def test_reference_rows_of_several_groups_reduce_to_each_groups_matrix(kind, row_tokens, same_length):
    """runtime.microbatches.reference_pairs packs the rows of several groups (of different sizes) together: the
    partial reductions of its micro-batches, summed and split, are each group's own matrix (sum and mean), each
    token is computed once, micro-batches hold one row of <= max(row_tokens, longest) tokens (budget) or no more
    rows than the largest group, and under same_length all share one shape."""
    from functools import partial

    from megatron_var.batching.pairs import build_cross_pairs, split_cells
    from megatron_var.runtime.microbatches import reference_pairs

    g = torch.Generator().manual_seed(5)
    sizes = [3, 4, 2, 4, 3]
    inputs = [(_ragged(b, 2, 25, g), _ragged(b, 1, 20, g)) for b in sizes]
    build = build_diagonal if kind == "diagonal" else partial(build_cross_pairs, method=kind)
    builds = [partial(build, p, r, 0, pad_to_multiple_of=4) for p, r in inputs]
    alone = [b() for b in builds]
    micro, shapes = reference_pairs(builds, 0, 4, same_length, pack=True, row_tokens=row_tokens)
    assert shapes == [a.matrix_shape for a in alone]
    # a token log-prob that depends only on what packing must keep: the label, its position and its cell's group
    def logps(b):
        return (b.labels * 0.01 + b.position_ids * 0.001).double()
    for reduction in ("sum", "mean"):
        total = sum(m.reduce(logps(m), reduction) for m in micro)
        for got, a in zip(split_cells(total, shapes), alone):
            torch.testing.assert_close(got, a.reduce(logps(a), reduction), rtol=1e-12, atol=1e-12)
    real = sum(int((a.attn_segments >= 0).sum()) for a in alone)
    assert sum(int((m.attn_segments >= 0).sum()) for m in micro) == real
    longest = max(int((a.attn_segments >= 0).sum(1).max()) for a in alone)
    if row_tokens:
        assert all(m.tokens.size(0) == 1 for m in micro)
        assert max(int((m.attn_segments >= 0).sum()) for m in micro) <= max(row_tokens, longest)
    else:  # no more rows, nor scored positions (logits), than the largest group (or one packed row) has
        assert max(m.tokens.size(0) for m in micro) <= max(a.tokens.size(0) for a in alone)
        most_scored = max(int((a.segment_index >= 0).sum()) for a in alone)
        for m in micro:
            scored = (m.segment_index >= 0).sum(dim=1)
            assert int(scored.sum()) <= max(most_scored, int(scored.max()))
    assert all(m.tokens.size(1) % 4 == 0 for m in micro)
    if same_length:
        assert len({m.tokens.shape for m in micro}) == 1
    # unpacked (--no-pack-sequences): one micro-batch per group, in the same flat cell space
    unpacked, _ = reference_pairs(builds, 0, 4, same_length, pack=False)
    assert len(unpacked) == len(alone)
    total = sum(m.reduce(logps(m), "mean") for m in unpacked)
    for got, a in zip(split_cells(total, shapes), alone):
        torch.testing.assert_close(got, a.reduce(logps(a), "mean"), rtol=1e-12, atol=1e-12)
    # on these groups: never more computed tokens than each group packed on its own (without a budget that is the
    # fallback when the row and logit limits would cost more), fewer with a budget, and fewer than padded rows
    # (under same_length groups of different sizes cannot run unpacked: PP needs one row count)
    from megatron_var.runtime.microbatches import shaped_pairs
    per_group = sum(m.tokens.numel() for m in shaped_pairs(builds, 0, 4, same_length, pack=True,
                                                           row_tokens=row_tokens))
    computed = sum(m.tokens.numel() for m in micro)
    assert computed <= per_group
    if row_tokens:
        assert computed < per_group
    if not same_length:
        assert computed < sum(m.tokens.numel() for m in unpacked)
