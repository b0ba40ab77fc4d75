"""The shared-prefix core attentions at production head sizes on the training device — on CUDA the *compiled*
FlexAttention kernel and compiled ``create_block_mask`` that CPU tests never reach — against float64 attention
written out by hand. Run by ``bench/gpu_check.sh`` on a lent GPU; on CPU the same cases run the eager paths.

Why a separate file: torch 2.14's compiled CPU flex kernel was found returning wrong rows at head_dim 16
(docs/performance.md), so the compiled GPU kernel gets its own check at the shapes training uses (several
sequence lengths in one process: the first compile is static, later ones dynamic).
"""

import pytest
import torch
from attention_fixtures import make_core, reference_attention

from megatron_var.batching.pairs import build_shared_prefix
from megatron_var.models.layers import FlexCoreAttention, SDPACoreAttention
from megatron_var.models.segment_mask import SegmentMask

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture
def no_tf32():
    """fp32 means fp32 here (the benchmark turns TF32 on); restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# (prompts, response length, B responses, heads, groups, head_dim): a one-block row, rows spanning several 128-token
# blocks with ragged lengths, and a B=8 group at a quarter of the benchmark's P=512/R=256
SHAPES = [
    ((17, 40), 9, 3, 4, 2, 64),
    ((150, 90, 301), 45, 4, 8, 2, 128),
    ((128, 128), 64, 8, 4, 1, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_attention_on_device(device, dtype, no_tf32):
    g = torch.Generator().manual_seed(0)
    atol = 5e-5 if dtype == torch.float32 else 3e-2
    for prompt_lens, resp_len, n_resp, heads, groups, head_dim in SHAPES:
        prompts = [torch.randint(1, 99, (p,), generator=g).tolist() for p in prompt_lens]
        responses = [torch.randint(1, 99, (resp_len + j,), generator=g).tolist() for j in range(n_resp)]
        cross = build_shared_prefix(prompts, responses, pad_id=0)
        n, s = cross.tokens.shape
        q = torch.randn(s, n, heads, head_dim, generator=g)
        k = torch.randn(s, n, groups, head_dim, generator=g)
        v = torch.randn(s, n, groups, head_dim, generator=g)
        ref = reference_attention(q, k, v, cross.attention_mask[:, 0])
        qd, kd, vd = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        for cls in (FlexCoreAttention, SDPACoreAttention):
            out = make_core(cls, heads, groups, head_dim)(qd, kd, vd, SegmentMask(cross.attn_segments))
            err = (out.double().cpu() - ref).abs().max().item()
            assert err <= atol, f"{cls.__name__} {device} {dtype} s={s} b={n} head_dim={head_dim}: max err {err:.2e}"
