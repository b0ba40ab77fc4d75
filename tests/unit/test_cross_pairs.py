"""Cross-pair batches: hand-checked layouts, and the [B, B] matrix from a tiny float64 HF Llama equals a brute-force
loop that scores every [x_i; y_j] alone (naive and shared-prefix layouts, sum and mean)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_var.batching.pairs import (
    block_attention_mask,
    build_cross_pairs,
    build_diagonal,
    build_naive,
    build_shared_prefix,
)

torch.set_num_threads(1)
VOCAB = 64
PAD = 0


def test_shared_prefix_layout_by_hand():
    b = build_shared_prefix([[11, 12, 13], [21]], [[31], [41, 42]], PAD)
    assert b.tokens.tolist() == [[11, 12, 13, 31, 13, 41, 42], [21, 31, 21, 41, 42, PAD, PAD]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 1, 2, 0, 0]]
    assert b.labels.tolist() == [[12, 13, 31, PAD, 41, 42, PAD], [31, PAD, 41, 42, PAD, PAD, PAD]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0, 0]]
    assert b.loss_mask.dtype == torch.float32 and b.tokens.dtype == torch.long
    assert b.segment_index.tolist() == [[-1, -1, 0, -1, 1, 1, -1], [2, -1, 3, 3, -1, -1, -1]]
    assert b.attn_segments.tolist() == [[0, 0, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, -1, -1]]
    assert b.response_lengths.tolist() == [[1, 2], [1, 2]] and b.matrix_shape == (2, 2)
    visible = [[k for k in range(7) if not b.attention_mask[0, 0, q, k]] for q in range(7)]
    assert visible == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5], [0, 1, 4, 5, 6]]
    visible = [[k for k in range(7) if not b.attention_mask[1, 0, q, k]] for q in range(7)]
    assert visible == [[0], [0, 1], [2], [2, 3], [2, 3, 4], [5], [6]]  # no prefix; pads see themselves only
    assert b.attention_mask.shape == (2, 1, 7, 7) and b.attention_mask.dtype == torch.bool


def test_naive_and_diagonal_layout_by_hand():
    n = build_naive([[11, 12, 13], [21]], [[31], [41, 42]], PAD)
    assert n.attention_mask is None and n.tokens.shape == (4, 5)
    assert n.tokens[1].tolist() == [11, 12, 13, 41, 42]  # row i*R + j = (0, 1)
    assert n.labels[1].tolist() == [12, 13, 41, 42, PAD]
    assert n.loss_mask[1].tolist() == [0, 0, 1, 1, 0]
    assert n.segment_index[1].tolist() == [-1, -1, 1, 1, -1]
    assert n.tokens[2].tolist() == [21, 31, PAD, PAD, PAD] and n.segment_index[2].tolist() == [2, -1, -1, -1, -1]
    assert n.position_ids[0].tolist() == [0, 1, 2, 3, 0]
    d = build_diagonal([[11, 12, 13], [21]], [[31], [41, 42]], PAD)
    assert d.tokens.tolist() == [[11, 12, 13, 31], [21, 41, 42, PAD]]
    assert d.segment_index.tolist() == [[-1, -1, 0, -1], [1, 1, -1, -1]]
    assert d.matrix_shape == (2,) and d.response_lengths.tolist() == [1, 2]
    assert d.reduce(torch.ones(2, 4)).tolist() == [1.0, 2.0]


def test_padding_options_and_validation():
    xs, ys = [[1, 2, 3], [4]], [[5, 6], [7]]
    for build in (build_naive, build_shared_prefix, build_diagonal):
        assert build(xs, ys, PAD, pad_to_multiple_of=4).tokens.shape[1] % 4 == 0
        assert build(xs, ys, PAD, pad_to_multiple_of=2, seq_length=16).tokens.shape[1] == 16
        with pytest.raises(ValueError, match="seq_length"):
            build(xs, ys, PAD, seq_length=3)
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            build([[1], []], ys, PAD)
        with pytest.raises(ValueError, match="response 0 is empty"):
            build(xs, [[], [1]], PAD)
    with pytest.raises(ValueError, match="as many prompts"):
        build_diagonal(xs, [[1]], PAD)
    with pytest.raises(ValueError, match="method"):
        build_cross_pairs(xs, ys, PAD, method="packed")
    b = build_cross_pairs([torch.tensor([1, 2]), torch.tensor([3])], ys, PAD, method="naive")
    assert b.tokens.shape == (4, 4)
    with pytest.raises(ValueError, match="must match"):
        b.reduce(torch.zeros(4, 5))
    # every query of the block mask sees at least one key (no NaN softmax rows), incl. padding
    m = build_shared_prefix(xs, ys, PAD, pad_to_multiple_of=8).attention_mask
    assert (~m).any(dim=-1).all()


def test_reduce_gradient_and_mean():
    b = build_shared_prefix([[1, 2], [3, 4, 5]], [[6, 7, 8], [9]], PAD)
    tok = torch.randn(b.tokens.shape, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        tok[b.segment_index < 0] = float("-inf")  # off-response positions must not leak into the matrix
    mat = b.reduce(tok)
    assert torch.isfinite(mat).all()
    mat.sum().backward()
    torch.testing.assert_close(tok.grad, (b.segment_index >= 0).double())
    torch.testing.assert_close(b.reduce(tok, "mean"), mat / torch.tensor([[3.0, 1.0], [3.0, 1.0]], dtype=torch.float64))
    moved = b.to("cpu")
    assert moved.tokens.equal(b.tokens) and moved.attention_mask.equal(b.attention_mask)


# ---------------------------------------------------------------- against a real model (float64 HF Llama)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=100.0,  # fast-turning rotary ...
        initializer_range=0.3,  # ... and peaked attention, so that wrong positions/masks show up clearly
        attn_implementation=request.param,
    )
    m = LlamaForCausalLM(cfg).double().eval()
    # HF's eager attention takes its softmax in float32 even for a float64 model (~1e-7 relative noise on this
    # peaked model), so the strict float64 check is the SDPA one; eager shows the additive 4D mask path works too.
    m.rtol = 1e-10 if request.param == "sdpa" else 1e-6
    return m


def token_logps(model, batch, attention_mask="batch", position_ids="batch"):
    """token_logps[n, s] = log p(labels[n, s] | tokens[n, :s+1]) with our bool mask made additive."""
    mask = batch.attention_mask if attention_mask == "batch" else attention_mask
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, torch.finfo(torch.float64).min)
    pos = batch.position_ids if position_ids == "batch" else position_ids
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, position_ids=pos, attention_mask=mask).logits
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, batch.labels[..., None])[..., 0]


def brute_force(model, xs, ys, mean=False):
    """Each [x_i; y_j] alone, no mask, default positions; sum log p(y_j[t] | x_i, y_j[:t]) token by token."""
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([x + y])).logits[0].double(), dim=-1)
            total = 0.0
            for t, tok in enumerate(y):
                total += logp[len(x) - 1 + t, tok].item()
            out[i, j] = total / len(y) if mean else total
    return out


def random_group(seed, prompt_lens, response_lens):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    ys = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in response_lens]
    return xs, ys


@pytest.mark.parametrize(
    "prompt_lens,response_lens",
    [((1, 5, 9, 3), (3, 1, 7, 4)), ((6, 6), (2, 11)), ((4,), (5,))],
)
def test_matrix_equals_brute_force(model, prompt_lens, response_lens):
    xs, ys = random_group(sum(prompt_lens) + len(response_lens), prompt_lens, response_lens)
    rtol = model.rtol
    for reduction in ("sum", "mean"):
        expected = brute_force(model, xs, ys, mean=reduction == "mean")
        naive = build_naive(xs, ys, PAD)
        shared = build_shared_prefix(xs, ys, PAD, pad_to_multiple_of=8)
        m_naive = naive.reduce(token_logps(model, naive), reduction)
        m_shared = shared.reduce(token_logps(model, shared), reduction)
        assert m_naive.shape == m_shared.shape == (len(xs), len(ys))
        torch.testing.assert_close(m_naive, expected, rtol=rtol, atol=0)
        torch.testing.assert_close(m_shared, expected, rtol=rtol, atol=0)
        if len(xs) == len(ys):
            diag = build_diagonal(xs, ys, PAD, pad_to_multiple_of=4)
            m_diag = diag.reduce(token_logps(model, diag), reduction)
            torch.testing.assert_close(m_diag, expected.diagonal(), rtol=rtol, atol=0)


def test_negative_controls(model):
    """Breaking the block mask or the restarted positions changes the matrix: the equality above has teeth."""
    xs, ys = random_group(5, (4, 7, 2), (5, 3, 6))
    expected = brute_force(model, xs, ys)
    shared = build_shared_prefix(xs, ys, PAD)
    torch.testing.assert_close(shared.reduce(token_logps(model, shared)), expected, rtol=model.rtol, atol=0)

    def rel_err(mat):
        return ((mat - expected).abs() / expected.abs()).max().item()

    plain_causal = shared.reduce(token_logps(model, shared, attention_mask=None))
    assert rel_err(plain_causal) > 1e-3
    arange = torch.arange(shared.tokens.shape[1]).expand_as(shared.tokens)
    running_positions = shared.reduce(token_logps(model, shared, position_ids=arange))
    assert rel_err(running_positions) > 1e-3
    leaky_mask = block_attention_mask(shared.attn_segments)
    leaky_mask[..., 1:, 0] = True  # hide the first prompt token from everyone else
    assert rel_err(shared.reduce(token_logps(model, shared, attention_mask=leaky_mask))) > 1e-3
